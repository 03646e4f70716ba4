"""What the daemon tells `status` and `list-jobs` without any IPC: a small JSON file rewritten atomically
every few seconds and on changes, and a pid file that stays locked while the daemon runs.

The lock (not the pid) says whether a daemon is alive, so a stale pid file after a crash or a reused pid
never fools `status`. `updated_at` is stamped by the daemon's loop: an old stamp with a live lock means the
daemon is stuck, which `status` says too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuberunner.protocol.jobs import JobType
from tuberunner.runner.config import atomic_write

__all__ = [
    "STATE_FORMAT",
    "AlreadyRunning",
    "DaemonState",
    "ErrorRecord",
    "InstanceStatus",
    "JobStatus",
    "PidLock",
    "read_state",
    "running_daemon_pid",
    "write_state",
]

STATE_FORMAT = 1


@dataclass
class InstanceStatus:
    url: str
    runner_name: str
    # "registered" or "needs-registration" (the instance answered unknown_runner_token).
    registration: str = "registered"
    socket_connected: bool = False
    # Whether its last call answered (a check, a heartbeat); a failed check makes it unreachable.
    reachable: bool = False
    # Wall-clock time of the last answer of this instance that was not an error.
    last_contact_at: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None


@dataclass
class JobStatus:
    uuid: str
    type: str
    instance_url: str
    phase: str
    started_at: float
    progress: float | None = None
    # Media seconds per wall second, when the processor knows it.
    speed: float | None = None
    eta_s: float | None = None


@dataclass
class ErrorRecord:
    at: float
    where: str
    message: str


# Phases of a job that holds a slot (the supervisor's JobPhase values before its result is stored).
_SLOT_PHASES = frozenset({"accepted", "running", "storing"})


@dataclass
class DaemonState:
    pid: int
    runner_id: str
    version: str
    started_at: float
    updated_at: float
    concurrency: int
    live_concurrency: int = 0
    # How often the daemon stamps `updated_at`: an older stamp means a stuck daemon.
    state_interval_s: float = 2.0
    draining: bool = False
    # The local /healthz, /readyz and /metrics endpoint, when it is on.
    endpoint: str | None = None
    instances: list[InstanceStatus] = field(default_factory=list)
    jobs: list[JobStatus] = field(default_factory=list)
    errors: list[ErrorRecord] = field(default_factory=list)

    def slots_line(self) -> str:
        """Slots busy: jobs at work (a result waiting for its server holds none), lives apart."""
        working = [job for job in self.jobs if job.phase in _SLOT_PHASES]
        lives = sum(1 for job in working if job.type == JobType.LIVE_RTMP_HLS)
        line = f"{len(working) - lives}/{self.concurrency} slot(s) busy"
        if self.live_concurrency:
            line += f", {lives}/{self.live_concurrency} live"
        return line

    def stale_for_s(self, now: float) -> float | None:
        """How long the daemon has missed its stamps (beyond a generous margin), or None."""
        age = now - self.updated_at
        return age if age > 5 * self.state_interval_s + 10 else None

    def to_json(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DaemonState:
        return cls(
            pid=int(data["pid"]),
            runner_id=str(data["runner_id"]),
            version=str(data["version"]),
            started_at=float(data["started_at"]),
            updated_at=float(data["updated_at"]),
            concurrency=int(data["concurrency"]),
            live_concurrency=int(data.get("live_concurrency", 0)),
            state_interval_s=float(data.get("state_interval_s", 2.0)),
            draining=bool(data.get("draining", False)),
            endpoint=data.get("endpoint"),
            instances=[InstanceStatus(**i) for i in data.get("instances", [])],
            jobs=[JobStatus(**j) for j in data.get("jobs", [])],
            errors=[ErrorRecord(**e) for e in data.get("errors", [])],
        )


def write_state(path: Path, state: DaemonState) -> None:
    atomic_write(path, json.dumps(state.to_json(), indent=1), mode=0o644, durable=False)


def read_state(path: Path) -> DaemonState | None:
    """The last state written, or None when there is none or it cannot be understood."""
    try:
        return DaemonState.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class AlreadyRunning(Exception):
    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        super().__init__(f"another daemon already runs with this id (pid {pid if pid else 'unknown'})")


class PidLock:
    """Held for the daemon's whole life: an exclusive lock on `daemon.pid`, which contains our pid."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(_read_pid(self.path)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> PidLock:
        self.acquire()
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def running_daemon_pid(path: Path) -> int | None:
    """The pid of the daemon holding `path` locked, or None when no daemon runs (stale or no file)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(path) or -1
        return None
    finally:
        os.close(fd)
