"""Real coordinators for tests: in-process uvicorn on loopback, or a separate process to kill."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

from tuberunner.coordinator.app import create_app
from tuberunner.coordinator.config import CoordinatorConfig
from tuberunner.coordinator.context import Coordinator

ADMIN_TOKEN = "tra-test-admin-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningCoordinator:
    url: str
    config: CoordinatorConfig
    app: object

    @property
    def coordinator(self) -> Coordinator:
        # socketio.ASGIApp keeps the Starlette app as `other_asgi_app`.
        found: Coordinator = self.app.other_asgi_app.state.coordinator  # type: ignore[attr-defined]
        return found


@asynccontextmanager
async def serve_coordinator(config: CoordinatorConfig) -> AsyncIterator[RunningCoordinator]:
    """Start the real app under uvicorn in this event loop; stop it (lifespan included) on exit.

    The listening socket is bound before the app starts: a port picked and released first could be taken
    meanwhile (by the RTMP server the app starts on a free port, say), and uvicorn then exits the process."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(config)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", ws="websockets-sansio"
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("coordinator did not start")
        await asyncio.sleep(0.01)
    try:
        yield RunningCoordinator(f"http://127.0.0.1:{port}", config, app)
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(task, 30)
        finally:
            sock.close()


class CoordinatorProcess:
    """`tuberunner coordinator serve` as a child process, for SIGKILL and restart tests."""

    def __init__(
        self,
        data_dir: Path,
        database_url: str | None,
        *,
        lease_s: float = 120.0,
        port: int | None = None,
        rtmp_port: int = 0,
    ):
        self.data_dir = data_dir
        self.database_url = database_url
        self.lease_s = lease_s
        # 0: live off (the default 1935 may be taken: PeerTube, another test's coordinator).
        self.rtmp_port = rtmp_port
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "coordinator.log"

    def start(self, timeout_s: float = 30) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            sys.executable,
            "-m",
            "tuberunner",
            "coordinator",
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--port",
            str(self.port),
            "--lease",
            str(self.lease_s),
            "--rtmp-port",
            str(self.rtmp_port),
        ]
        if self.database_url:
            args += ["--database-url", self.database_url]
        env = {**os.environ, "TUBERUNNER_ADMIN_TOKEN": ADMIN_TOKEN}
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"coordinator exited: {self.log_path.read_text()[-2000:]}")
            try:
                httpx.get(self.url + "/api/v1/runners/jobs/request", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError("coordinator did not answer in time")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
