"""The job supervisor: one TaskGroup owning every long-lived task of the daemon (STYLE lessons 4-6, 10).

    Supervisor.run ── TaskGroup
        ├── per instance: check loop (poll + wake-ups) and socket notifier
        ├── per job: the job task (inside one AsyncExitStack) and its heartbeat
        ├── status-file writer, config-file watcher
        └── fate reports (shielded from the job task's cancellation, bounded by a deadline)

Discovery. Each instance has its own check loop and deadlines, so an unreachable, slow or rejecting
instance delays no other. A loop wakes on a jittered poll timer, on socket (re)connections and pings, and
when a slot frees up; a wake-up during a check sets the event again and causes one more check afterwards
(coalesced, never dropped). `unknown_runner_token` flags the instance (config file, status, ERROR log) and
stops its loops; the other instances go on.

Jobs. Each job is a `JobRun` with a `JobPhase`; `JobRun.cancel(reason)` records a `CancelReason` before
cancelling its task, and the end of the task reads that value to decide the report:

    processor returns ─► result moved to the outbox (slot freed) ─► delivered (runner/delivery.py) ─► done
    processor raises  ─► error with its message (JobGone: nothing to report, the job is not ours)
    cancel(GONE | LEASE_EXPIRED) ─► nothing to report: the server already took the job back
    cancel(SHUTDOWN | INSTANCE_REMOVED) ─► abort, so the server hands the job out again at once;
                          except a result waiting in the outbox at shutdown: kept for the next start

The job's heartbeat runs from the accept until its fate is settled, delivery included. The job's exit stack
releases the inputs and deletes the work folder once the result is in the outbox (or the job ended): the
slot is free while the result waits. Results waiting for one instance bound what it is asked for: no new
job from it while it has `concurrency` results waiting (they sit on the work folder's disk, which
`min_free_disk_bytes` guards). At start, the outbox is read back: each result of a registration still
configured is delivered, the others are dropped with a log line. Reports of errors and aborts run
shielded, with `report_deadline_s`.

A job whose server cannot be reached goes on (see runner/heartbeat.py): a server that is down re-queues
nothing, so finishing the work and delivering it when the server is back saves a second transcode. During
a network cut the server does re-queue it (after its lease) and another runner works on it; the first call
that gets through then answers 404 and the job (or its waiting result) is dropped at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import re
import shutil
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager, nullcontext
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, Protocol

import httpx

from tuberunner.ops import logs
from tuberunner.ops.health import LoopMonitor
from tuberunner.ops.metrics import RunnerMetrics
from tuberunner.ops.sd_notify import SystemdNotifier
from tuberunner.protocol.jobs import JobType
from tuberunner.runner.client import AvailableJob, InstanceClient, client_for
from tuberunner.runner.config import InstanceConfig, RunnerConfig
from tuberunner.runner.delivery import Delivery
from tuberunner.runner.encode_cache import EncodeCache
from tuberunner.runner.errors import (
    JobGone,
    RequestRejected,
    RunnerError,
    RunnerUnknown,
    TransientError,
)
from tuberunner.runner.heartbeat import Heartbeat, Loss
from tuberunner.runner.job import (
    AcceptedJob,
    InputFetcher,
    JobContext,
    LiveChunkUpdate,
    ProcessingSettings,
    Processor,
)
from tuberunner.runner.notifier import SocketNotifier
from tuberunner.runner.outbox import Outbox, OutboxEntry
from tuberunner.runner.retry import RetryPolicy
from tuberunner.runner.state import DaemonState, ErrorRecord, InstanceStatus, JobStatus, write_state
from tuberunner.runner.transfers import DownloadLimits, InputDownloader, resource_of

__all__ = [
    "CancelReason",
    "ClientFactory",
    "InputsFactory",
    "InstanceWorker",
    "JobClients",
    "JobOutcome",
    "JobPhase",
    "JobRun",
    "Supervisor",
    "SupportCheck",
    "default_client",
    "describe_failure",
    "direct_inputs",
]

log = logging.getLogger(__name__)

# How many recent errors the status file keeps.
_ERRORS_KEPT = 20
# Refused job uuids remembered per instance so each refusal is logged once, not on every poll.
_REFUSALS_KEPT = 1000
# The tail of a failure's stderr appended to an `error` message.
_STDERR_LINES = 20
# How much of a failed job's message the status file keeps (the log has it whole).
_ERROR_RECORD_CHARS = 2000
# Longest pause between two ticks of the loop monitor (liveness, loop lag, systemd's watchdog).
_TICK_S = 1.0
_SAFE_NAME = re.compile(r"^[A-Za-z0-9-]{1,64}$")


class JobPhase(StrEnum):
    ACCEPTED = "accepted"
    RUNNING = "running"
    # Moving the result into the outbox: a cancellation is recorded, and acted on once it is stored.
    STORING = "storing"
    # The result waits in the outbox or is being uploaded; the job holds no slot any more.
    DELIVERING = "delivering"
    # Cleaning up and reporting: cancellation is refused from here on.
    FINISHING = "finishing"
    DONE = "done"


class JobOutcome(StrEnum):
    """How a job ended here (the `outcome` label of the jobs metrics)."""

    SUCCEEDED = "succeeded"
    # The work failed: reported to the server with the message.
    ERRORED = "errored"
    # The server took the job back (deleted, cancelled, re-queued, runner unknown): nothing to report.
    GONE = "gone"
    # No update could be delivered for longer than the lease: given up.
    LEASE_LOST = "lease_lost"
    # Stopped here (shutdown, instance removed) and given back to the server.
    ABORTED = "aborted"
    # Stopped at once with the daemon (second SIGINT): the server takes it back when its lease expires.
    CANCELLED = "cancelled"
    # Stopped with the daemon while its result waited: the result is delivered after the next start.
    KEPT = "kept"


class CancelReason(Enum):
    GONE = "the server took the job back"
    LEASE_EXPIRED = "no update could be delivered for longer than the lease"
    SHUTDOWN = "Runner stopped"
    INSTANCE_REMOVED = "its instance was removed from the configuration"

    @property
    def aborts_on_server(self) -> bool:
        """The server still thinks the job is ours: give it back so it is re-queued at once."""
        return self in (CancelReason.SHUTDOWN, CancelReason.INSTANCE_REMOVED)


_CANCELLABLE = frozenset({JobPhase.ACCEPTED, JobPhase.RUNNING, JobPhase.STORING, JobPhase.DELIVERING})


# ------------------------------------------------------------------------------------------ parts


SupportCheck = Callable[[JobType, Mapping[str, Any]], "str | None"]
ClientFactory = Callable[[InstanceConfig, RunnerConfig], InstanceClient]


class InputsFactory(Protocol):
    """The input fetcher of one job, released when the job ends (cache references, partial files)."""

    def __call__(self, job: AcceptedJob, work_dir: Path) -> AbstractAsyncContextManager[InputFetcher]: ...


class JobClients:
    """Which client holds each running job: the `InputSource` for downloads (each job downloads with its
    own instance's client and tokens, even when several registrations share one URL)."""

    def __init__(self) -> None:
        self._by_job: dict[str, InstanceClient] = {}
        # Body bytes received by every input download (read by the metrics at scrape time).
        self.downloaded_bytes = 0

    def add(self, job: AcceptedJob, client: InstanceClient) -> None:
        self._by_job[job.uuid] = client

    def remove(self, job: AcceptedJob) -> None:
        self._by_job.pop(job.uuid, None)

    @asynccontextmanager
    async def open_input(self, url: str, job: AcceptedJob, offset: int) -> AsyncIterator[httpx.Response]:
        client = self._by_job.get(job.uuid)
        if client is None:
            raise JobGone(f"job {job.uuid} is not running here any more")
        async with client.open_input(url, job, offset) as response:
            try:
                yield response
            finally:
                self.downloaded_bytes += response.num_bytes_downloaded


def direct_inputs(clients: JobClients, limits: DownloadLimits | None = None) -> InputsFactory:
    """Inputs downloaded into the job's own folder (no cache shared between jobs)."""

    def factory(job: AcceptedJob, work_dir: Path) -> AbstractAsyncContextManager[InputFetcher]:
        return nullcontext(InputDownloader(clients, job, work_dir, limits))

    return factory


def default_client(instance: InstanceConfig, config: RunnerConfig) -> InstanceClient:
    return client_for(instance.url, instance.runner_token, config)


def describe_failure(exc: BaseException) -> str:
    """The `error` message for a failed job: our classes' message, else `Type: message`; plus the tail of
    the process's stderr when the exception carries one and the message does not quote it already."""
    message = exc.message if isinstance(exc, RunnerError) else f"{type(exc).__name__}: {exc}"
    tail = getattr(exc, "stderr_tail", None)
    if isinstance(tail, str) and tail.strip():
        lines = [line for line in tail.strip().splitlines() if line.strip()][-_STDERR_LINES:]
        if lines and lines[-1].strip() not in message:
            message += "\n--- last lines of stderr ---\n" + "\n".join(lines)
    return message


# ------------------------------------------------------------------------------------------ state


@dataclass(eq=False)
class InstanceWorker:
    """One registered instance: its client, status, wake-up event and loops."""

    config: InstanceConfig
    client: InstanceClient
    status: InstanceStatus
    wake_event: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    notifier: SocketNotifier | None = None
    refused: dict[str, None] = field(default_factory=dict)
    # Checks completed without error.
    checks: int = 0
    # Socket connections made (the first one is not a reconnection).
    socket_connections: int = 0

    def wake(self, reason: str) -> None:
        log.debug("%s: wake-up (%s)", self.config.url, reason)
        self.wake_event.set()

    def contact(self) -> None:
        self.status.last_contact_at = time.time()
        self.status.reachable = True

    def unreachable(self, message: str) -> None:
        self.status.reachable = False
        self.error(message)

    def error(self, message: str) -> None:
        self.status.last_error = message
        self.status.last_error_at = time.time()


@dataclass(eq=False)
class JobRun:
    """Everything about one accepted job; `phase` and `cancel_reason` are the only state to read."""

    job: AcceptedJob
    worker: InstanceWorker
    work_dir: Path
    started_at: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.monotonic)
    phase: JobPhase = JobPhase.ACCEPTED
    progress: float | None = None
    # ffmpeg's last reported speed (media seconds per wall second).
    speed: float | None = None
    cancel_reason: CancelReason | None = None
    cancel_detail: str = ""
    outcome: str = ""
    outcome_kind: JobOutcome | None = None
    # The whole `error` message of a job that failed (with the tail of ffmpeg's stderr).
    failure: str | None = None
    task: asyncio.Task[None] | None = None
    heartbeat: Heartbeat | None = None
    report_task: asyncio.Task[None] | None = None
    # The result in the outbox, once stored (or found there at start), and its delivery.
    entry: OutboxEntry | None = None
    delivery: Delivery | None = None
    _progress_origin: tuple[float, float] | None = None

    @property
    def client(self) -> InstanceClient:
        return self.worker.client

    @property
    def holds_slot(self) -> bool:
        """A job holds a processing slot until its result is in the outbox (or its end is reported)."""
        return self.entry is None

    @property
    def is_live(self) -> bool:
        """Lives have slots of their own (`[jobs] live_concurrency`): they never wait behind VOD work."""
        return self.job.type is JobType.LIVE_RTMP_HLS

    def cancel(self, reason: CancelReason, detail: str = "") -> bool:
        """Record why, then cancel the job task. Refused once the job is finishing or already cancelled.
        While its result is being stored the reason is only recorded: the job acts on it once the result
        is in the outbox (a shutdown keeps it there, the job gone drops it)."""
        if self.cancel_reason is not None or self.phase not in _CANCELLABLE:
            return False
        self.cancel_reason = reason
        self.cancel_detail = detail
        if self.task is not None and self.phase is not JobPhase.STORING:
            self.task.cancel()
        return True

    def report_progress(self, value: float | None) -> None:
        if value is None:
            self.progress = None
            return
        value = min(max(float(value), 0.0), 100.0)
        if self._progress_origin is None or value < self._progress_origin[1]:
            self._progress_origin = (time.monotonic(), value)
        self.progress = value

    def eta_s(self) -> float | None:
        if self.progress is None or self._progress_origin is None:
            return None
        since, first = self._progress_origin
        done = self.progress - first
        if done <= 0:
            return None
        return (time.monotonic() - since) * (100.0 - self.progress) / done

    def status(self) -> JobStatus:
        return JobStatus(
            uuid=self.job.uuid,
            type=str(self.job.type),
            instance_url=self.job.instance_url,
            phase=str(self.phase),
            started_at=self.started_at,
            progress=self.progress,
            speed=self.speed,
            eta_s=self.eta_s(),
        )


class _HardStop(Exception):
    """Raised inside the TaskGroup to tear everything down at once (second SIGINT)."""


# ------------------------------------------------------------------------------------------ supervisor


class Supervisor:
    def __init__(
        self,
        config: RunnerConfig,
        *,
        work_dir: Path,
        processors: Mapping[JobType, Processor],
        supports: SupportCheck,
        settings: ProcessingSettings,
        runner_id: str = "default",
        version: str = "0.0.0",
        job_clients: JobClients | None = None,
        inputs: InputsFactory | None = None,
        client_factory: ClientFactory = default_client,
        state_file: Path | None = None,
        reload_config: Callable[[], RunnerConfig | None] | None = None,
        flag_instance: Callable[[InstanceConfig], None] | None = None,
        retry: RetryPolicy | None = None,
        metrics: RunnerMetrics | None = None,
        systemd: SystemdNotifier | None = None,
        encodes: EncodeCache | None = None,
        holds_video: Callable[[str, str], bool] | None = None,
        outbox_dir: Path | None = None,
    ) -> None:
        self.config = config
        self.work_dir = work_dir
        # Results waiting for their server, next to the job folders (same disk: moved by a rename).
        self.outbox = Outbox(outbox_dir or work_dir.with_name(f"{work_dir.name}.outbox"))
        self.processors = dict(processors)
        self.supports = supports
        self.settings = settings
        self.runner_id = runner_id
        self.version = version
        self.job_clients = job_clients or JobClients()
        self.inputs = inputs or direct_inputs(self.job_clients)
        self.client_factory = client_factory
        self.state_file = state_file
        self.reload_config = reload_config
        self.flag_instance = flag_instance
        self.metrics = metrics or RunnerMetrics()
        self.retry = retry or RetryPolicy(observer=self.metrics)
        self.systemd = systemd or SystemdNotifier(None)
        self.encodes = encodes
        # Whether this runner holds inputs or encodes of (instance URL, video UUID): such offers go first.
        self.holds_video = holds_video
        watchdog_s = self.systemd.watchdog_interval_s
        self.loop_monitor = LoopMonitor(
            min(_TICK_S, watchdog_s / 2) if watchdog_s else _TICK_S, on_tick=self.systemd.watchdog
        )
        # Where the daemon serves /healthz, /readyz and /metrics (shown by `status`), if it does.
        self.endpoint_url: str | None = None
        self.leftovers_removed = 0
        self.workers: dict[tuple[str, str], InstanceWorker] = {}
        self.jobs: dict[str, JobRun] = {}
        self.finished: deque[JobRun] = deque(maxlen=100)
        self.errors: deque[ErrorRecord] = deque(maxlen=_ERRORS_KEPT)
        self.started_at = time.time()
        self.draining = False
        # Slots promised to accepts under way: (VOD, live).
        self._reserved = [0, 0]
        self._retired_clients: list[InstanceClient] = []
        self._tg: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self._hard_stop = asyncio.Event()
        self._dirty = asyncio.Event()
        self._changes: asyncio.Future[None] | None = None
        self._disk_low = False
        self._check_job_types()
        self.metrics.watch(self)

    # -------------------------------------------------------------------- lifetime

    def _check_job_types(self) -> None:
        """Validate the table at start (lesson 11): an enabled type without processor is a setup error."""
        enabled = self.config.enabled_job_types
        if enabled is not None:
            missing = sorted(t.value for t in enabled if t not in self.processors)
            if missing:
                raise ValueError(f"no processor for enabled job type(s): {', '.join(missing)}")
        if not self.job_types():
            raise ValueError("no job type is both enabled and supported: nothing to do")

    def request_stop(self) -> None:
        """SIGTERM (and a first SIGINT): drain, then abort what is left. Safe to call from a signal
        handler and more than once."""
        self._stop.set()

    def interrupt(self) -> None:
        """SIGINT: the first one drains like SIGTERM, the second one stops at once."""
        if self._stop.is_set():
            self._hard_stop.set()
        self._stop.set()

    async def run(self) -> bool:
        """Run until stopped; False when stopped at once by a second interrupt."""
        logs.bind(runner=self.runner_id)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.sweep_work_dir()
        waiting = self._load_outbox()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                services = [
                    tg.create_task(self._hard_stop_watch(), name="hard-stop"),
                    tg.create_task(self._state_loop(), name="status-file"),
                    tg.create_task(self._config_loop(), name="config-watch"),
                    tg.create_task(self.loop_monitor.run(), name="loop-monitor"),
                ]
                for instance in self.config.instances:
                    self._start_worker(instance)
                self._resume_outbox(waiting)
                self.systemd.ready(f"{len(self.workers)} instance(s), {self.config.concurrency} slot(s)")
                await self._stop.wait()
                await self._shutdown()
                for task in services:
                    task.cancel()
        except* _HardStop:
            log.warning(
                "stopped at once: %d job(s) were cancelled without telling their server", len(self.jobs)
            )
        finally:
            self._tg = None
            self._write_state()
            for client in [*(w.client for w in self.workers.values()), *self._retired_clients]:
                await client.aclose()
        return not self._hard_stop.is_set()

    def sweep_work_dir(self) -> None:
        """Leftovers of a crashed run: folders of jobs no process works on (we hold the pid lock)."""
        for leftover in self.work_dir.iterdir():
            log.info("removing %s, left over by an earlier run", leftover)
            self.leftovers_removed += 1
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)

    async def _hard_stop_watch(self) -> None:
        await self._hard_stop.wait()
        raise _HardStop

    async def _shutdown(self) -> None:
        """Ordered, bounded phases: stop taking work, drain, abort the rest in parallel, await them."""
        self.draining = True
        self.systemd.stopping(f"draining {len(self.jobs)} job(s)")
        self._changed()
        for worker in self.workers.values():
            for task in worker.tasks:
                task.cancel()
        lives = [run for run in self.jobs.values() if run.is_live]
        if lives:
            # A live never finishes by itself: given back at once, so that another runner can take it over.
            log.info("stopping: giving back %d live job(s) now", len(lives))
            for run in lives:
                run.cancel(CancelReason.SHUTDOWN)
        if not self.jobs:
            log.info("stopping: no job is running and no result is waiting")
        else:
            log.info(
                "stopping: no new jobs; %d running job(s) get %.0f s to finish (SIGINT again: stop at once)",
                len(self.jobs),
                self.config.shutdown_grace_s,
            )
            if not await self.wait_for(lambda: not self.jobs, self.config.shutdown_grace_s):
                log.warning("aborting %d job(s) still running on their servers", len(self.jobs))
                for run in list(self.jobs.values()):
                    run.cancel(CancelReason.SHUTDOWN)
                # Each job task reports its own abort: they run in parallel. Waiting results stay in the
                # outbox for the next start.
                if not await self.wait_for(lambda: not self.jobs, self.config.report_deadline_s + 5):
                    log.error("%d job(s) did not end; cancelling them", len(self.jobs))
                    for run in list(self.jobs.values()):
                        for stuck in (run.report_task, run.task):
                            if stuck is not None:
                                stuck.cancel()
        log.info("stopped")

    # -------------------------------------------------------------------- changes

    def _changed(self) -> None:
        """Something visible changed: wake `wait_for` callers and the status writer."""
        self._dirty.set()
        if self._changes is not None and not self._changes.done():
            self._changes.set_result(None)
        self._changes = None

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float | None = None) -> bool:
        """Wait until `predicate()` holds (checked after every change); False on timeout."""
        try:
            async with asyncio.timeout(timeout_s):
                while not predicate():
                    if self._changes is None:
                        self._changes = asyncio.get_running_loop().create_future()
                    await asyncio.shield(self._changes)
        except TimeoutError:
            return False
        return True

    def wake_all(self, reason: str) -> None:
        for worker in self.workers.values():
            worker.wake(reason)

    def record_error(self, where: str, message: str) -> None:
        self.errors.append(ErrorRecord(time.time(), where, message))
        self._changed()

    # -------------------------------------------------------------------- instances

    def _start_worker(
        self, instance: InstanceConfig, previous: InstanceStatus | None = None
    ) -> InstanceWorker:
        assert self._tg is not None
        status = InstanceStatus(
            url=instance.url,
            runner_name=instance.runner_name,
            registration="needs-registration" if instance.needs_registration else "registered",
        )
        if previous is not None:  # the same registration, restarted: its history stays visible
            status.last_contact_at = previous.last_contact_at
            status.last_error, status.last_error_at = previous.last_error, previous.last_error_at
        worker = InstanceWorker(instance, self.client_factory(instance, self.config), status)
        self.workers[instance.key] = worker
        if instance.needs_registration:
            log.error(
                "%s does not know runner %r any more: not polling it. Register again with "
                "`tuberunner register --url %s --runner-name %s --registration-token <new token>`",
                instance.url,
                instance.runner_name,
                instance.url,
                instance.runner_name,
            )
            return worker
        name = f"{instance.url}#{instance.runner_name}"
        with logs.bound(instance=instance.url):  # the worker's tasks inherit it
            self._start_worker_tasks(worker, name)
        self._changed()
        return worker

    def _start_worker_tasks(self, worker: InstanceWorker, name: str) -> None:
        assert self._tg is not None
        instance = worker.config
        worker.tasks.append(self._tg.create_task(self._check_loop(worker), name=f"check {name}"))
        if self.config.socket_enabled:
            worker.notifier = notifier = SocketNotifier(
                instance.url,
                instance.runner_token,
                wake=worker.wake,
                on_connection=lambda connected, reason: self._on_socket(worker, connected, reason),
                on_jobs_taken_back=lambda: self._recheck_jobs(worker),
                connect_timeout_s=self.config.connect_timeout_s,
                retry_max_s=self.config.socket_retry_max_s,
            )
            worker.tasks.append(
                self._tg.create_task(_logged(notifier.run(), f"socket of {name}"), name=f"socket {name}")
            )

    def _on_socket(self, worker: InstanceWorker, connected: bool, reason: str | None) -> None:
        was_connected = worker.status.socket_connected
        worker.status.socket_connected = connected
        if reason and not connected:
            worker.error(reason)
        if connected and not was_connected:
            worker.socket_connections += 1
            if worker.socket_connections > 1:
                self.metrics.socket_reconnects.labels(worker.config.url).inc()
            # After a reconnection, check at once that every job we hold is still ours.
            self._recheck_jobs(worker)
        elif was_connected and not connected:
            # Is the instance down, or only the socket? A check tells (readiness follows its answer).
            worker.wake("socket disconnected")
            # Take-backs cannot reach us now: the heartbeats check at the short interval from now on.
            self._recheck_jobs(worker)
        self._changed()

    def _update_interval_s(self, worker: InstanceWorker) -> float:
        """The heartbeat is also how a job deleted on the server is noticed: often on a server that would
        not tell us (PeerTube), at the progress pace on one whose push can reach us now."""
        pushed = worker.status.socket_connected and worker.client.pushes_taken_back
        if pushed:
            return self.config.update_interval_s
        return min(self.config.check_interval_s, self.config.update_interval_s)

    def _recheck_jobs(self, worker: InstanceWorker) -> None:
        """Send the next heartbeat of every job held from `worker` now: its answer says if it is ours."""
        for run in self.jobs.values():
            if run.worker is worker and run.heartbeat is not None:
                run.heartbeat.poke()

    def _retire_worker(self, worker: InstanceWorker, *, removed: bool) -> None:
        for task in worker.tasks:
            task.cancel()
        del self.workers[worker.config.key]
        # Running jobs keep using the old client (and token) until they end.
        self._retired_clients.append(worker.client)
        if removed:
            for run in list(self.jobs.values()):
                if run.worker is worker:
                    run.cancel(CancelReason.INSTANCE_REMOVED)

    def apply_config(self, config: RunnerConfig) -> None:
        """A changed config file: start, stop or restart instance loops; other settings apply to new jobs
        and the next checks (ffmpeg settings need a restart)."""
        old = self.config
        self.config = config
        if (old.ffmpeg_path, old.ffmpeg_threads, old.ffmpeg_nice) != (
            config.ffmpeg_path,
            config.ffmpeg_threads,
            config.ffmpeg_nice,
        ):
            log.warning("ffmpeg settings changed in the config file: restart the daemon to apply them")
        previous: dict[tuple[str, str], InstanceStatus] = {}
        for key, worker in list(self.workers.items()):
            instance = config.instance(*key)
            if instance != worker.config:
                log.info("%s (%s) %s", key[0], key[1], "removed" if instance is None else "changed")
                self._retire_worker(worker, removed=instance is None)
                previous[key] = worker.status
        if not self.draining:
            for instance in config.instances:
                if instance.key not in self.workers:
                    if instance.key not in previous:
                        log.info("%s (%s) added", instance.url, instance.runner_name)
                    self._start_worker(instance, previous.get(instance.key))
        self.wake_all("configuration changed")
        self._changed()

    def job_types(self) -> frozenset[str]:
        enabled = self.config.enabled_job_types
        return frozenset(
            str(t)
            for t in self.processors
            if (enabled is None or t in enabled)
            and (t is not JobType.LIVE_RTMP_HLS or self.config.live_concurrency > 0)
        )

    def free_slots(self, *, live: bool = False) -> int:
        """Free slots for VOD jobs (every type but live), or for lives."""
        busy = sum(1 for run in self.jobs.values() if run.holds_slot and run.is_live == live)
        limit = self.config.live_concurrency if live else self.config.concurrency
        return limit - busy - self._reserved[live]

    def waiting_results(self, worker: InstanceWorker) -> int:
        return sum(
            1
            for run in self.jobs.values()
            if run.entry is not None and run.worker.config.key == worker.config.key
        )

    def _wanted_types(self, worker: InstanceWorker) -> frozenset[str]:
        """The job types there is a free slot for; none while `worker`'s instance already has `concurrency`
        results waiting: a server that hands out jobs but cannot take results back gets no more work until
        it does."""
        waiting = self.waiting_results(worker)
        if waiting >= self.config.concurrency:
            log.debug("%s: not asking for jobs, %d results wait for it", worker.config.url, waiting)
            return frozenset()
        live = str(JobType.LIVE_RTMP_HLS)
        types = self.job_types()
        if self.free_slots() <= 0:
            types &= {live}
        if self.free_slots(live=True) <= 0:
            types -= {live}
        return types

    def _poll_delay_s(self, failures: int) -> float:
        jitter = self.config.poll_jitter
        delay = self.config.poll_interval_s * random.uniform(1 - jitter, 1 + jitter)
        if failures:
            # A failing instance is retried sooner at first, then at the poll pace.
            delay = min(delay, max(self.retry.delay(failures), 0.05))
        return delay

    async def _check_loop(self, worker: InstanceWorker) -> None:
        failures = 0
        while not self.draining:
            worker.wake_event.clear()  # a wake-up from now on causes one more check
            try:
                await self._check(worker)
                failures = 0
                worker.checks += 1
                self._changed()
            except RunnerUnknown as exc:
                self.metrics.gave_up(exc)
                await self._needs_registration(worker, exc)
                return
            except RunnerError as exc:
                failures += 1
                self.metrics.retrying(exc)
                worker.unreachable(exc.message)
                log.warning("%s: %s", worker.config.url, exc.message)
                self._changed()
            except Exception as exc:  # a bug here must not stop the other instances
                failures += 1
                self.metrics.retrying(exc)
                worker.unreachable(f"{type(exc).__name__}: {exc}")
                log.exception("%s: job check failed", worker.config.url)
            try:
                async with asyncio.timeout(self._poll_delay_s(failures)):
                    await worker.wake_event.wait()
            except TimeoutError:
                pass

    async def _check(self, worker: InstanceWorker) -> None:
        """Ask for jobs and accept as many as there are free slots; a pass that took nothing ends it."""
        while (wanted := self._wanted_types(worker)) and not self.draining:
            if not self._disk_has_room():
                return
            offers = await worker.client.request_jobs(wanted, self.version)
            worker.contact()
            took = False
            for offer in self._by_preference(worker, offers):
                if not self._wanted_types(worker) or self.draining:
                    return
                with logs.bound(job_id=offer.uuid, job_type=offer.type):
                    took = await self._take(worker, offer) or took
            if not took:
                return

    def _by_preference(self, worker: InstanceWorker, offers: list[AvailableJob]) -> list[AvailableJob]:
        """Offers of a video whose inputs or encodes this runner holds first (no download, maybe no
        encode), then in the server's order (its priorities)."""
        holds = self.holds_video
        if holds is None:
            return offers

        def held(offer: AvailableJob) -> bool:
            found = _video_of(offer.payload)
            return found is not None and holds(worker.config.url, found)

        return sorted(offers, key=lambda offer: not held(offer))

    async def _take(self, worker: InstanceWorker, offer: AvailableJob) -> bool:
        """Accept `offer` and start its job, unless we cannot take it or lose the race."""
        if offer.uuid in self.jobs or self._refused(worker, offer):
            return False
        if offer.type not in self._wanted_types(worker):
            return False  # no free slot of its kind (a server that ignores `jobTypes` offers it anyway)
        live = offer.type == JobType.LIVE_RTMP_HLS
        self._reserved[live] += 1
        try:
            job = await worker.client.accept(offer.uuid)
        except JobGone as exc:
            log.debug("job %s taken by another runner: %s", offer.uuid, exc.message)
            return False
        except RequestRejected as exc:
            # Usually a lost race too: PeerTube answers 400 "not in pending state" without a code.
            log.info("job %s not taken: %s", offer.uuid, exc.message)
            return False
        except TransientError as exc:
            # It may have been accepted anyway: then its lease brings it back to the queue.
            log.warning("accepting job %s failed: %s", offer.uuid, exc.message)
            return False
        finally:
            self._reserved[live] -= 1
        worker.contact()
        self._start_job(worker, job)
        return True

    def _refused(self, worker: InstanceWorker, offer: AvailableJob) -> bool:
        """Whether we cannot take `offer`; each refusal is logged once (never dropped silently)."""
        reason: str | None
        level = logging.WARNING
        try:
            job_type = JobType(offer.type)
        except ValueError:
            reason = f"unknown job type {offer.type!r}"
        else:
            if str(job_type) not in self.job_types():
                # Only servers without the `jobTypes` filter (PeerTube 6.x) offer these: not worth a warning.
                reason, level = f"job type {offer.type} is not enabled here", logging.INFO
            else:
                try:
                    reason = self.supports(job_type, offer.payload)
                except Exception as exc:
                    reason = f"payload check failed: {type(exc).__name__}: {exc}"
        if reason is None:
            return False
        if offer.uuid not in worker.refused:
            worker.refused[offer.uuid] = None
            if len(worker.refused) > _REFUSALS_KEPT:
                del worker.refused[next(iter(worker.refused))]
            log.log(level, "%s: not taking job %s: %s", worker.config.url, offer.uuid, reason)
        return True

    def _disk_has_room(self) -> bool:
        try:
            free = shutil.disk_usage(self.work_dir).free
        except OSError as exc:
            free, detail = 0, f"cannot read free space of {self.work_dir}: {exc}"
        else:
            detail = f"{free / 1024**3:.1f} GiB free in {self.work_dir}"
        low = free < self.config.min_free_disk_bytes
        if low and not self._disk_low:
            message = (
                f"not accepting jobs: {detail}, less than the "
                f"{self.config.min_free_disk_bytes / 1024**3:.1f} GiB required (jobs.min_free_disk_bytes); "
                "trying again later"
            )
            log.warning("%s", message)
            self.record_error("disk", message)
        elif not low and self._disk_low:
            log.info("enough disk space again (%s): accepting jobs", detail)
        self._disk_low = low
        return not low

    async def _needs_registration(self, worker: InstanceWorker, exc: RunnerError) -> None:
        instance = worker.config
        worker.status.registration = "needs-registration"
        worker.error(exc.message)
        message = (
            f"{instance.url} no longer knows runner {instance.runner_name!r} ({exc.message}). This "
            "instance is not polled any more; the others go on. Register again: tuberunner register "
            f"--url {instance.url} --runner-name {instance.runner_name} "
            "--registration-token <token from the instance admin>"
        )
        log.error("%s", message)
        self.record_error(instance.url, message)
        for task in worker.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        if self.flag_instance is not None:
            try:
                await asyncio.to_thread(self.flag_instance, instance)
            except Exception as flag_error:  # the status file still shows it
                log.error("could not flag %s in the config file: %s", instance.url, flag_error)

    # -------------------------------------------------------------------- jobs

    def _start_job(self, worker: InstanceWorker, job: AcceptedJob, entry: OutboxEntry | None = None) -> None:
        assert self._tg is not None
        folder = job.uuid if _SAFE_NAME.match(job.uuid) else hashlib.sha256(job.uuid.encode()).hexdigest()
        run = JobRun(job=job, worker=worker, work_dir=self.work_dir / folder, entry=entry)
        if entry is not None:
            run.phase = JobPhase.DELIVERING
        self.jobs[job.uuid] = run
        self.job_clients.add(job, worker.client)
        # The job's task, and every task it starts, logs with the job id and its instance.
        with logs.bound(job_id=job.uuid, job_type=str(job.type), instance=job.instance_url):
            run.task = self._tg.create_task(self._run_job(run), name=f"job {job.uuid}")
            if entry is None:
                log.info("job %s (%s) accepted from %s", job.uuid, job.type, worker.config.url)
            else:
                log.info("job %s (%s): delivering its result to %s", job.uuid, job.type, worker.config.url)
        self._changed()

    def _load_outbox(self) -> list[OutboxEntry]:
        """At start, like the sweep of the work folder (before any job may be taken)."""
        try:
            return self.outbox.load()
        except OSError as exc:  # an unreadable outbox folder must not stop the daemon
            log.error("cannot read the outbox %s: %s; its results are not delivered", self.outbox.root, exc)
            self.record_error("outbox", str(exc))
            return []

    def _resume_outbox(self, entries: list[OutboxEntry]) -> None:
        """Results a previous run could not deliver: delivered again for registrations still configured."""
        for entry in entries:
            job = entry.job
            instance = self.config.instance(*entry.instance_key)
            worker = self.workers.get(entry.instance_key)
            reason = None
            if instance is None or worker is None:
                reason = f"{job.instance_url} ({entry.instance_key[1]}) is not registered here any more"
            elif not entry.belongs_to(instance):
                reason = f"the runner was registered again on {job.instance_url} since (the job went with it)"
            elif instance.needs_registration:
                reason = f"{job.instance_url} does not know this runner any more"
            elif job.uuid in self.jobs:
                reason = "another result of the same job is being delivered"
            if reason is not None:
                log.warning("dropping the waiting result of job %s (%s): %s", job.uuid, job.type, reason)
                self.record_error(f"job {job.uuid}", f"result dropped: {reason}")
                self.outbox.remove(entry)
                continue
            assert worker is not None
            self._start_job(worker, job, entry)

    async def _run_job(self, run: JobRun) -> None:
        """The job task: work, then report its fate; the slot is freed whatever happens."""
        job = run.job
        try:
            report = await self._work(run)
            elapsed = time.monotonic() - run.started_mono
            if run.failure is not None:
                # The whole message: the tail of ffmpeg's stderr says why.
                log.warning("job %s (%s) errored after %.1f s: %s", job.uuid, job.type, elapsed, run.failure)
                self.record_error(f"job {job.uuid}", _clip(run.failure, _ERROR_RECORD_CHARS))
            else:
                log.info("job %s (%s) %s after %.1f s", job.uuid, job.type, run.outcome, elapsed)
                if run.outcome_kind not in (JobOutcome.SUCCEEDED, JobOutcome.KEPT):
                    self.record_error(f"job {job.uuid}", run.outcome)
            if report is not None:
                await self._report(run, report)
        finally:
            if run.outcome_kind is not None:
                duration = time.monotonic() - run.started_mono
                self.metrics.job_ended(str(job.type), run.outcome_kind, duration, run.speed)
            run.phase = JobPhase.DONE
            self.jobs.pop(job.uuid, None)
            self.job_clients.remove(job)
            self.finished.append(run)
            self.wake_all("a slot is free")
            self._changed()

    async def _work(self, run: JobRun) -> Callable[[], Awaitable[None]] | None:
        """Process, store the result in the outbox, deliver it; returns the report to make, if any. Sets
        `run.outcome`. Re-raises a cancellation that is not ours (the TaskGroup going down)."""
        job = run.job
        # Whether the result stays in the outbox when this ends (stopped with the daemon).
        keep = False
        try:
            async with AsyncExitStack() as lifetime:
                try:
                    self._start_heartbeat(run, lifetime)
                    if run.entry is None:
                        run.entry = await self._process(run)
                    run.phase = JobPhase.DELIVERING
                    self._changed()
                    self.wake_all("a slot is free")
                    await self._deliver(run)
                    run.outcome, run.outcome_kind = "succeeded", JobOutcome.SUCCEEDED
                    return None
                finally:
                    run.phase = JobPhase.FINISHING
        except asyncio.CancelledError:
            reason = run.cancel_reason
            if reason is None or self._hard_stop.is_set():
                keep = True
                run.outcome, run.outcome_kind = "cancelled", JobOutcome.CANCELLED
                raise  # not ours, or stopping at once: the whole TaskGroup is going down
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            detail = f" ({run.cancel_detail})" if run.cancel_detail else ""
            if run.entry is not None and reason is CancelReason.SHUTDOWN:
                keep = True
                run.outcome = "stopped with the runner: its result waits in the outbox for the next start"
                run.outcome_kind = JobOutcome.KEPT
                return None
            run.outcome = f"cancelled: {reason.value}{detail}"
            run.outcome_kind = _OUTCOME_OF_CANCEL[reason]
            if reason.aborts_on_server:
                return lambda: run.client.abort(job, reason.value)
            return None
        except (JobGone, RunnerUnknown) as exc:
            run.outcome, run.outcome_kind = f"gone: {exc.message}", JobOutcome.GONE
            return None
        except Exception as exc:
            message = describe_failure(exc)
            run.outcome, run.outcome_kind = f"errored: {message.splitlines()[0]}", JobOutcome.ERRORED
            run.failure = message
            if not isinstance(exc, RunnerError | OSError):
                log.error("job %s: %s failed", job.uuid, job.type, exc_info=exc)
            return lambda: run.client.error(job, message)
        finally:
            if run.entry is not None and not keep:
                # Delivered, or the server answered for it otherwise: the result has nowhere to go.
                await _unless_cancelled(asyncio.to_thread(self.outbox.remove, run.entry))

    async def _process(self, run: JobRun) -> OutboxEntry:
        """Run the processor in the job's scope (work folder, inputs — undone in reverse order on every exit
        path) and move its result into the outbox before the scope ends."""
        job = run.job
        async with AsyncExitStack() as stack:
            context = await self._enter_job(run, stack)
            run.phase = JobPhase.RUNNING
            self._changed()
            output = await self.processors[job.type](context)
            if run.cancel_reason is not None:
                raise asyncio.CancelledError  # the processor swallowed our cancellation
            run.phase = JobPhase.STORING
            self._changed()
            # A thread of its own: moving and syncing a big file must not stall the loop. Not interrupted:
            # a cancellation meanwhile is recorded and acted on below.
            store = asyncio.to_thread(self.outbox.put, job, run.worker.config, output, run.work_dir)
            run.entry = await asyncio.shield(asyncio.ensure_future(store))
            if run.cancel_reason is not None:
                raise asyncio.CancelledError
            return run.entry

    async def _enter_job(self, run: JobRun, stack: AsyncExitStack) -> JobContext:
        """The job's working scope: work folder and inputs."""
        run.work_dir.mkdir(parents=True, exist_ok=True)
        stack.callback(shutil.rmtree, run.work_dir, ignore_errors=True)
        fetch = await stack.enter_async_context(self.inputs(run.job, run.work_dir))
        return JobContext(
            job=run.job,
            work_dir=run.work_dir,
            settings=self.settings,
            fetch_input=fetch,
            report_progress=lambda value: self._progress(run, value),
            report_speed=lambda value: setattr(run, "speed", value),
            encodes=self.encodes,
            live=_LiveLink(self, run) if run.is_live else None,
        )

    def _start_heartbeat(self, run: JobRun, stack: AsyncExitStack) -> None:
        """The job's heartbeat, stopped when `stack` closes (its fate is settled).

        A live's segment updates are its heartbeat on PeerTube, which refuses a live update without a
        segment (and gives a live 30 s). A server that pushes take-backs (a Tuberunner coordinator) takes
        bare updates: there a live gets the usual heartbeat too, which renews its lease before the first
        segment is out (a segment's length and more after the accept) and asks, on a take-back, even when
        ffmpeg is stuck and sends nothing."""
        assert self._tg is not None
        run.heartbeat = Heartbeat(
            run.client,
            run.job,
            interval_s=lambda: self._update_interval_s(run.worker),
            lease_s=self.config.lease_s,
            outage_limit_s=self.config.outage_limit_s,
            progress=lambda: run.progress,
            on_lost=lambda loss, detail: self._lost(run, loss, detail),
            on_delivered=lambda: self._delivered(run),
            on_answer=lambda: run.delivery.server_answered() if run.delivery is not None else None,
            retry=self.retry,
        )
        if run.is_live and not run.client.pushes_taken_back:
            run.heartbeat.stopped = True
            return
        heartbeat_task = self._tg.create_task(
            self._heartbeat(run, run.heartbeat), name=f"heartbeat {run.job.uuid}"
        )
        stack.push_async_callback(_stop, heartbeat_task)

    async def _heartbeat(self, run: JobRun, heartbeat: Heartbeat) -> None:
        try:
            await heartbeat.run()
        except Exception as exc:  # a bug: without heartbeats the job cannot be kept
            log.exception("job %s: heartbeat failed", run.job.uuid)
            run.cancel(CancelReason.LEASE_EXPIRED, f"heartbeat failed: {type(exc).__name__}: {exc}")

    def _lost(self, run: JobRun, loss: Loss, detail: str) -> None:
        if loss is Loss.NOT_PROCESSING and run.phase is JobPhase.DELIVERING:
            # Our success may have got there first (the job is completing): the success call tells.
            return
        reason = CancelReason.LEASE_EXPIRED if loss is Loss.LEASE_EXPIRED else CancelReason.GONE
        run.cancel(reason, detail)

    def _delivered(self, run: JobRun) -> None:
        run.worker.contact()
        self._changed()

    def _progress(self, run: JobRun, value: float | None) -> None:
        run.report_progress(value)
        self._dirty.set()

    async def _deliver(self, run: JobRun) -> None:
        """`success` of the result in the outbox until the server answers for it (runner/delivery.py)."""
        assert run.entry is not None
        assert run.heartbeat is not None
        run.delivery = Delivery(
            run.client,
            run.entry,
            self.outbox,
            probe=run.heartbeat,
            retry=self.retry,
            outage_limit_s=self.config.outage_limit_s,
        )
        await run.delivery.run()
        run.entry = run.delivery.entry
        self.metrics.uploaded.inc(sum(_size(path) for path in run.entry.output.files.values()))

    async def _report(self, run: JobRun, call: Callable[[], Awaitable[None]]) -> None:
        """Tell the server a job's fate, shielded from cancellation of the job task, within a deadline."""
        assert self._tg is not None
        deadline_s = self.config.report_deadline_s

        async def report() -> None:
            try:
                async with asyncio.timeout(deadline_s):
                    await self.retry.run(call, what=f"report of job {run.job.uuid}", deadline_s=deadline_s)
            except JobGone as exc:
                log.info("job %s: nothing to report, the server took it back (%s)", run.job.uuid, exc.message)
            except (RunnerError, TimeoutError) as exc:
                message = getattr(exc, "message", None) or f"no answer within {deadline_s:g} s"
                log.warning(
                    "job %s: could not report its end (%s); the server takes it back when its lease expires",
                    run.job.uuid,
                    message,
                )
            except Exception:
                log.exception("job %s: reporting its end failed", run.job.uuid)

        run.report_task = self._tg.create_task(report(), name=f"report {run.job.uuid}")
        await asyncio.shield(run.report_task)

    # -------------------------------------------------------------------- status and config files

    def snapshot(self) -> DaemonState:
        return DaemonState(
            pid=os.getpid(),
            runner_id=self.runner_id,
            version=self.version,
            started_at=self.started_at,
            updated_at=time.time(),
            concurrency=self.config.concurrency,
            live_concurrency=self.config.live_concurrency,
            state_interval_s=self.config.state_interval_s,
            draining=self.draining,
            endpoint=self.endpoint_url,
            instances=[w.status for w in self.workers.values()],
            jobs=[run.status() for run in self.jobs.values()],
            errors=list(self.errors),
        )

    def _write_state(self) -> None:
        if self.state_file is None:
            return
        try:
            write_state(self.state_file, self.snapshot())
        except OSError as exc:
            log.warning("cannot write the status file %s: %s", self.state_file, exc)

    async def _state_loop(self) -> None:
        """Stamp the status file every `state_interval_s` and soon after each change (coalesced)."""
        while True:
            self._dirty.clear()
            try:
                self._write_state()
            except Exception:  # a bug in the snapshot must not stop the daemon
                log.exception("cannot build the status file")
            try:
                async with asyncio.timeout(self.config.state_interval_s):
                    await self._dirty.wait()
            except TimeoutError:
                pass
            await asyncio.sleep(min(0.2, self.config.state_interval_s))

    async def _config_loop(self) -> None:
        if self.reload_config is None:
            return
        while True:
            await asyncio.sleep(self.config.config_check_interval_s)
            try:
                config = self.reload_config()
            except Exception as exc:  # ConfigError, or the file vanished meanwhile: keep the old one
                log.error("configuration not reloaded: %s", exc)
                self.record_error("config", str(exc))
                continue
            if config is not None and not self.draining:
                self.apply_config(config)


class _LiveLink:
    """A live job's updates go through its instance's client; each one delivered is a contact."""

    def __init__(self, supervisor: Supervisor, run: JobRun) -> None:
        self.supervisor = supervisor
        self.run = run

    async def send(self, update: LiveChunkUpdate) -> None:
        await self.run.client.update_live(self.run.job, update)
        self.supervisor._delivered(self.run)

    def segment_done(self, outcome: str, lag_s: float | None) -> None:
        self.supervisor.metrics.live_segment(outcome, lag_s)


_OUTCOME_OF_CANCEL = {
    CancelReason.GONE: JobOutcome.GONE,
    CancelReason.LEASE_EXPIRED: JobOutcome.LEASE_LOST,
    CancelReason.SHUTDOWN: JobOutcome.ABORTED,
    CancelReason.INSTANCE_REMOVED: JobOutcome.ABORTED,
}


def _video_of(payload: Mapping[str, Any]) -> str | None:
    """The video UUID an offer's input URL names, if any."""
    inputs = payload.get("input")
    if not isinstance(inputs, Mapping):
        return None
    for value in inputs.values():
        found = resource_of(value) if isinstance(value, str) else None
        if found is not None:
            return found[0].lower()
    return None


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


async def _unless_cancelled(awaitable: Awaitable[None]) -> None:
    """Await `awaitable` in a `finally` that may run while the task is being cancelled (then skipped:
    the next start finds what was left)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        if asyncio.iscoroutine(awaitable):
            awaitable.close()
        return
    await awaitable


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel `task` and wait for its end without taking its exception or cancellation as ours."""
    task.cancel()
    await asyncio.wait({task})


async def _logged(coroutine: Coroutine[Any, Any, None], what: str) -> None:
    """Run a service that should never end; a bug in it is logged and ends only that service."""
    try:
        await coroutine
    except Exception:
        log.exception("%s stopped after an unexpected error", what)
