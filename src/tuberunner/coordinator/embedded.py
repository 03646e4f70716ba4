"""A coordinator served inside the calling process (one-shot mode, tests): real uvicorn on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import uvicorn

from tuberunner.coordinator.app import create_app
from tuberunner.coordinator.config import CoordinatorConfig
from tuberunner.coordinator.context import Coordinator


class _QuietServer(uvicorn.Server):
    """Signals belong to the embedding program (its Ctrl-C stops runners first, then us)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass(frozen=True)
class Embedded:
    url: str
    coordinator: Coordinator


@asynccontextmanager
async def embedded_coordinator(config: CoordinatorConfig, host: str = "127.0.0.1") -> AsyncIterator[Embedded]:
    """Serve on a free port chosen by the OS; stop (lifespan included) on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    app = create_app(config)
    server = _QuietServer(
        uvicorn.Config(
            app, log_level="warning", lifespan="on", ws="websockets-sansio", timeout_graceful_shutdown=5
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]), name="embedded-coordinator")
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the embedded coordinator stopped during its start")
            await asyncio.sleep(0.01)
        coordinator: Coordinator = app.other_asgi_app.state.coordinator  # type: ignore[attr-defined]
        yield Embedded(f"http://{host}:{port}", coordinator)
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), 30)
        finally:
            sock.close()
