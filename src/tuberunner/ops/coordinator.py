"""The coordinator's `/healthz`, `/readyz` and `/metrics`, and the log context of runner API requests.

    /healthz   the event loop turns (the loop monitor's last tick is fresh, its lag small)
    /readyz    the database answers `SELECT 1`, the files folder takes a new file, the socket layer is up
               (with Redis: its server answers PING), the RTMP server listens (live on), the loop turns,
               the app has started
    /metrics   Prometheus text: jobs by type and state (queue depth and outcomes), pending jobs no connected
               runner takes, registered runners, open runner sockets, lease expiries, available-jobs pings,
               storyboards the coordinator made itself, uploads left by a crash and removed;
               lives by state, RTMP publishers and pulls (connected, accepted, refused), live segments
               received, live jobs created, live lag (segment age when the coordinator lists it)

The job counts are read from the database when Prometheus scrapes, by one grouped query (its result is
kept `cache_s` so that many scrapers cost one query), never counted on the hot path. Each check and the
query have a deadline: a stuck database makes `/readyz` answer 503 in time, not hang.

`JobLogContext` (pure ASGI) binds the job id of `/api/v1/runners/jobs/<uuid>/...` requests to the log
context: lines logged while serving them, and by completion tasks they start, carry `job_id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from sqlalchemy import func, select, text
from sqlalchemy.engine import Connection
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from tuberunner.coordinator.live import LAG_BUCKETS, LIVE_STATES
from tuberunner.coordinator.schema import jobs, lives, runners
from tuberunner.ops import logs
from tuberunner.ops.health import Check, HealthReport, LoopMonitor
from tuberunner.ops.metrics import CONTENT_TYPE
from tuberunner.ops.sd_notify import SystemdNotifier
from tuberunner.protocol.jobs import JobState, JobType

if TYPE_CHECKING:
    from tuberunner.coordinator.context import Coordinator

__all__ = ["CoordinatorOps", "JobLogContext", "ops_of", "routes"]

_CHECK_TIMEOUT_S = 2.0
_JOBS_PATH = "/api/v1/runners/jobs/"


@dataclass(frozen=True)
class _Counts:
    jobs: dict[tuple[str, int], int]
    runners: int
    lives: dict[str, int]


class CoordinatorOps:
    """Liveness, readiness and metrics of one coordinator process; started and stopped by its lifespan."""

    def __init__(
        self, coordinator: Coordinator, systemd: SystemdNotifier | None = None, *, cache_s: float = 2.0
    ) -> None:
        self.coordinator = coordinator
        self.systemd = systemd or SystemdNotifier(None)
        watchdog_s = self.systemd.watchdog_interval_s
        self.loop_monitor = LoopMonitor(
            min(1.0, watchdog_s / 2) if watchdog_s else 1.0, on_tick=self.systemd.watchdog
        )
        self.cache_s = cache_s
        self.started = False
        # Half-received uploads of an earlier process, removed by the start-up sweep.
        self.leftovers_removed = 0
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.registry.register(_CoordinatorCollector(self))
        self.counts: _Counts | None = None
        self._counts_at = -float("inf")
        self.counts_ok = False
        self._refresh: asyncio.Task[None] | None = None
        self._monitor: asyncio.Task[None] | None = None

    def before_start(self) -> None:
        """Called right before `Coordinator.start`, whose sweep deletes what this counts."""
        with contextlib.suppress(OSError):
            self.leftovers_removed += sum(1 for _ in self.coordinator.uploads_dir.iterdir())

    async def start(self) -> None:
        self._monitor = asyncio.create_task(self.loop_monitor.run(), name="loop-monitor")
        self.started = True

    async def stop(self) -> None:
        self.started = False
        for task in (self._monitor, self._refresh):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # -------------------------------------------------------------------- health

    def liveness(self) -> HealthReport:
        return HealthReport.of([self.loop_monitor.check()])

    async def readiness(self) -> HealthReport:
        started = Check("started", self.started, "serving" if self.started else "starting or stopping")
        parts = [
            _bounded("database", self._database),
            _bounded("storage", self._storage),
            _bounded("socket", self._socket),
        ]
        if self.coordinator.live.relay is not None:
            parts.append(_bounded("rtmp", self._rtmp))
        checks = await asyncio.gather(*parts)
        return HealthReport.of([self.loop_monitor.check(), started, *checks])

    async def _database(self) -> str:
        def ping(conn: Connection) -> Any:
            return conn.execute(text("SELECT 1")).scalar()

        await self.coordinator.db.read_statement(ping)
        return "answers SELECT 1"

    async def _storage(self) -> str:
        return await self.coordinator.storage.check()

    async def _socket(self) -> str:
        sio = self.coordinator.notifier.sio
        sockets = len(self.coordinator.notifier.namespace.runner_of_sid)
        redis = getattr(sio.manager, "redis", None)
        if redis is None:
            return f"socket.io in this process, {sockets} runner socket(s) open"
        await redis.ping()
        listener = getattr(sio.manager, "thread", None)
        if isinstance(listener, asyncio.Task) and listener.done():
            raise RuntimeError("the Redis listener of socket.io has stopped")
        return f"socket.io over Redis, {sockets} runner socket(s) open here"

    async def _rtmp(self) -> str:
        relay = self.coordinator.live.relay
        assert relay is not None
        if not relay.listening:
            raise RuntimeError("the RTMP server is not listening")
        return f"RTMP on {relay.host}:{relay.port}"

    # -------------------------------------------------------------------- metrics

    async def exposition(self) -> bytes:
        await self.refresh_counts()
        return generate_latest(self.registry)

    async def refresh_counts(self) -> None:
        """Read the job and runner counts unless a read is recent; concurrent scrapes share one read."""
        if time.monotonic() - self._counts_at < self.cache_s:
            return
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self._read_counts(), name="metrics-counts")
        await asyncio.shield(self._refresh)

    async def _read_counts(self) -> None:
        def read(conn: Connection) -> _Counts:
            rows = conn.execute(
                select(jobs.c.type, jobs.c.state, func.count()).group_by(jobs.c.type, jobs.c.state)
            ).all()
            registered = conn.execute(select(func.count()).select_from(runners)).scalar_one()
            by_live_state = conn.execute(select(lives.c.state, func.count()).group_by(lives.c.state)).all()
            return _Counts(
                {(str(r[0]), int(r[1])): int(r[2]) for r in rows},
                int(registered),
                {str(r[0]): int(r[1]) for r in by_live_state},
            )

        try:
            async with asyncio.timeout(_CHECK_TIMEOUT_S):
                self.counts = await self.coordinator.db.read_statement(read)
            self.counts_ok = True
        except Exception:
            self.counts_ok = False
        self._counts_at = time.monotonic()


async def _bounded(name: str, check: Callable[[], Awaitable[str]]) -> Check:
    try:
        async with asyncio.timeout(_CHECK_TIMEOUT_S):
            return Check(name, True, await check())
    except TimeoutError:
        return Check(name, False, f"no answer within {_CHECK_TIMEOUT_S:g} s")
    except Exception as exc:
        return Check(name, False, f"{type(exc).__name__}: {exc}")


class _CoordinatorCollector:
    def __init__(self, ops: CoordinatorOps) -> None:
        self.ops = ops

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        ops = self.ops
        coordinator = ops.coordinator
        yield GaugeMetricFamily(
            "tuberunner_coordinator_database_up",
            "1 when the last metrics read of the database worked",
            int(ops.counts_ok),
        )
        counts = ops.counts if ops.counts_ok else None
        if counts is not None:
            by_state = GaugeMetricFamily(
                "tuberunner_coordinator_jobs",
                "Jobs in the database by type and state (queue depth, running, and how they ended)",
                labels=["job_type", "state"],
            )
            for job_type in JobType:
                for state in JobState:
                    value = counts.jobs.get((str(job_type), int(state)), 0)
                    by_state.add_metric([str(job_type), state.name.lower()], value)
            yield by_state
            yield GaugeMetricFamily("tuberunner_coordinator_runners", "Registered runners", counts.runners)
            by_live_state = GaugeMetricFamily(
                "tuberunner_coordinator_lives", "Live videos by state", labels=["state"]
            )
            for live_state in LIVE_STATES:
                by_live_state.add_metric([live_state], counts.lives.get(live_state, 0))
            yield by_live_state
        unclaimed = GaugeMetricFamily(
            "tuberunner_coordinator_unclaimed_jobs",
            "Pending jobs whose type no connected runner has taken for the unclaimed wait, by type",
            labels=["job_type"],
        )
        for job_type in JobType:
            unclaimed.add_metric([str(job_type)], coordinator.claims.counts.get(str(job_type), 0))
        yield unclaimed
        yield CounterMetricFamily(
            "tuberunner_coordinator_builtin_storyboards",
            "Storyboards no connected runner took, made by this coordinator process itself",
            coordinator.storyboards.made,
        )
        yield from _live_metrics(coordinator)
        yield GaugeMetricFamily(
            "tuberunner_coordinator_runner_sockets",
            "Runner sockets open on this process",
            len(coordinator.notifier.namespace.runner_of_sid),
        )
        yield CounterMetricFamily(
            "tuberunner_coordinator_lease_expiries",
            "Processing jobs taken back by this process because their lease expired",
            coordinator.jobs.lease_expiries_total,
        )
        yield CounterMetricFamily(
            "tuberunner_coordinator_pings_sent",
            "available-jobs pings sent to runner sockets",
            getattr(coordinator.notifier, "pings_sent", 0),
        )
        yield CounterMetricFamily(
            "tuberunner_coordinator_leftover_cleanups",
            "Half-received uploads of an earlier process removed at start",
            ops.leftovers_removed,
        )
        yield GaugeMetricFamily(
            "tuberunner_coordinator_event_loop_lag_seconds",
            "How late the loop monitor's last tick woke up",
            ops.loop_monitor.lag_s,
        )


def _live_metrics(coordinator: Coordinator) -> Iterator[Metric]:
    live = coordinator.live
    counters = live.counters
    relay = live.relay
    if relay is not None:
        yield GaugeMetricFamily(
            "tuberunner_coordinator_live_publishers_connected",
            "RTMP publishers streaming to this process",
            sum(1 for stream in relay.streams.values() if stream.publisher is not None),
        )
        publishers = CounterMetricFamily(
            "tuberunner_coordinator_live_publishers",
            "RTMP publishers by outcome (refused: wrong stream key, ended live, one already streaming)",
            labels=["outcome"],
        )
        publishers.add_metric(["accepted"], relay.counters.publishers_accepted)
        publishers.add_metric(["refused"], relay.counters.publishers_refused)
        yield publishers
        pulls = CounterMetricFamily(
            "tuberunner_coordinator_live_pulls",
            "RTMP pulls of runners by outcome (refused: not the URL of a held job; dropped: fell behind)",
            labels=["outcome"],
        )
        pulls.add_metric(["accepted"], relay.counters.players_accepted)
        pulls.add_metric(["refused"], relay.counters.players_refused)
        pulls.add_metric(["dropped"], relay.counters.players_dropped)
        yield pulls
    yield CounterMetricFamily(
        "tuberunner_coordinator_live_segments_received",
        "Live segments runners delivered that were listed in a playlist",
        counters.segments_received,
    )
    yield CounterMetricFamily(
        "tuberunner_coordinator_live_updates_refused",
        "Live chunk updates refused for their content",
        counters.updates_refused,
    )
    yield CounterMetricFamily(
        "tuberunner_coordinator_live_jobs_created",
        "Live jobs created (a session's first, and each one replacing a lost or failed job)",
        counters.jobs_created,
    )
    buckets: list[tuple[str, float]] = []
    total = 0
    for bound, count in zip((*LAG_BUCKETS, float("inf")), counters.lag_buckets, strict=True):
        total += count
        buckets.append(("+Inf" if bound == float("inf") else str(bound), total))
    lag = HistogramMetricFamily(
        "tuberunner_coordinator_live_lag_seconds",
        "Live lag as the coordinator sees it: wall clock when a segment is listed minus the end of the"
        " segment (its EXT-X-PROGRAM-DATE-TIME plus its duration)",
    )
    lag.add_metric([], buckets, sum_value=counters.lag_sum_s)
    yield lag
    last = GaugeMetricFamily(
        "tuberunner_coordinator_live_last_lag_seconds",
        "Lag of the newest segment of each open live",
        labels=["video"],
    )
    for video_uuid, value in counters.last_lag_s.items():
        last.add_metric([video_uuid], value)
    yield last


# ------------------------------------------------------------------------------------------ routes


def ops_of(request: Request) -> CoordinatorOps:
    ops: CoordinatorOps = request.app.state.ops
    return ops


def _report(report: HealthReport) -> Response:
    return JSONResponse(
        report.as_json(), status_code=report.status_code, headers={"Cache-Control": "no-store"}
    )


async def _healthz(request: Request) -> Response:
    return _report(ops_of(request).liveness())


async def _readyz(request: Request) -> Response:
    return _report(await ops_of(request).readiness())


async def _metrics(request: Request) -> Response:
    body = await ops_of(request).exposition()
    return Response(body, media_type=CONTENT_TYPE, headers={"Cache-Control": "no-store"})


routes = [
    Route("/healthz", _healthz, methods=["GET", "HEAD"]),
    Route("/readyz", _readyz, methods=["GET", "HEAD"]),
    Route("/metrics", _metrics, methods=["GET", "HEAD"]),
]


class JobLogContext:
    """Binds `job_id` for requests about one job (`/api/v1/runners/jobs/<uuid>/...`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "") if scope["type"] == "http" else ""
        if path.startswith(_JOBS_PATH):
            job_uuid = path[len(_JOBS_PATH) :].partition("/")[0]
            if job_uuid and job_uuid != "request":
                with logs.bound(job_id=job_uuid):
                    await self.app(scope, receive, send)
                return
        await self.app(scope, receive, send)
