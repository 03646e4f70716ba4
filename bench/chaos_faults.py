"""The fault menu of `bench/chaos.py`: what each fault does, when it ends, and when the system counts as
working again.

Every fault runs the same course (`run_fault`): pick a target with the fault's own seeded RNG, note the
jobs it hits (those processing on the target at that moment), inject, hold, heal, then wait until the
system is working again. The time from the end of the fault (the heal) to that moment is its recovery time.

"Working again" means, on one snapshot of the monitor (taken every 0.3 s, so that is the resolution):

* the component hit serves again — a runner: its daemon alive, its status loop turning, registered,
  socket connected and in contact with the coordinator after the heal; the coordinator: it answers, and
  every live runner has been in contact with it since the restart;
* and every job the fault hit is being worked on again: a heartbeat of it was accepted after the heal (on
  whatever runner holds it now), or it is final (completed, errored, cancelled) or gone (deleted) — or it
  waits in `pending` while every live runner's slots are busy (queueing is not a fault's doing);
* for a job cancelled or deleted by the admin: the runner that held it has let it go (no longer lists it,
  its ffmpeg is gone);
* for a live whose job the fault hit: the live is served again (its current job took an update after the
  heal) or it is over (not `live` any more);
* for the live faults (`publisher-drop`, `live-cancel`): the live left the `live` state, its job is final,
  and the runner that held it has let it go.

A fault that is not followed by "working again" within the recovery limit is reported as not recovered
(an invariant failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tests.support.tcp_proxy import Plan

from chaos_cluster import (
    CANCELLED,
    COMPLETED,
    FINAL_STATES,
    PENDING,
    PROCESSING,
    WAITING,
    Cluster,
    FfmpegProcess,
    JobView,
    LiveView,
    RunnerNode,
    Snapshot,
    reset_plans,
    run_cli,
)
from tuberunner.runner.processors.live import stall_after_s

if TYPE_CHECKING:
    from chaos_lives import Lives

__all__ = [
    "FAULT_KINDS",
    "LIVE_FAULT_KINDS",
    "SHARED_FAULT_KINDS",
    "ChaosLimits",
    "FaultRecord",
    "Faults",
    "Skip",
    "parse_menu",
]

FAULT_KINDS: tuple[str, ...] = (
    "runner-kill",
    "coordinator-kill",
    "partition-blackhole",
    "partition-reset",
    "partition-latency",
    "partition-slow",
    "job-cancel",
    "job-delete",
    "ffmpeg-stop",
    "disk-full",
    "registration-delete",
    "publisher-drop",
    "live-cancel",
)
LIVE_FAULT_KINDS: tuple[str, ...] = ("publisher-drop", "live-cancel")
# What only the scale-out set-up (several coordinators) has to lose.
SHARED_FAULT_KINDS: tuple[str, ...] = ("postgres-kill", "redis-down", "storage-down")
_GROUPS = {
    "all": FAULT_KINDS,
    "partition": tuple(k for k in FAULT_KINDS if k.startswith("partition-")),
    "job": ("job-cancel", "job-delete"),
    "live": LIVE_FAULT_KINDS,
    "shared": SHARED_FAULT_KINDS,
    "scale-out": FAULT_KINDS + SHARED_FAULT_KINDS,
}

# How late the watchdog may kill a SIGSTOPped ffmpeg after the stall limit (its checks run every second at
# most, and the last progress may predate the stop by one report).
WATCHDOG_MARGIN_S = 3.0
# How long a runner may take to notice that its registration is gone (its next call tells it).
NOTICE_LIMIT_S = 20.0
# How long after the end of the fault window a fault may still wait for its target.
TARGET_GRACE_S = 5.0
# How long a live job's ffmpeg may outlive the admin's cancel (the take-back is pushed on the socket; the
# live tests ask for a second on a quiet machine).
LIVE_CANCEL_LIMIT_S = 3.0


def parse_menu(text: str) -> tuple[str, ...]:
    """`all`, or a comma list of kinds and groups (`partition`, `job`, `live`, ...); ValueError names a wrong
    one."""
    chosen: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        kinds = _GROUPS.get(part, (part,) if part in FAULT_KINDS + SHARED_FAULT_KINDS else None)
        if kinds is None:
            known = ", ".join([*_GROUPS, *FAULT_KINDS, *SHARED_FAULT_KINDS])
            raise ValueError(f"unknown fault {part!r} (known: {known})")
        chosen.extend(k for k in kinds if k not in chosen)
    if not chosen:
        raise ValueError("the fault menu is empty")
    return tuple(chosen)


class Skip(Exception):
    """The fault could not be injected now (no target); the reason is printed and kept."""


@dataclass
class FaultRecord:
    number: int
    kind: str
    seed: int
    started_at: float = 0.0  # seconds since the start of the run
    ended_at: float = 0.0
    variant: str = ""
    target: str = ""
    affected_jobs: list[str] = field(default_factory=list)
    recovery_s: float | None = None
    skipped: str | None = None
    anomalies: list[str] = field(default_factory=list)
    note: str = ""
    # Targets this fault holds (no other fault touches them meanwhile), and the wall time of its end.
    claims: set[str] = field(default_factory=set)
    started_wall: float = 0.0
    healed_wall: float = 0.0
    # Lives whose job the fault hit (they must be served again), and other lives it watches until the
    # system works again (the monitor reads them all).
    hit_lives: list[str] = field(default_factory=list)
    lives: list[str] = field(default_factory=list)
    # Judgements made once the system is working again (they may add anomalies or a note).
    verdicts: list[Callable[[Snapshot], None]] = field(default_factory=list)

    @property
    def injected(self) -> bool:
        return self.skipped is None

    def describe(self) -> str:
        what = f"#{self.number} {self.kind}" + (f" ({self.variant})" if self.variant else "")
        if self.skipped:
            return f"{what}: skipped: {self.skipped}"
        target = f" on {self.target}" if self.target else ""
        jobs = f", {len(self.affected_jobs)} job(s) hit" if self.affected_jobs else ""
        held = f"held {self.ended_at - self.started_at:.1f} s"
        recovered = (
            f"working again {self.recovery_s:.1f} s later"
            if self.recovery_s is not None
            else "NOT working again"
        )
        extra = f"; {self.note}" if self.note else ""
        anomalies = "".join(f"; ANOMALY: {a}" for a in self.anomalies)
        return f"{what}{target}{jobs}: {held}, {recovered}{extra}{anomalies}"

    def as_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "kind": self.kind,
            "variant": self.variant,
            "seed": self.seed,
            "target": self.target,
            "startedAtS": round(self.started_at, 3),
            "endedAtS": round(self.ended_at, 3),
            "affectedJobs": self.affected_jobs,
            "recoveryS": None if self.recovery_s is None else round(self.recovery_s, 3),
            "skipped": self.skipped,
            "anomalies": self.anomalies,
            "note": self.note,
        }


@dataclass(frozen=True)
class ChaosLimits:
    lease_s: float
    stall_s: float
    recovery_limit_s: float
    # How long a fault waits for a target (a free runner, a running ffmpeg, a job) before it is skipped.
    target_wait_s: float = 45.0
    # Four faults in five aimed at a runner wait this long for one that works on a job (the interesting
    # case) before they take any free runner.
    busy_wait_s: float = 10.0
    busy_share: float = 0.8


Condition = Callable[[Snapshot], bool]


class Faults:
    """Runs faults against a cluster; keeps their records and what they did to jobs and videos."""

    def __init__(self, cluster: Cluster, limits: ChaosLimits, t0: float, say: Callable[[str], None]) -> None:
        self.cluster = cluster
        self.limits = limits
        self.t0 = t0
        self.say = say
        self.records: list[FaultRecord] = []
        self.busy: set[str] = set()
        # Jobs the chaos cancelled or deleted, and their videos: their end state is the documented one.
        self.cancelled_jobs: set[str] = set()
        self.deleted_jobs: set[str] = set()
        self.touched_videos: set[str] = set()
        # The live workload (None: no lives), and the lives a fault touched (a session or a job of theirs
        # that the fault's span overlaps may end with an error): video uuid -> the faults.
        self.lives: Lives | None = None
        self.touched_lives: dict[str, list[FaultRecord]] = {}
        # The end of the fault window (monotonic), once the run knows it.
        self.window_end: float | None = None
        self._freed = asyncio.Event()
        self._impls: dict[str, Callable[[random.Random, FaultRecord], Awaitable[list[Condition]]]] = {
            "runner-kill": self._runner_kill,
            "coordinator-kill": self._coordinator_kill,
            "partition-blackhole": self._partition,
            "partition-reset": self._partition,
            "partition-latency": self._partition,
            "partition-slow": self._partition,
            "job-cancel": self._job_admin,
            "job-delete": self._job_admin,
            "ffmpeg-stop": self._ffmpeg_stop,
            "disk-full": self._disk_full,
            "registration-delete": self._registration_delete,
            "publisher-drop": self._publisher_drop,
            "live-cancel": self._live_cancel,
            "postgres-kill": self._shared_service,
            "redis-down": self._shared_service,
            "storage-down": self._shared_service,
        }

    def now(self) -> float:
        return time.monotonic() - self.t0

    # ------------------------------------------------------------------ the common course

    async def run_fault(self, number: int, kind: str, seed: int) -> FaultRecord:
        record = FaultRecord(number=number, kind=kind, seed=seed)
        self.records.append(record)
        rng = random.Random(seed)
        try:
            conditions = await self._impls[kind](rng, record)
            conditions += [self._live_served(uuid, record.healed_wall) for uuid in record.hit_lives]
            watched = sorted(set(record.hit_lives) | set(record.lives))
            monitor = self.cluster.monitor
            monitor.track(record.affected_jobs)
            monitor.track_lives(watched)
            try:
                seen = await monitor.until(
                    lambda s: all(c(s) for c in conditions), self.limits.recovery_limit_s
                )
            finally:
                monitor.untrack(record.affected_jobs)
                monitor.untrack_lives(watched)
            if seen is not None:
                record.recovery_s = max(0.0, seen.at - record.healed_wall)
                for verdict in record.verdicts:
                    verdict(seen)
        except Skip as exc:
            record.skipped = str(exc)
        except Exception as exc:  # a refused admin call, say: a finding, not a reason to stop the run
            traceback.print_exc()
            record.anomalies.append(f"the fault could not be run: {type(exc).__name__}: {exc}")
        finally:
            self.busy -= record.claims
            self._freed.set()
        self.say(record.describe())
        return record

    def _inject(self, record: FaultRecord) -> None:
        """The fault starts now (its target and the jobs it hits are known)."""
        record.started_at = self.now()
        record.started_wall = time.time()
        record.hit_lives = self._lives_hit(record)

    def _heal(self, record: FaultRecord) -> float:
        """The fault ends now: the wall time from which recovery is measured."""
        record.ended_at = self.now()
        record.healed_wall = time.time()
        return record.healed_wall

    async def _claim(
        self,
        rng: random.Random,
        record: FaultRecord,
        what: str,
        pick: Callable[[], list[str]],
        wait_s: float | None = None,
    ) -> str:
        """A target no other fault holds, chosen by `rng` among `pick()`; waits for one a bounded time, and
        no later than `TARGET_GRACE_S` after the end of the fault window (the work is winding down then: a
        long wait would only lengthen the run)."""
        wait_s = self.limits.target_wait_s if wait_s is None else wait_s
        deadline = time.monotonic() + wait_s
        if self.window_end is not None:
            deadline = min(deadline, max(self.window_end + TARGET_GRACE_S, time.monotonic()))
            wait_s = round(deadline - time.monotonic())
        while True:
            free = sorted(t for t in pick() if t not in self.busy)
            if free:
                chosen = rng.choice(free)
                self.busy.add(chosen)
                record.claims.add(chosen)
                return chosen
            left = deadline - time.monotonic()
            if left <= 0:
                raise Skip(f"no {what} free for {wait_s:g} s")
            self._freed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._freed.wait(), min(left, 1.0))

    async def _claim_runner(
        self, rng: random.Random, record: FaultRecord, also: Callable[[RunnerNode], bool] | None = None
    ) -> RunnerNode:
        """A free runner; most of the time one that works on a job, if one does within `busy_wait_s`."""
        want_busy = rng.random() < self.limits.busy_share
        busy_until = time.monotonic() + self.limits.busy_wait_s

        def candidates() -> list[str]:
            nodes = [n for n in self.cluster.runners if n.alive and (also is None or also(n))]
            if want_busy and time.monotonic() < busy_until:
                nodes = [n for n in nodes if self._jobs_on(n)]
            return [n.name for n in nodes]

        return self.cluster.runner(await self._claim(rng, record, "runner", candidates, wait_s=20.0))

    def _jobs_on(self, node: RunnerNode) -> list[str]:
        latest = self.cluster.monitor.latest
        return sorted(j.uuid for j in latest.processing.values() if j.runner == node.name)

    def _touch_live(self, video_uuid: str, record: FaultRecord) -> None:
        self.touched_lives.setdefault(video_uuid, []).append(record)

    def touched(self, video_uuid: str, start_wall: float, end_wall: float) -> list[FaultRecord]:
        """The faults that touched a live between two wall times: from their start until the system was
        working again (or the recovery limit, when it was not)."""
        limit = self.limits.recovery_limit_s
        return [
            r
            for r in self.touched_lives.get(video_uuid, [])
            if r.started_wall <= end_wall
            and start_wall <= r.healed_wall + (r.recovery_s if r.recovery_s is not None else limit)
        ]

    def _lives_hit(self, record: FaultRecord) -> list[str]:
        """The lives whose job the fault hit (touched: their end may carry an error), and, for a coordinator
        kill, every live being published (its publisher and its runner's pull were cut)."""
        known = self.cluster.monitor.live_of_job
        hit = {known[uuid] for uuid in record.affected_jobs if uuid in known}
        if record.kind == "coordinator-kill" and self.lives is not None:
            hit |= {p.live.video_uuid for p in self.lives.in_progress()}
        if record.kind in LIVE_FAULT_KINDS:
            hit.clear()  # judged by the fault itself
        for uuid in sorted(hit):
            self._touch_live(uuid, record)
        return sorted(hit)

    # ------------------------------------------------------------------ conditions

    def _serving(self, node: RunnerNode, since: float) -> Condition:
        return lambda s: node.name in s.runners and s.runners[node.name].serving_since(since)

    def _moving(self, job_uuids: list[str], since: float) -> Condition:
        def moving(s: Snapshot) -> bool:
            if not s.coordinator_up:
                return False
            for job_uuid in job_uuids:
                if job_uuid not in s.tracked:
                    return False  # not looked at yet
                job = s.tracked[job_uuid]
                if job is None or job.state in FINAL_STATES:
                    continue
                if job.state == PROCESSING and job.updated_at > since:
                    continue
                slots_busy = all(r.full(live=job.is_live) for r in s.runners.values() if r.alive)
                if job.state in (PENDING, WAITING) and slots_busy:
                    continue
                return False
            return True

        return moving

    def _live_served(self, video_uuid: str, since: float) -> Condition:
        """The live is over (not `live`), or its current job took an update after `since`: a job that
        resumed it, or the one the fault hit going on."""

        def served(s: Snapshot) -> bool:
            if not s.coordinator_up or video_uuid not in s.lives:
                return False
            live = s.lives[video_uuid]
            if live is None or live.state != "live":
                return True
            job = s.live_jobs.get(live.job_uuid) if live.job_uuid else None
            return job is not None and job.state == PROCESSING and job.updated_at > since

        return served

    def _live_over(self, video_uuid: str, session: int | None, job_uuid: str | None) -> Condition:
        """The live left the `live` state of `session` (ended, waiting, or a new session; any session when
        None) and `job_uuid` is final or gone."""

        def over(s: Snapshot) -> bool:
            if not s.coordinator_up or video_uuid not in s.lives:
                return False
            live = s.lives[video_uuid]
            if live is not None and live.state == "live" and session in (None, live.session):
                return False
            if job_uuid is None:
                return True
            if job_uuid not in s.tracked:
                return False
            job = s.tracked[job_uuid]
            return job is None or job.state in FINAL_STATES

        return over

    def _released(self, node: RunnerNode, job_uuid: str, since: float) -> Condition:
        folder = node.paths.work_dir

        def released(s: Snapshot) -> bool:
            view = s.runners.get(node.name)
            if view is None or view.state is None or view.state.updated_at <= since or view.holds(job_uuid):
                return False
            return not any(p.cwd is not None and p.cwd.is_relative_to(folder / job_uuid) for p in s.ffmpeg)

        return released

    # ------------------------------------------------------------------ runner processes

    async def _runner_kill(self, rng: random.Random, record: FaultRecord) -> list[Condition]:
        node = await self._claim_runner(rng, record)
        down_s = rng.uniform(0.5, 3.0)
        record.target, record.affected_jobs = node.name, self._jobs_on(node)
        record.variant = f"down {down_s:.1f} s"
        self._inject(record)
        await node.kill()
        await asyncio.sleep(down_s)  # the fault's duration
        await node.start()
        since = self._heal(record)
        return [self._serving(node, since), self._moving(record.affected_jobs, since)]

    async def _coordinator_kill(self, rng: random.Random, record: FaultRecord) -> list[Condition]:
        """SIGKILL one coordinator process (the only one, or one of N: its runners' proxies then move
        them to another), keep it down a while, start it again on the same port and data folder."""
        nodes = {node.name: node for node in self.cluster.coordinators}
        name = await self._claim(rng, record, "coordinator", lambda: sorted(nodes), wait_s=20.0)
        node = nodes[name]
        if rng.random() < self.limits.busy_share:  # most of the time, while some job is processing
            await self.cluster.monitor.until(lambda s: bool(s.processing), self.limits.busy_wait_s)
        down_s = rng.uniform(0.5, 1.5 * self.limits.lease_s)
        record.target = name
        record.variant = f"down {down_s:.1f} s"
        record.affected_jobs = sorted(self.cluster.monitor.latest.processing)
        self._inject(record)
        await node.kill()
        await asyncio.sleep(down_s)  # the fault's duration
        since = self._heal(record)
        await node.start()
        record.note = f"restarted (incarnation {node.incarnation})"
        return [self._runners_in_contact(since), self._moving(record.affected_jobs, since)]

    def _runners_in_contact(self, since: float) -> Condition:
        """Every live runner has been in contact with a coordinator since `since`."""
        alive = [n for n in self.cluster.runners if n.alive]

        def runners_back(s: Snapshot) -> bool:
            return s.coordinator_up and all(
                (view := s.runners.get(n.name)) is not None
                and view.state is not None
                and all(
                    i.last_contact_at is not None and i.last_contact_at > since for i in view.state.instances
                )
                for n in alive
                if n.alive
            )

        return runners_back

    # ------------------------------------------------------------------ shared services (scale-out)

    async def _shared_service(self, rng: random.Random, record: FaultRecord) -> list[Condition]:
        """`postgres-kill`: every connection of the coordinators to their database is terminated
        (`pg_terminate_backend`, what a PostgreSQL restart or failover does to them); `redis-down` and
        `storage-down`: Redis or the S3 server unreachable (every connection reset) for 2-8 s."""
        shared = self.cluster.shared
        if shared is None:
            raise Skip("only the scale-out set-up (--coordinators 2 or more) has shared services")
        await self._claim(rng, record, record.kind, lambda: [record.kind], wait_s=20.0)
        if rng.random() < self.limits.busy_share:
            await self.cluster.monitor.until(lambda s: bool(s.processing), self.limits.busy_wait_s)
        record.target = {"postgres-kill": "PostgreSQL", "redis-down": "Redis", "storage-down": "S3"}[
            record.kind
        ]
        record.affected_jobs = sorted(self.cluster.monitor.latest.processing)
        self._inject(record)
        if record.kind == "postgres-kill":
            killed = await shared.kill_database_connections()
            record.variant = f"{killed} connection(s) terminated"
        else:
            proxy = shared.redis_proxy if record.kind == "redis-down" else shared.s3_proxy
            hold_s = rng.uniform(2.0, 8.0)
            record.variant = f"unreachable {hold_s:.1f} s"
            proxy.resets([])
            try:
                await asyncio.sleep(hold_s)  # the fault's duration
            finally:
                proxy.heal()
        since = self._heal(record)
        return [self._runners_in_contact(since), self._moving(record.affected_jobs, since)]

    # ------------------------------------------------------------------ network

    async def _partition(self, rng: random.Random, record: FaultRecord) -> list[Condition]:
        node = await self._claim_runner(rng, record)
        record.target, record.affected_jobs = node.name, self._jobs_on(node)
        proxy = node.proxy
        kind = record.kind
        self._inject(record)
        if kind == "partition-blackhole":
            hold_s = rng.uniform(0.5 * self.limits.lease_s, 2.5 * self.limits.lease_s)
            record.variant = f"{hold_s:.1f} s, lease {self.limits.lease_s:g} s"
            proxy.blackhole()
        elif kind == "partition-reset":
            hold_s = rng.uniform(2.0, 8.0)
            choices = [
                (rng.random() < 0.5, rng.randint(500, 400_000), rng.random() < 0.7) for _ in range(400)
            ]
            record.variant = f"{hold_s:.1f} s of resets at connect or after some bytes"
            proxy.resets(reset_plans(choices))
        elif kind == "partition-latency":
            hold_s = rng.uniform(4.0, 12.0)
            delay_s = rng.uniform(0.2, 1.0)
            record.variant = f"{hold_s:.1f} s, +{delay_s * 1000:.0f} ms per chunk"
            proxy.shape(Plan.forward(delay_s=delay_s))
        else:
            hold_s = rng.uniform(4.0, 12.0)
            rate = rng.uniform(16_000, 128_000)
            record.variant = f"{hold_s:.1f} s at {rate / 1000:.0f} kB/s"
            proxy.shape(Plan.forward(rate_bytes_per_s=rate))
        try:
            await asyncio.sleep(hold_s)  # the fault's duration
        finally:
            proxy.heal()
        since = self._heal(record)
        return [self._serving(node, since), self._moving(record.affected_jobs, since)]

    # ------------------------------------------------------------------ admin actions on jobs

    async def _job_admin(self, rng: random.Random, record: FaultRecord) -> list[Condition]:
        admin = self.cluster.admin
        # Mostly a job some runner works on (the interesting case), else any job not yet started.
        states = [PROCESSING] if rng.random() < 0.75 else [PENDING, PROCESSING, WAITING]
        deadline = time.monotonic() + 20.0
        job: dict[str, Any] | None = None
        while job is None:
            candidates = sorted(
                (j for j in await admin.jobs(states) if j["uuid"] not in self.busy),
                key=lambda j: str(j["uuid"]),
            )
            if candidates:
                job = rng.choice(candidates)
                break
            if time.monotonic() >= deadline:
                if states == [PROCESSING]:
                    states = [PENDING, WAITING]  # none running for that long: take a queued one
                    continue
                raise Skip(f"no job to {record.kind.removeprefix('job-')}")
            await self.cluster.monitor.until(lambda s: True, 5.0)  # the next look at the system
        job_uuid = str(job["uuid"])
        self.busy.add(job_uuid)
        record.claims.add(job_uuid)
        holder = (job.get("runner") or {}).get("name")
        video_uuid = (job.get("privatePayload") or {}).get("videoUUID")
        record.target = f"job {job_uuid[:8]} ({job['type']}, {job['state']['label'].lower()}" + (
            f" on {holder})" if holder else ")"
        )
        record.affected_jobs = [job_uuid]
        self._inject(record)
        if record.kind == "job-cancel":
            answer = await admin.call("POST", f"/api/v1/runners/jobs/{job_uuid}/cancel")
        else:
            answer = await admin.call("DELETE", f"/api/v1/runners/jobs/{job_uuid}")
        if answer.status_code == 400 and record.kind == "job-cancel":
            raise Skip(f"job {job_uuid[:8]} ended before the cancel ({answer.json().get('detail')})")
        if answer.status_code == 404:
            raise Skip(f"job {job_uuid[:8]} was gone before the {record.kind.removeprefix('job-')}")
        answer.raise_for_status()
        (self.cancelled_jobs if record.kind == "job-cancel" else self.deleted_jobs).add(job_uuid)
        if video_uuid:
            self.touched_videos.add(str(video_uuid))
        since = self._heal(record)
        conditions = [self._moving(record.affected_jobs, since)]
        if holder:
            conditions.append(self._released(self.cluster.runner(holder), job_uuid, since))
        return conditions

    # ------------------------------------------------------------------ lives

    def _live_workload(self) -> Lives:
        if self.lives is None:
            raise Skip("no lives in this run (--lives 0, or several coordinators)")
        return self.lives

    def _live_job_of(self, video_uuid: str) -> JobView | None:
        """The processing live job of a live, as the monitor last saw it."""
        latest = self.cluster.monitor.latest
        return next((j for j in latest.processing.values() if j.is_live and j.video_uuid == video_uuid), None)

    def _ffmpeg_of(self, job: JobView) -> list[FfmpegProcess]:
        """The ffmpeg processes running in the job's folder on its runner."""
        if job.runner is None:
            return []
        folder = self.cluster.runner(job.runner).paths.work_dir / job.uuid
        return [p for p in self.cluster.monitor.latest.ffmpeg if p.cwd == folder]

    def _transcoding(self, job: JobView) -> bool:
        """A live job whose ffmpeg runs and has delivered a segment (an update after its accept)."""
        return bool(self._ffmpeg_of(job)) and job.updated_at > (job.started_at or job.updated_at)

    def _claim_holder(self, record: FaultRecord, job: JobView | None) -> RunnerNode | None:
        """The runner that holds `job`, claimed when free (no runner fault muddles the end to judge)."""
        if job is None or job.runner is None:
            return None
        node = self.cluster.runner(job.runner)
        if node.name not in self.busy:
            self.busy.add(node.name)
            record.claims.add(node.name)
        return node

    async def _publisher_drop(self, rng: random.Random, record: FaultRecord) -> list[Condition]:
        """SIGKILL the publisher of a live (most of the time one whose job a runner transcodes); it does not
        come back. The live must end cleanly: its runner delivers what it had and completes the job, the
        live ends after the reconnect grace (`waiting` again when permanent), the runner lets it go."""
        lives = self._live_workload()
        want_segments = rng.random() < self.limits.busy_share
        until = time.monotonic() + self.limits.busy_wait_s * 2

        def candidates() -> list[str]:
            if lives.over:
                raise Skip("no live is published any more (the end of the run is near)")
            found = lives.publishing()
            if want_segments and time.monotonic() < until:
                found = [
                    p
                    for p in found
                    if (job := self._live_job_of(p.live.video_uuid)) is not None and self._transcoding(job)
                ]
            return [p.live.video_uuid for p in found]

        video_uuid = await self._claim(rng, record, "live being published", candidates, wait_s=30.0)
        publication = next((p for p in lives.publishing() if p.live.video_uuid == video_uuid), None)
        if publication is None:
            raise Skip(f"the publication of live {video_uuid[:8]} ended before the drop")
        job = self._live_job_of(video_uuid)
        holder = self._claim_holder(record, job)
        # A job whose ffmpeg transcodes (it delivered a segment) must deliver what it has and complete; one
        # still starting (probing the stream) may fail to read it: the live is then touched.
        transcoding = job is not None and self._transcoding(job)
        record.target = f"{publication.describe()}" + (
            f", job {job.uuid[:8]} on {job.runner}" + ("" if transcoding else " (starting)")
            if job is not None
            else ", no job processing"
        )
        record.affected_jobs = [job.uuid] if job is not None else []
        self._inject(record)
        await lives.drop(publication)
        since = self._heal(record)
        if not transcoding:
            self._touch_live(video_uuid, record)
        job_uuid = job.uuid if job is not None else None

        def verdict(s: Snapshot) -> None:
            after = s.lives.get(video_uuid)
            ended = _live_end(after)
            record.note = f"live {ended}"
            others = [
                r for r in self.touched(video_uuid, record.started_wall, time.time()) if r is not record
            ]
            if others:
                record.note += f" (also hit by #{', #'.join(str(r.number) for r in others)})"
                return  # another fault had a hand in its end
            expected = "waiting" if publication.live.permanent else "ended"
            if after is None or after.state != expected or after.error:
                record.anomalies.append(f"the live is {ended} after its publisher dropped, not {expected}")
            final = s.tracked.get(job_uuid) if job_uuid else None
            if transcoding and job_uuid is not None and (final is None or final.state != COMPLETED):
                record.anomalies.append(
                    f"its job {job_uuid[:8]} ended "
                    + (f"{_state_name(final.state)}: {final.error}" if final is not None else "deleted")
                    + ", not completed"
                )

        record.verdicts.append(verdict)
        record.lives = [video_uuid]
        # Whatever its session (a snapshot may predate the publisher's connection): a dropped publisher
        # does not come back, and its channel publishes again only once it saw the live leave `live`.
        conditions = [self._live_over(video_uuid, None, job_uuid)]
        if holder is not None and job_uuid is not None:
            conditions.append(self._released(holder, job_uuid, since))
        return conditions

    async def _live_cancel(self, rng: random.Random, record: FaultRecord) -> list[Condition]:
        """`POST /api/v1/runners/jobs/{uuid}/cancel` of a processing live job: the runner's ffmpeg must be
        gone within `LIVE_CANCEL_LIMIT_S`, the live ends (`ended` with the cancel as its error; `waiting`
        when permanent) and its publisher is disconnected (it publishes again: a new session of a permanent
        live, a refusal for an ended one)."""
        lives = self._live_workload()
        monitor = self.cluster.monitor
        want_ffmpeg = rng.random() < self.limits.busy_share
        until = time.monotonic() + self.limits.busy_wait_s * 2

        def candidates() -> list[str]:
            if lives.over:
                raise Skip("no live is published any more (the end of the run is near)")
            # Not on a runner another fault holds: the cancel's expectations need a runner that works.
            found = [
                j
                for j in monitor.latest.processing.values()
                if j.is_live and j.video_uuid not in self.busy and j.runner not in self.busy
            ]
            if want_ffmpeg and time.monotonic() < until:
                found = [j for j in found if self._transcoding(j)]
            return sorted(j.uuid for j in found)

        job_uuid = await self._claim(rng, record, "processing live job", candidates, wait_s=30.0)
        job = monitor.latest.processing.get(job_uuid)
        if job is None or job.video_uuid is None:
            raise Skip(f"live job {job_uuid[:8]} ended before the cancel")
        video_uuid = job.video_uuid
        session = job.session
        self.busy.add(video_uuid)
        record.claims.add(video_uuid)
        holder = self._claim_holder(record, job)
        record.target = f"live job {job_uuid[:8]} of live {video_uuid[:8]}" + (
            f" on {holder.name}" if holder else ""
        )
        record.affected_jobs = [job_uuid]
        ffmpeg = self._ffmpeg_of(job)
        watches = [w for w in [await _watch_end(p) for p in ffmpeg] if w is not None]
        self._inject(record)
        answer = await self.cluster.admin.call("POST", f"/api/v1/runners/jobs/{job_uuid}/cancel")
        asked = time.monotonic()
        if answer.status_code == 400:
            raise Skip(f"live job {job_uuid[:8]} ended before the cancel ({answer.json().get('detail')})")
        if answer.status_code == 404:
            raise Skip(f"live job {job_uuid[:8]} was gone before the cancel")
        answer.raise_for_status()
        self.cancelled_jobs.add(job_uuid)
        self._touch_live(video_uuid, record)  # its session ends with the cancel as its error
        since = self._heal(record)

        def verdict(s: Snapshot) -> None:
            gone = [w.result() - asked for w in watches if w.done()]
            spanned = self.touched(video_uuid, record.started_wall, time.time())
            others = [r for r in spanned if r is not record]
            if others:  # another fault (a SIGSTOP of that ffmpeg, say) had a hand in it
                record.note = f"also hit by #{', #'.join(str(r.number) for r in others)}"
            elif len(gone) < len(watches) or any(t > LIVE_CANCEL_LIMIT_S for t in gone):
                late = "still running" if len(gone) < len(watches) else f"gone {max(gone):.1f} s after it"
                record.anomalies.append(
                    f"the runner's ffmpeg was {late} (limit {LIVE_CANCEL_LIMIT_S:g} s after the cancel)"
                )
            final = s.tracked.get(job_uuid)
            if final is not None and final.state != CANCELLED:
                record.anomalies.append(f"the job ended {_state_name(final.state)}, not cancelled")
            after = s.lives.get(video_uuid)
            record.note = "; ".join(
                n
                for n in (
                    f"live {_live_end(after, session)}",
                    f"ffmpeg gone {max(gone):.1f} s after the cancel" if gone else "no ffmpeg seen",
                    record.note,
                )
                if n
            )

        record.verdicts.append(verdict)
        record.lives = [video_uuid]
        conditions = [self._live_over(video_uuid, session, job_uuid)]
        if holder is not None:
            conditions.append(self._released(holder, job_uuid, since))
        return conditions

    # ------------------------------------------------------------------ ffmpeg

    async def _ffmpeg_stop(self, rng: random.Random, record: FaultRecord) -> list[Condition]:
        owners: dict[str, tuple[RunnerNode, FfmpegProcess]] = {}

        def running() -> list[str]:
            found = []
            for node in self.cluster.runners:
                folder = node.paths.work_dir
                for proc in self.cluster.monitor.latest.ffmpeg:
                    if proc.state != "T" and proc.cwd is not None and proc.cwd.parent == folder:
                        owners[proc.cwd.name] = (node, proc)
                        found.append(node.name)
            return found

        name = await self._claim(rng, record, "runner running an ffmpeg", running)
        node = self.cluster.runner(name)
        mine = sorted(
            ((p.cwd.name, p) for n, p in owners.values() if n is node and p.cwd is not None),
            key=lambda item: item[0],
        )
        if not mine:
            raise Skip(f"the ffmpeg of {name} ended before it could be stopped")
        job_uuid, proc = rng.choice(mine)
        variant = rng.choice(["SIGCONT after the stall limit", "left to the watchdog"])
        hold_s = self.limits.stall_s + rng.uniform(1.0, WATCHDOG_MARGIN_S)
        # A live's ffmpeg has the live processor's stall limit (5 segments, at least 20 s): frozen for
        # less, it must go on (the SIGCONT variant); left alone, that watchdog must kill it.
        job = self.cluster.monitor.latest.processing.get(job_uuid)
        live = job is not None and job.is_live
        stall_s = stall_after_s(job.segment_s or 4.0) if job is not None and live else self.limits.stall_s
        if live and variant.startswith("SIGCONT"):
            variant = f"SIGCONT after {hold_s:.1f} s, under the live stall limit"
        record.variant = variant + (" (a live's ffmpeg)" if live else "")
        record.target = f"{name}, ffmpeg {proc.pid} of job {job_uuid[:8]}"
        record.affected_jobs = [job_uuid]
        ended = await _watch_end(proc)
        if ended is None:
            raise Skip(f"ffmpeg {proc.pid} ended before it could be stopped")
        self._inject(record)
        try:
            os.kill(proc.pid, signal.SIGSTOP)
        except ProcessLookupError:
            raise Skip(f"ffmpeg {proc.pid} ended before it could be stopped") from None
        stopped_at = time.monotonic()
        limit_s = stall_s + WATCHDOG_MARGIN_S
        resumed = False
        if variant.startswith("SIGCONT"):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(ended), hold_s)
            if not ended.done():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
                resumed = live
                if not live:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(ended), limit_s - hold_s)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(ended), limit_s)
        if ended.done():
            killed_after = ended.result() - stopped_at
            record.note = f"ffmpeg gone {killed_after:.1f} s after SIGSTOP (stall limit {stall_s:g} s)"
            if killed_after > limit_s:
                record.anomalies.append(f"the watchdog killed it {killed_after:.1f} s after SIGSTOP")
        elif resumed:
            record.note = f"resumed after {time.monotonic() - stopped_at:.1f} s (stall limit {stall_s:g} s)"
        else:
            record.anomalies.append(
                f"ffmpeg {proc.pid} still alive {limit_s:g} s after SIGSTOP (stall limit "
                f"{stall_s:g} s): the watchdog did not kill it"
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
        since = self._heal(record)
        return [self._serving(node, since), self._moving(record.affected_jobs, since)]

    # ------------------------------------------------------------------ disk

    async def _disk_full(self, rng: random.Random, record: FaultRecord) -> list[Condition]:
        if not any(n.tmpfs for n in self.cluster.runners):
            raise Skip(self.cluster.runners[0].tmpfs_problem or "no runner work folder on a tmpfs")
        node = await self._claim_runner(rng, record, lambda n: n.tmpfs)
        hold_s = rng.uniform(3.0, 8.0)
        record.target, record.affected_jobs = node.name, self._jobs_on(node)
        self._inject(record)
        filled = await asyncio.to_thread(_fill, node.filler)
        record.variant = f"{hold_s:.1f} s, {filled / 1024**2:.0f} MB written until ENOSPC"
        try:
            await asyncio.sleep(hold_s)  # the fault's duration
        finally:
            node.filler.unlink(missing_ok=True)
        since = self._heal(record)
        return [self._serving(node, since), self._moving(record.affected_jobs, since)]

    # ------------------------------------------------------------------ registration

    async def _registration_delete(self, rng: random.Random, record: FaultRecord) -> list[Condition]:
        node = await self._claim_runner(rng, record)
        admin = self.cluster.admin
        record.target, record.affected_jobs = node.name, self._jobs_on(node)
        found = [r for r in await admin.runners() if r["name"] == node.name]
        if not found:
            raise Skip(f"{node.name} is not registered on the coordinator")
        self._inject(record)
        (await admin.call("DELETE", f"/api/v1/runners/{found[0]['id']}")).raise_for_status()
        deleted_at = time.monotonic()

        def flagged(s: Snapshot) -> bool:
            view = s.runners.get(node.name)
            return bool(
                view is not None
                and view.state is not None
                and any(i.registration != "registered" for i in view.state.instances)
            )

        seen = await self.cluster.monitor.until(flagged, NOTICE_LIMIT_S)
        if seen is None:
            record.anomalies.append(
                f"{node.name} did not report `needs registration` within {NOTICE_LIMIT_S:g} s"
            )
            # What an operator does then: drop the stale entry from the config file.
            await run_cli(
                node.env,
                "unregister",
                "--id",
                node.runner_id,
                "--url",
                node.proxy.url,
                "--runner-name",
                node.name,
                "--force",
            )
        else:
            record.note = f"noticed after {time.monotonic() - deleted_at:.1f} s"
        record.variant = "re-registered with `tuberunner register`"
        await node.register(admin)
        since = self._heal(record)
        return [self._serving(node, since), self._moving(record.affected_jobs, since)]


_STATE_NAMES = {
    PENDING: "pending",
    PROCESSING: "processing",
    COMPLETED: "completed",
    CANCELLED: "cancelled",
    WAITING: "waiting for its parent",
}


def _state_name(state: int) -> str:
    return _STATE_NAMES.get(state, "errored" if state in FINAL_STATES else f"state {state}")


def _live_end(live: LiveView | None, session: int | None = None) -> str:
    if live is None:
        return "gone"
    if live.state == "live" and session is not None and live.session != session:
        return f"in a new session ({live.session})"
    return live.state + (f" ({live.error})" if live.error else "")


def _fill(path: os.PathLike[str]) -> int:
    """Write to `path` until its file system is full; the size of the file."""
    with open(path, "wb", buffering=0) as handle:
        fd = handle.fileno()
        with contextlib.suppress(OSError):
            st = os.statvfs(path)
            os.posix_fallocate(fd, 0, max(st.f_bavail * st.f_frsize, 1))
        handle.seek(0, os.SEEK_END)
        for size in (1024 * 1024, 4096):  # what a big block leaves, small blocks take
            chunk = b"\0" * size
            with contextlib.suppress(OSError):
                while handle.write(chunk):
                    pass
        return os.fstat(fd).st_size


async def _watch_end(proc: FfmpegProcess) -> asyncio.Future[float] | None:
    """A future set to the monotonic time at which `proc` ends (through a pidfd); None if already gone."""
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        return None
    ended: asyncio.Future[float] = loop.create_future()

    def mark() -> None:
        loop.remove_reader(fd)
        os.close(fd)
        if not ended.done():
            ended.set_result(time.monotonic())

    loop.add_reader(fd, mark)
    return ended
