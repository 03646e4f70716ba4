"""Pending jobs that no connected runner takes, found out from what runners ask for and accept.

PeerTube offers every pending job to every runner and lets each runner pick, so nothing tells the server
that no runner will ever take a job of some type (the 6.x official runner predates storyboards; a runner
may have transcription disabled). The coordinator works it out from the runners' own calls:

* a runner that sends `jobTypes` with `jobs/request` (Tuberunner runners; 8.x official runners when not
  every type is enabled) takes exactly those types;
* a runner that sends none (6.x official runners; 8.x ones with every type enabled) filters the offer
  itself and accepts the first job it supports. It *passes over* a type when it accepts a job that its
  last offer listed after one of that type, or when, holding no job, it was offered that type and made no
  call in the `IDLE_GRACE_S` that followed (half the wait when that is shorter). A type passed over stays
  so until the runner accepts or tries a job of it, or reports another version.

Such a runner is no longer offered storyboards once it passes them over: the coordinator makes them, and
ten of them at the head of the queue (priority 95) would hide every other job from it (PeerTube 6.3's
starvation). Other types stay offered: a runner that does not take the first job it supports (nothing in
the protocol says it must) would be judged wrongly, and must never miss jobs that only it would take.

A runner is *present* while it holds a processing job, has called within the wait (`unclaimed_after_s`)
or has a socket open to this process. A type is *covered* while a present runner may take it. A pending
job is *unclaimed* once it has been pending for the wait and its type has not been covered for as long
(so a job whose runners are merely busy never is). The sweep logs a warning once per unclaimed job,
`/metrics` counts them by type, the admin and ingest APIs mark them, and an unclaimed storyboard is made by
the coordinator itself (`builtin_storyboards`). Nothing else treats such a job specially: it stays a
pending job of the state machine, offered to every runner that asks.

Offers and accepts are seen by the process that served them. With several coordinator processes, a runner
none of whose requests reached this process counts here as taking every type: a job is never called
unclaimed on too little evidence.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from tuberunner.coordinator.config import CoordinatorConfig
from tuberunner.coordinator.database import Database
from tuberunner.coordinator.models import Job, iso
from tuberunner.coordinator.schema import jobs, runners
from tuberunner.protocol.jobs import JobState, JobType

log = logging.getLogger(__name__)

# How long a runner with nothing in hand may stay silent after an offer before the types it was offered
# count as passed over (it asks again at once when it takes a job or finishes one); at most half the wait.
IDLE_GRACE_S: Final = 10.0
# Unclaimed jobs read per sweep (the counts are exact whatever their number).
_SWEEP_LIMIT: Final = 1000
# Warnings logged one by one per sweep; the rest are summed up in one line.
_LOGGED_PER_SWEEP: Final = 20

Contact = tuple[float, str | None]


def fallback_of(job_type: str) -> str | None:
    """What happens to an unclaimed job of this type besides waiting: only storyboards have an answer."""
    return "coordinator" if job_type == JobType.STORYBOARD else None


@dataclass(frozen=True)
class Unclaimed:
    uuid: str
    type: str
    video_uuid: str | None
    pending_since: float
    # Since when no present runner has been able to take its type (at least the wait ago).
    unclaimed_since: float

    @property
    def fallback(self) -> str | None:
        return fallback_of(self.type)

    def as_json(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "type": self.type,
            "videoUUID": self.video_uuid,
            "pendingSince": iso(self.pending_since),
            "unclaimedSince": iso(self.unclaimed_since),
            "fallback": self.fallback,
        }


@dataclass
class _Offer:
    """A runner's last `jobs/request`: when, what it declared, and what it was offered, in order."""

    at: float
    declared: frozenset[str] | None
    offered: tuple[tuple[str, str], ...]
    tried: set[str] = field(default_factory=set)
    judged: bool = False


@dataclass(frozen=True)
class _Snapshot:
    runners: dict[int, float]  # registered runners and their last contact
    holders: frozenset[int]  # runners holding a processing job


class ClaimWatch:
    def __init__(
        self,
        db: Database,
        config: CoordinatorConfig,
        *,
        contact_of: Callable[[int], Contact | None],
        connected: Callable[[], Iterable[int]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.wait_s = config.unclaimed_after_s
        self.idle_grace_s = min(IDLE_GRACE_S, self.wait_s / 2)
        self.contact_of = contact_of
        self.connected = connected
        self.clock = clock
        started = clock()
        # Runners reconnect after a start: every type counts as covered then.
        self._covered_at: dict[str, float] = {str(t): started for t in JobType}
        self._offers: dict[int, _Offer] = {}
        self._passed_over: dict[int, set[str]] = {}
        self._ignored: set[int] = set()
        self._warned: set[str] = set()
        # Unclaimed jobs by type, as of the last sweep (for /metrics).
        self.counts: dict[str, int] = {}

    @property
    def sweep_interval_s(self) -> float:
        return min(5.0, max(0.05, self.wait_s / 10))

    # ------------------------------------------------------------------ what runners do (hot path: cheap)

    def asked(
        self, runner_id: int, declared: frozenset[str] | None, offered: Sequence[tuple[str, str]]
    ) -> None:
        self._offers[runner_id] = _Offer(self.clock(), declared, tuple(offered))

    def tried(self, runner_id: int, job_uuid: str, job_type: str, *, accepted: bool) -> None:
        """The runner tried to accept this job (`accepted`: and got it)."""
        passed = self._passed_over.get(runner_id)
        if passed is not None:
            passed.discard(job_type)
        offer = self._offers.get(runner_id)
        if offer is None:
            return
        offer.tried.add(job_uuid)
        if not accepted or offer.declared is not None:
            return
        listed = [uuid for uuid, _ in offer.offered]
        if job_uuid not in listed:
            return
        # It takes the first job it supports: whatever it skipped to reach this one, it does not take.
        skipped = {t for uuid, t in offer.offered[: listed.index(job_uuid)] if uuid not in offer.tried}
        skipped.discard(job_type)
        if skipped:
            self._passed_over.setdefault(runner_id, set()).update(skipped)

    def forget(self, runner_ids: Iterable[int]) -> None:
        """Removed runners, or a runner that reports another version: what it took no longer tells."""
        for runner_id in runner_ids:
            self._offers.pop(runner_id, None)
            self._passed_over.pop(runner_id, None)

    def ignore(self, runner_id: int) -> None:
        """The coordinator's own runner row: it never asks, and is no evidence of anything."""
        self._ignored.add(runner_id)

    def offer_types(self, runner_id: int) -> frozenset[str] | None:
        """What to offer a runner that sends no `jobTypes`: every type but those it passes over and the
        coordinator makes itself (storyboards: priority 95, so ten of them would hide every transcoding
        job from it, PeerTube 6.3's starvation); None: every type. Only those: a runner judged wrongly
        (one that does not take the first job it supports) must never miss jobs only it would take."""
        passed = {t for t in self._passed_over.get(runner_id, ()) if fallback_of(t) is not None}
        if not passed:
            return None
        return frozenset(t for t in self._covered_at if t not in passed)

    def may_take(self, runner_id: int, job_type: str) -> bool:
        offer = self._offers.get(runner_id)
        if offer is not None and offer.declared is not None:
            return job_type in offer.declared
        return job_type not in self._passed_over.get(runner_id, ())

    # ------------------------------------------------------------------ reads

    def unclaimed_since(self, job: Job) -> float | None:
        """When this job's type stopped being covered, if the job is unclaimed now."""
        if job.state != JobState.PENDING:
            return None
        since = max(job.updated_at, self._covered_at.get(str(job.type), job.updated_at))
        return since if self.clock() - since >= self.wait_s else None

    def _stale_types(self, now: float) -> list[str]:
        return sorted(t for t, at in self._covered_at.items() if now - at >= self.wait_s)

    async def page(self, start: int = 0, count: int = _SWEEP_LIMIT) -> tuple[int, list[Unclaimed]]:
        """The unclaimed jobs now, most urgent first (as runners are offered them), and their total."""
        now = self.clock()
        stale = self._stale_types(now)
        if not stale:
            return 0, []
        conditions = (
            jobs.c.state == JobState.PENDING,
            jobs.c.type.in_(stale),
            jobs.c.updated_at <= now - self.wait_s,
        )
        columns = (jobs.c.uuid, jobs.c.type, jobs.c.updated_at, jobs.c.private_payload)

        def read(conn: Connection) -> tuple[int, list[Any]]:
            total = conn.execute(select(func.count()).select_from(jobs).where(*conditions)).scalar_one()
            rows = conn.execute(
                select(*columns)
                .where(*conditions)
                .order_by(jobs.c.priority, jobs.c.id)
                .offset(start)
                .limit(count)
            ).all()
            return int(total), list(rows)

        total, rows = await self.db.read_statement(read)
        found = []
        for uuid, job_type, updated_at, private in rows:
            video = private.get("videoUUID") if isinstance(private, dict) else None
            since = max(updated_at, self._covered_at[job_type])
            found.append(
                Unclaimed(uuid, job_type, video if isinstance(video, str) else None, updated_at, since)
            )
        return total, found

    # ------------------------------------------------------------------ the sweep

    async def sweep(self) -> list[Unclaimed]:
        """Judge runners, update which types are covered, warn about newly unclaimed jobs; returns the
        unclaimed jobs (up to a thousand, most urgent first)."""
        now = self.clock()
        snapshot = await self.db.read_statement(_read_snapshot)
        contacts = dict(snapshot.runners)
        for runner_id in contacts:
            recent = self.contact_of(runner_id)  # not yet flushed to the database
            if recent is not None:
                contacts[runner_id] = max(contacts[runner_id], recent[0])
        self._judge_idle(now, contacts, snapshot.holders)
        present = {r for r, at in contacts.items() if now - at <= self.wait_s} | set(snapshot.holders)
        present |= {r for r in self.connected() if r in contacts}
        present -= self._ignored
        for job_type in self._covered_at:
            if any(self.may_take(r, job_type) for r in present):
                self._covered_at[job_type] = now
        total, found = await self.page()
        self.counts = {}
        for job in found:
            self.counts[job.type] = self.counts.get(job.type, 0) + 1
        if total > len(found):
            self.counts = await self._count_by_type(now)
        self._warn(found)
        return found

    def _judge_idle(self, now: float, contacts: dict[int, float], holders: frozenset[int]) -> None:
        """A runner holding nothing that stayed silent after an offer does not take what it was offered."""
        for runner_id, offer in self._offers.items():
            if offer.judged or offer.declared is not None or now - offer.at < self.idle_grace_s:
                continue
            offer.judged = True
            silent = contacts.get(runner_id, offer.at) <= offer.at
            if silent and not offer.tried and runner_id not in holders and offer.offered:
                self._passed_over.setdefault(runner_id, set()).update(t for _, t in offer.offered)

    async def _count_by_type(self, now: float) -> dict[str, int]:
        stale = self._stale_types(now)

        def read(conn: Connection) -> dict[str, int]:
            rows = conn.execute(
                select(jobs.c.type, func.count())
                .where(
                    jobs.c.state == JobState.PENDING,
                    jobs.c.type.in_(stale),
                    jobs.c.updated_at <= now - self.wait_s,
                )
                .group_by(jobs.c.type)
            ).all()
            return {str(t): int(n) for t, n in rows}

        return await self.db.read_statement(read)

    def _warn(self, found: list[Unclaimed]) -> None:
        fresh = [job for job in found if job.uuid not in self._warned]
        now = self.clock()
        for job in fresh[:_LOGGED_PER_SWEEP]:
            log.warning(
                "job %s (%s) of video %s has been pending %.0f s and no connected runner has taken %s jobs "
                "for %.0f s; %s",
                job.uuid,
                job.type,
                job.video_uuid,
                now - job.pending_since,
                job.type,
                now - job.unclaimed_since,
                _what_happens(job.type),
            )
        if len(fresh) > _LOGGED_PER_SWEEP:
            log.warning("%d more job(s) no connected runner takes", len(fresh) - _LOGGED_PER_SWEEP)
        self._warned = {job.uuid for job in found}


def _what_happens(job_type: str) -> str:
    if job_type == JobType.STORYBOARD:
        return "the coordinator makes this storyboard itself"
    if job_type == JobType.TRANSCRIPTION:
        return (
            "its captions wait for a runner with transcription enabled (the video is published without them)"
        )
    return "it waits for a runner that takes this job type"


def _read_snapshot(conn: Connection) -> _Snapshot:
    registered = {int(r): float(at) for r, at in conn.execute(select(runners.c.id, runners.c.last_contact))}
    holders = conn.execute(
        select(jobs.c.runner_id)
        .where(jobs.c.state == JobState.PROCESSING, jobs.c.runner_id.is_not(None))
        .distinct()
    ).scalars()
    return _Snapshot(registered, frozenset(int(r) for r in holders))
