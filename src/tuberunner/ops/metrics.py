"""The runner's Prometheus metrics, in a registry of its own (no global state: two supervisors in one
process, as the one-shot mode and the tests run them, keep separate numbers).

Two sources, by design:

* a few counters and histograms fed by events that happen once per job, retry or reconnection (never per
  chunk or per progress block): jobs by type and outcome, their duration and encode speed, bytes uploaded,
  retries and give-ups by error class, socket reconnects;
* `_SupervisorCollector`, which reads what the supervisor already keeps when Prometheus scrapes: slots,
  running jobs by type and phase, instances (reachable, registered, socket, last contact), bytes downloaded
  (counted once per download request by `JobClients`), leftovers removed at start, free disk, loop lag.

Error classes are the runner's taxonomy (`runner/errors.py`): transient, job_gone, runner_unknown,
rejected, job_failed; `other` for anything else.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from tuberunner.runner.errors import JobFailed, JobGone, RequestRejected, RunnerUnknown, TransientError

if TYPE_CHECKING:
    from tuberunner.runner.supervisor import Supervisor

__all__ = ["CONTENT_TYPE", "ERROR_CLASSES", "RunnerMetrics", "error_class"]

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
ERROR_CLASSES: Final = ("transient", "job_gone", "runner_unknown", "rejected", "job_failed", "other")
# Durations of jobs: seconds to hours.
_DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
# ffmpeg's speed: media seconds per wall second.
_SPEED_BUCKETS = (0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 20, 50)
# Live segment lag: well under a segment (2-4 s) when all is well.
_LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32)


def error_class(exc: BaseException) -> str:
    """The label of an error: its class in the runner's taxonomy (a deadline is transient)."""
    if isinstance(exc, TransientError | TimeoutError):
        return "transient"
    if isinstance(exc, JobGone):
        return "job_gone"
    if isinstance(exc, RunnerUnknown):
        return "runner_unknown"
    if isinstance(exc, RequestRejected):
        return "rejected"
    if isinstance(exc, JobFailed):
        return "job_failed"
    return "other"


class RunnerMetrics:
    """Every metric of one runner; also the `RetryObserver` of its retry policies."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Counter(
            "tuberunner_runner_jobs",
            "Jobs ended here, by type and outcome",
            ["job_type", "outcome"],
            registry=r,
        )
        self.job_duration = Histogram(
            "tuberunner_runner_job_duration_seconds",
            "Wall time of jobs from accept to their end, by type and outcome",
            ["job_type", "outcome"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.encode_speed = Histogram(
            "tuberunner_runner_encode_speed_ratio",
            "ffmpeg's speed over a whole job (media seconds per wall second), jobs that succeeded",
            ["job_type"],
            buckets=_SPEED_BUCKETS,
            registry=r,
        )
        self.uploaded = Counter(
            "tuberunner_runner_uploaded_bytes", "Bytes of result files delivered to servers", registry=r
        )
        self.retries = Counter(
            "tuberunner_runner_retries",
            "Calls tried again after a failure (requests, heartbeats, downloads, reports), by error class",
            ["error_class"],
            registry=r,
        )
        self.give_ups = Counter(
            "tuberunner_runner_give_ups",
            "Calls or jobs given up after retries ran out, or refused for good, by error class",
            ["error_class"],
            registry=r,
        )
        self.socket_reconnects = Counter(
            "tuberunner_runner_socket_reconnects",
            "Socket connections made again after an earlier one of the same instance ended",
            ["instance"],
            registry=r,
        )
        self.live_segments = Counter(
            "tuberunner_runner_live_segments",
            "Live segments by outcome: uploaded, or skipped (left the window before the server could get it)",
            ["outcome"],
            registry=r,
        )
        self.live_segment_lag = Histogram(
            "tuberunner_runner_live_segment_lag_seconds",
            "From ffmpeg listing a live segment to the server having it",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        for outcome in ("uploaded", "skipped"):
            self.live_segments.labels(outcome)
        for label in ERROR_CLASSES:
            self.retries.labels(label)
            self.give_ups.labels(label)
        ProcessCollector(registry=r)

    def live_segment(self, outcome: str, lag_s: float | None) -> None:
        self.live_segments.labels(outcome).inc()
        if lag_s is not None:
            self.live_segment_lag.observe(lag_s)

    def watch(self, supervisor: Supervisor) -> None:
        """Read `supervisor` at every scrape."""
        self.registry.register(_SupervisorCollector(supervisor))

    # -------------------------------------------------------------------- RetryObserver

    def retrying(self, exc: BaseException) -> None:
        self.retries.labels(error_class(exc)).inc()

    def gave_up(self, exc: BaseException) -> None:
        self.give_ups.labels(error_class(exc)).inc()

    # -------------------------------------------------------------------- events

    def job_ended(self, job_type: str, outcome: str, duration_s: float, speed: float | None) -> None:
        self.jobs.labels(job_type, outcome).inc()
        self.job_duration.labels(job_type, outcome).observe(duration_s)
        if outcome == "succeeded" and speed is not None and speed > 0:
            self.encode_speed.labels(job_type).observe(speed)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _SupervisorCollector:
    """What the supervisor keeps anyway, read at scrape time (on the event loop: nothing moves meanwhile)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def describe(self) -> list[Metric]:
        return []  # names are only known from state; none clashes with the counters above

    def collect(self) -> Iterator[Metric]:
        s = self.supervisor
        info = GaugeMetricFamily(
            "tuberunner_runner_info", "Version and id of this runner", labels=["version", "runner_id"]
        )
        info.add_metric([s.version, s.runner_id], 1)
        yield info
        yield GaugeMetricFamily(
            "tuberunner_runner_slots", "Jobs this runner takes at once, lives apart", s.config.concurrency
        )
        yield GaugeMetricFamily(
            "tuberunner_runner_slots_busy",
            "Slots held by running jobs, lives apart (a result waiting in the outbox holds none)",
            sum(1 for run in s.jobs.values() if run.holds_slot and not run.is_live),
        )
        # Lives have slots of their own: counted with the others, a busy runner would look over-committed.
        yield GaugeMetricFamily(
            "tuberunner_runner_live_slots", "Lives this runner takes at once", s.config.live_concurrency
        )
        yield GaugeMetricFamily(
            "tuberunner_runner_live_slots_busy",
            "Live slots held",
            sum(1 for run in s.jobs.values() if run.holds_slot and run.is_live),
        )
        yield GaugeMetricFamily(
            "tuberunner_runner_draining", "1 while stopping (no new job)", int(s.draining)
        )
        running = GaugeMetricFamily(
            "tuberunner_runner_jobs_running",
            "Jobs running now, by type and phase",
            labels=["job_type", "phase"],
        )
        counts: dict[tuple[str, str], int] = {}
        for run in s.jobs.values():
            key = (str(run.job.type), str(run.phase))
            counts[key] = counts.get(key, 0) + 1
        for (job_type, phase), count in sorted(counts.items()):
            running.add_metric([job_type, phase], count)
        yield running
        yield from self._instances()
        yield CounterMetricFamily(
            "tuberunner_runner_downloaded_bytes",
            "Bytes of job inputs received from servers (resumed and repeated downloads included)",
            s.job_clients.downloaded_bytes,
        )
        yield CounterMetricFamily(
            "tuberunner_runner_leftover_cleanups",
            "Job folders and files left by an earlier run, removed at start",
            s.leftovers_removed,
        )
        try:
            free = shutil.disk_usage(s.work_dir).free
        except OSError:
            pass
        else:
            yield GaugeMetricFamily(
                "tuberunner_runner_disk_free_bytes", "Free space of the work folder", free
            )
        yield GaugeMetricFamily(
            "tuberunner_runner_event_loop_lag_seconds",
            "How late the loop monitor's last tick woke up",
            s.loop_monitor.lag_s,
        )

    def _instances(self) -> Iterator[Metric]:
        labels = ["instance", "runner_name"]
        up = GaugeMetricFamily(
            "tuberunner_runner_instance_up", "1 when the instance answered our last call", labels=labels
        )
        registered = GaugeMetricFamily(
            "tuberunner_runner_instance_registered",
            "1 while the instance knows our runner token, 0 when it needs a new registration",
            labels=labels,
        )
        socket = GaugeMetricFamily(
            "tuberunner_runner_socket_connected", "1 while the socket.io connection is open", labels=labels
        )
        contact = GaugeMetricFamily(
            "tuberunner_runner_instance_last_contact_timestamp_seconds",
            "When the instance last answered without an error (Unix time)",
            labels=labels,
        )
        for worker in self.supervisor.workers.values():
            status = worker.status
            values = [status.url, status.runner_name]
            is_registered = status.registration == "registered"
            up.add_metric(values, int(is_registered and status.reachable))
            registered.add_metric(values, int(is_registered))
            socket.add_metric(values, int(status.socket_connected))
            if status.last_contact_at is not None:
                contact.add_metric(values, status.last_contact_at)
        yield from (up, registered, socket, contact)
