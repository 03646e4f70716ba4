"""Running the probe worker for `probe.py`: through the fork server, else as a subprocess of its own.

Each probe runs in a process of its own either way (see `probe_server`). The fork server of a worker module
is started by the first probe of this process (or by `start_probe_server`), and lives as long as this
process does; a server that cannot start or that went away is replaced by one subprocess per probe (the
next probe tries a new server after `_RETRY_SERVER_AFTER_S`), so probing never depends on it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import select
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["WorkerExit", "WorkerTimeout", "run_worker", "start_probe_server"]

log = logging.getLogger(__name__)

WORKER_MODULE = "tuberunner.media.probe_worker"
_SERVER_MODULE = "tuberunner.media.probe_server"
# The directory that holds the `tuberunner` package: the worker must import this very code, even when the
# package is run from a source tree that only the parent put on its path.
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]
# Starting the server imports PyAV: a second or two on a loaded machine, never ten.
_START_TIMEOUT_S = 10.0
_RETRY_SERVER_AFTER_S = 60.0
# After a killed child: how long the server may take to reap it (it does so as soon as it dies).
_REAP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class WorkerExit:
    """How one worker run ended, as `Popen` would say it: returncode < 0 is the signal that killed it."""

    returncode: int | None
    stdout: bytes
    stderr: bytes


class WorkerTimeout(Exception):
    """The worker ran longer than allowed; it was killed."""


class _ServerGone(Exception):
    """The fork server could not take the request or died with it: run the worker on its own instead."""


async def run_worker(module: str, args: list[str], timeout_s: float) -> WorkerExit:
    """Run `module`'s `main` with `args` in a process of its own; WorkerTimeout after `timeout_s`."""
    server = await asyncio.to_thread(_server_for, module, _worker_environment())
    if server is not None:
        try:
            return await server.run(args, timeout_s)
        except _ServerGone as exc:
            log.warning("the probe server stopped (%s); probing in a new process", exc)
            server.stop()
    return await _run_alone(module, args, timeout_s)


def start_probe_server() -> None:
    """Start this process's probe server now (blocking, a fraction of a second), so that the first probe
    does not wait for it; a failure only means probes start without it."""
    _server_for(WORKER_MODULE, _worker_environment())


def _worker_environment() -> dict[str, str]:
    env = dict(os.environ)
    # A site-packages directory is on the child's path anyway, and putting it on PYTHONPATH would move it
    # ahead of the standard library; a source tree is added so that `-m` finds the package.
    if str(_PACKAGE_ROOT) not in {*site.getsitepackages(), site.getusersitepackages()}:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGE_ROOT), env.get("PYTHONPATH")]))
    return env


# ---------------------------------------------------------------------------- the fork server's client


_Key = tuple[int, str, str | None]  # (owner process, worker module, PYTHONPATH)


class _Server:
    def __init__(self, key: _Key, module: str, env: dict[str, str]) -> None:
        self.key = key
        self.owner = os.getpid()
        self.folder = Path(tempfile.mkdtemp(prefix="tuberunner-probe-"))  # mode 0700: ours alone
        self.socket = self.folder / "socket"
        self._log = (self.folder / "server.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", _SERVER_MODULE, os.fspath(self.socket), module],
            stdin=subprocess.PIPE,  # its end of file tells the server to stop
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], _START_TIMEOUT_S)
        line = self.process.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self._shut_down()
            raise OSError(f"the probe server did not start: {self._last_words() or 'no answer'}")

    async def run(self, args: list[str], timeout_s: float) -> WorkerExit:
        try:
            reader, writer = await asyncio.open_unix_connection(os.fspath(self.socket))
        except OSError as exc:
            raise _ServerGone(f"cannot connect: {exc}") from exc
        pid: int | None = None
        try:
            writer.write(json.dumps(args).encode() + b"\n")
            try:
                async with asyncio.timeout(timeout_s):
                    pid = _field(await reader.readline(), "pid")
                    finished = await reader.readline()
            except TimeoutError:
                if pid is not None:
                    _kill_group(pid)
                    # The server reaps it and answers: then the process is gone for sure.
                    with contextlib.suppress(TimeoutError, OSError):
                        await asyncio.wait_for(reader.readline(), _REAP_TIMEOUT_S)
                    pid = None
                raise WorkerTimeout() from None
            code = _field(finished, "code")
            answer = json.loads(finished)
            pid = None  # reaped by the server
            return WorkerExit(code, answer["stdout"].encode("latin-1"), answer["stderr"].encode("latin-1"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise _ServerGone(f"{type(exc).__name__}: {exc}") from exc
        finally:
            # Also reached on cancellation: never leave the child behind.
            if pid is not None:
                _kill_group(pid)
            writer.close()

    def stop(self) -> None:
        """Forget this server and stop it (probes under way through it end with _ServerGone)."""
        with _lock:
            if _servers.get(self.key) is self:
                del _servers[self.key]
        self._shut_down()

    def _shut_down(self) -> None:
        # A forked copy of this process does not own the server: only the process that started it stops it.
        if self.owner == os.getpid():
            if self.process.stdin is not None:
                with contextlib.suppress(OSError):
                    self.process.stdin.close()
            try:
                self.process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _last_words(self) -> str:
        with contextlib.suppress(OSError):
            lines = (self.folder / "server.log").read_text(errors="replace").strip().splitlines()
            return lines[-1] if lines else ""
        return ""


def _field(line: bytes, name: str) -> int:
    if not line:
        raise _ServerGone("it closed the connection")
    value = json.loads(line)[name]
    if not isinstance(value, int):
        raise ValueError(f"{name} is not a number")
    return value


_lock = threading.Lock()
_servers: dict[_Key, _Server] = {}
_failed_at: dict[_Key, float] = {}


def _server_for(module: str, env: dict[str, str]) -> _Server | None:
    """This process's server for `module` (one per worker module and PYTHONPATH), started if need be;
    None when it cannot run (then retried after a while)."""
    key: _Key = (os.getpid(), module, env.get("PYTHONPATH"))
    with _lock:
        server = _servers.get(key)
        if server is not None:
            if server.process.poll() is None:
                return server
            del _servers[key]  # killed, say: its files go, a new one starts
            server._shut_down()
        if time.monotonic() - _failed_at.get(key, -_RETRY_SERVER_AFTER_S) < _RETRY_SERVER_AFTER_S:
            return None
        try:
            server = _Server(key, module, env)
        except OSError as exc:
            log.warning("%s; probing with one new process per file", exc)
            _failed_at[key] = time.monotonic()
            return None
        _servers[key] = server
        return server


@atexit.register
def _stop_servers() -> None:
    for server in list(_servers.values()):
        server.stop()


# ---------------------------------------------------------------------------- one process per probe


async def _run_alone(module: str, args: list[str], timeout_s: float) -> WorkerExit:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_worker_environment(),
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(timeout_s):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        raise WorkerTimeout() from None
    finally:
        # Also reached on cancellation: never leave the worker behind.
        if process.returncode is None:
            _kill_group(process.pid)
            await process.wait()
    return WorkerExit(process.returncode, stdout, stderr)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
