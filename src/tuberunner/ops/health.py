"""Liveness and readiness, as reports of named checks (STYLE lesson 9: health comes from the work loop).

Liveness (`/healthz`) is the `LoopMonitor`: a task of the daemon's own TaskGroup that wakes every
`interval_s`, stamps the time and measures how late it woke (the event loop's lag). A stamp older than
`stale_after_s` means the loop no longer turns, or the TaskGroup that owns the monitor is gone; a lag above
`max_lag_s` means something blocks the loop. A loop that is blocked right now cannot answer at all, which
a probe with a timeout reads the same way. Each tick also sends systemd's WATCHDOG=1.

Readiness (`/readyz`) of the runner: at least one instance reachable (its last call answered) and
authorised (it knows our token), ffmpeg still there and executable, the work folder's disk above
`jobs.min_free_disk_bytes`, the loop alive, not draining.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tuberunner.runner.supervisor import Supervisor

__all__ = ["Check", "HealthReport", "LoopMonitor", "runner_liveness", "runner_readiness"]


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class HealthReport:
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def status_code(self) -> int:
        return 200 if self.ok else 503

    def as_json(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.ok else "fail",
            "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in self.checks},
        }

    @classmethod
    def of(cls, checks: Iterable[Check]) -> HealthReport:
        return cls(tuple(checks))


class LoopMonitor:
    """Stamps the time from the event loop every `interval_s` and measures its lag."""

    def __init__(
        self,
        interval_s: float = 1.0,
        *,
        max_lag_s: float = 5.0,
        stale_after_s: float | None = None,
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        self.interval_s = interval_s
        self.max_lag_s = max_lag_s
        self.stale_after_s = stale_after_s or max(5 * interval_s, interval_s + max_lag_s)
        self.on_tick = on_tick
        self.last_tick: float | None = None
        # How late the last wake-up was (seconds), and the worst seen.
        self.lag_s = 0.0
        self.max_lag_seen_s = 0.0

    async def run(self) -> None:
        self._tick(time.monotonic(), 0.0)
        while True:
            expected = time.monotonic() + self.interval_s
            await asyncio.sleep(self.interval_s)
            now = time.monotonic()
            self._tick(now, max(0.0, now - expected))

    def _tick(self, now: float, lag_s: float) -> None:
        self.last_tick = now
        self.lag_s = lag_s
        self.max_lag_seen_s = max(self.max_lag_seen_s, lag_s)
        if self.on_tick is not None:
            self.on_tick()

    def check(self, now: float | None = None) -> Check:
        now = time.monotonic() if now is None else now
        if self.last_tick is None:
            return Check("event_loop", False, "the loop monitor has not started")
        age = now - self.last_tick
        if age > self.stale_after_s:
            return Check(
                "event_loop", False, f"no tick for {age:.1f} s (every {self.interval_s:g} s expected)"
            )
        if self.lag_s > self.max_lag_s:
            return Check("event_loop", False, f"the event loop woke {self.lag_s:.2f} s late")
        return Check("event_loop", True, f"last tick {age:.2f} s ago, lag {self.lag_s * 1000:.0f} ms")


# ------------------------------------------------------------------------------------------ runner


def runner_liveness(supervisor: Supervisor) -> HealthReport:
    return HealthReport.of([supervisor.loop_monitor.check()])


def runner_readiness(supervisor: Supervisor) -> HealthReport:
    return HealthReport.of(
        [
            supervisor.loop_monitor.check(),
            _instances(supervisor),
            _ffmpeg(supervisor),
            _disk(supervisor),
            Check("accepting", not supervisor.draining, "draining" if supervisor.draining else "taking jobs"),
        ]
    )


def _instances(supervisor: Supervisor) -> Check:
    states = []
    usable = 0
    for worker in supervisor.workers.values():
        status = worker.status
        if status.registration != "registered":
            state = "needs registration"
        elif status.reachable:
            state = "reachable"
            usable += 1
        else:
            state = f"unreachable ({status.last_error or 'not contacted yet'})"
        states.append(f"{status.url} ({status.runner_name}): {state}")
    if not states:
        return Check("instances", False, "no instance is registered")
    return Check("instances", usable > 0, "; ".join(states))


def _ffmpeg(supervisor: Supervisor) -> Check:
    path = supervisor.settings.ffmpeg
    if path.is_file() and os.access(path, os.X_OK):
        return Check("ffmpeg", True, str(path))
    return Check("ffmpeg", False, f"{path} is missing or not executable")


def _disk(supervisor: Supervisor) -> Check:
    needed = supervisor.config.min_free_disk_bytes
    try:
        free = shutil.disk_usage(supervisor.work_dir).free
    except OSError as exc:
        return Check("disk", False, f"cannot read the free space of {supervisor.work_dir}: {exc}")
    detail = f"{free / 1024**3:.2f} GiB free in {supervisor.work_dir}, {needed / 1024**3:.2f} GiB required"
    return Check("disk", free >= needed, detail)
