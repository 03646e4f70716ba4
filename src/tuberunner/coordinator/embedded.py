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
    """Signals belong to the embedding program (its Ctrl-C stops runners first, then us); `stop` is seen
    at once (uvicorn looks at `should_exit` between naps of 0.1 s: that long at the end of every run)."""

    _nap: asyncio.Future[None] | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def main_loop(self) -> None:
        loop = asyncio.get_running_loop()
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 1) % 864000
            # uvicorn's own loop, with a nap that `stop` cuts short.
            self._nap = loop.create_future()
            timer = loop.call_later(0.1, _wake, self._nap)
            try:
                await self._nap
            finally:
                timer.cancel()
            should_exit = await self.on_tick(counter)

    def stop(self) -> None:
        self.should_exit = True
        if self._nap is not None:
            _wake(self._nap)


def _wake(nap: asyncio.Future[None]) -> None:
    if not nap.done():
        nap.set_result(None)


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
        server.stop()
        try:
            await asyncio.wait_for(asyncio.shield(task), 30)
        finally:
            sock.close()
