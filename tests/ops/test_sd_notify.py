"""systemd notifications, received on a real unix datagram socket given as NOTIFY_SOCKET: both daemons say
READY=1 once they serve, WATCHDOG=1 from their loop at the pace WATCHDOG_USEC asks, STOPPING=1 on
SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

from tests.e2e.conftest import WAIT_S, daemon_env, stop_daemon
from tests.ops.conftest import start_tuberunner
from tests.support.servers import ADMIN_TOKEN, free_port
from tuberunner.ops.sd_notify import SystemdNotifier

# systemd asks for a WATCHDOG=1 at least every 0.4 s; the daemons send one every 0.2 s.
WATCHDOG_USEC = "400000"


class NotifySocket:
    """The systemd side: a bound datagram socket; `next()` is the next message's set of lines."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address

    async def next(self, timeout_s: float = WAIT_S) -> set[str]:
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(self.sock, 4096), timeout_s)
        return set(data.decode().splitlines())

    async def until(self, line: str, timeout_s: float = WAIT_S) -> list[set[str]]:
        """Messages up to the first one with `line` (included)."""
        seen: list[set[str]] = []
        async with asyncio.timeout(timeout_s):
            while not seen or line not in seen[-1]:
                seen.append(await self.next())
        return seen


@asynccontextmanager
async def notify_socket(path: Path) -> AsyncIterator[NotifySocket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    try:
        yield NotifySocket(sock, str(path))
    finally:
        sock.close()


async def test_the_runner_daemon_notifies_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    async with notify_socket(tmp_path / "notify.sock") as systemd:
        env = daemon_env(tmp_path / "home", NOTIFY_SOCKET=systemd.address, WATCHDOG_USEC=WATCHDOG_USEC)
        log_path = tmp_path / "daemon.log"
        daemon = await start_tuberunner(env, log_path, "server")
        try:
            (ready,) = await systemd.until("READY=1")
            assert any(line.startswith("STATUS=") for line in ready)
            for _ in range(3):
                assert await systemd.next(timeout_s=2) == {"WATCHDOG=1"}
            daemon.send_signal(signal.SIGTERM)
            messages = await systemd.until("STOPPING=1")
            assert all(m == {"WATCHDOG=1"} for m in messages[:-1])
            assert await daemon.wait() == 0, log_path.read_text()[-3000:]
        finally:
            if daemon.returncode is None:
                await stop_daemon(daemon)


async def test_the_coordinator_notifies_ready_once_it_listens(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    async with notify_socket(tmp_path / "notify.sock") as systemd:
        env = {
            **os.environ,
            "TUBERUNNER_ADMIN_TOKEN": ADMIN_TOKEN,
            "NOTIFY_SOCKET": systemd.address,
            "WATCHDOG_USEC": WATCHDOG_USEC,
        }
        data_dir = tmp_path / "coordinator"
        log_path = tmp_path / "coordinator.log"
        args = ["coordinator", "serve", "--data-dir", str(data_dir), "--port", str(port), "--rtmp-port", "0"]
        process = await start_tuberunner(env, log_path, *args)
        try:
            messages = await systemd.until("READY=1")
            # READY=1 comes once requests are answered: no refused connection after it.
            async with httpx.AsyncClient(base_url=url) as http:
                assert (await http.get("/readyz")).status_code == 200
            assert all(m == {"WATCHDOG=1"} for m in messages[:-1])
            for _ in range(3):
                assert await systemd.next(timeout_s=2) == {"WATCHDOG=1"}
            process.send_signal(signal.SIGTERM)
            await systemd.until("STOPPING=1")
            # uvicorn re-raises SIGTERM once it has shut down cleanly; systemd counts that as a clean stop.
            code = await asyncio.wait_for(process.wait(), WAIT_S)
            assert code in (0, -signal.SIGTERM), log_path.read_text()[-3000:]
            assert "Application shutdown complete" in log_path.read_text()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


async def test_an_abstract_socket_address_and_no_socket_at_all() -> None:
    name = f"tuberunner-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.setblocking(False)
    try:
        notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "1000000"})
        assert notifier.watchdog_interval_s == 1.0
        notifier.ready("up")
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), 5)
        assert data == b"READY=1\nSTATUS=up"
        notifier.close()
    finally:
        sock.close()
    # Meant for another process (WATCHDOG_PID), or not under systemd: nothing is sent.
    other = SystemdNotifier.from_env(
        {"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "5", "WATCHDOG_PID": "1"}
    )
    assert other.watchdog_interval_s is None
    assert not SystemdNotifier.from_env({}).notify("READY=1")
