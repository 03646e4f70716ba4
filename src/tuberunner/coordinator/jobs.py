"""The job state machine (spec §6) with leases, as short database transactions.

Every transition is one conditional UPDATE (`... WHERE state = <expected>`), so exactly one of several
racing calls wins on SQLite and PostgreSQL alike, and every answered call is committed before it is
answered. Beyond PeerTube 6.3 (spec §13):

* a lease (`lease_expires_at`), renewed by every accepted update, is watched for every job type and for
  `completing`; an expired processing job is re-queued, and errored after `max_lease_expiries` so a job
  that kills its runners cannot loop forever;
* completion runs after the `success` answer is committed and is redone after a crash;
* a retried `success` with the same job token is answered 204 and never completes twice;
* children of a parent whose completion failed are not released (they become `parent errored`).
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import secrets
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

from sqlalchemy import (
    Float,
    Integer,
    Text,
    and_,
    bindparam,
    case,
    cast,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from tuberunner.coordinator.config import CoordinatorConfig
from tuberunner.coordinator.database import Database
from tuberunner.coordinator.models import Job, JobResult, JobSpec, absolutize
from tuberunner.coordinator.problems import BadRequest, Conflict, NotFound
from tuberunner.coordinator.schema import jobs
from tuberunner.coordinator.storage import Storage, StorageError, StorageUnavailable, result_prefix
from tuberunner.protocol.errors import ErrorCode, Message
from tuberunner.protocol.jobs import (
    CANCELLABLE_STATES,
    JOB_TOKEN_PREFIX,
    MAX_AVAILABLE_JOBS,
    MAX_FAILURES,
    NON_ABORTABLE_TYPES,
    JobState,
    JobType,
)

log = logging.getLogger(__name__)

# The pending view kept in memory; `jobs/request` falls back to SQL only when a type filter finds fewer
# than 10 matches among these.
_PENDING_CACHE_SIZE = 1000
# How long a `success` answer waits for completion before answering anyway (completion goes on).
SUCCESS_WAIT_S = 30.0


class Completer(Protocol):
    """Type-specific completion: moves result files where they belong. Must be idempotent: it is run
    again from the start when a crash interrupted it."""

    async def __call__(self, job: Job, result: JobResult) -> None: ...


@dataclass(frozen=True)
class _Pending:
    """A pending job as `jobs/request` offers it; views are sorted by `key`, as the SQL is."""

    uuid: str
    type: str
    # As stored (JSON text) until an answer needs it: reading the view decodes nothing, so a read
    # is short and seldom crosses a change.
    stored_payload: str | dict[str, Any]
    priority: int
    id: int

    @property
    def key(self) -> tuple[int, int]:
        return (self.priority, self.id)

    @cached_property
    def payload(self) -> dict[str, Any]:
        if isinstance(self.stored_payload, str):
            decoded: dict[str, Any] = json.loads(self.stored_payload)
            return decoded
        return self.stored_payload


@dataclass(frozen=True)
class AvailableJobs:
    """The answer of `jobs/request` (JSON bytes) and what it offers, in order: (uuid, type) pairs."""

    body: bytes
    offered: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class _Load:
    """One read of the pending view: `seq` counts the reads started, so a waiter can tell whether a
    read started after it arrived (then its result is good enough for it, kept or not)."""

    seq: int
    entries: list[_Pending]
    complete: bool


@dataclass(frozen=True)
class _Patch:
    """A committed change of the pending set: a job taken (accepted) or back to pending."""

    taken: str | None
    requeued: _Pending | None


def _patched(
    view: list[_Pending], complete: bool, patches: Iterable[_Patch]
) -> tuple[list[_Pending], bool] | None:
    """Apply changes to a view, in place and in commit order; None when it must be read again.
    Idempotent: taking a job the view lacks, or putting back one it has, changes nothing."""
    for patch in patches:
        if patch.taken is not None:
            for index, entry in enumerate(view):
                if entry.uuid == patch.taken:
                    del view[index]
                    break
            if not complete and len(view) < MAX_AVAILABLE_JOBS:
                return None  # jobs beyond the view would be missing from an answer
        requeued = patch.requeued
        if requeued is None or any(e.uuid == requeued.uuid for e in view):
            continue
        index = bisect.bisect_left(view, requeued.key, key=lambda e: e.key)
        if index == len(view) and not complete:
            continue  # beyond the view: a later read finds it
        view.insert(index, requeued)
        if len(view) > _PENDING_CACHE_SIZE:
            view.pop()
            complete = False
    return view, complete


def _pending_of(job: Job) -> _Pending:
    return _Pending(job.uuid, str(job.type), job.payload, job.priority, job.id)


def new_job_token() -> str:
    return JOB_TOKEN_PREFIX + str(uuidlib.uuid4())


class JobService:
    def __init__(
        self,
        db: Database,
        config: CoordinatorConfig,
        storage: Storage,
        *,
        notify_pending: Callable[[], None],
        completer: Completer,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.config = config
        self.storage = storage
        self.notify_pending = notify_pending
        self.completer = completer
        self.clock = clock
        # The first pending jobs in (priority, id) order, patched in place by this process's own
        # accepts and aborts, dropped by any other change; None until read again.
        self._pending: list[_Pending] | None = None
        # Bumped by every change: a view read while a change committed is never kept as read.
        self._generation = 0
        self._pending_loaded_at = 0.0
        self._pending_complete = False
        self._loads_started = 0
        self._last_load: _Load | None = None
        # The changes patched in while a read of the view is under way (None: no read, or one that
        # cannot be kept).
        self._crossing: list[_Patch] | None = None
        # Called after every committed change (another coordinator process may need to know).
        self.on_change: Callable[[], None] | None = None
        # Told, after the commit, which runners lost a job they were processing to someone else's
        # decision (cancel, delete, lease expiry): they stop its work without waiting for a heartbeat.
        self.on_taken_back: Callable[[set[int]], None] | None = None
        self._pending_lock = asyncio.Lock()
        self._answers: dict[tuple[str, frozenset[str] | None], AvailableJobs] = {}
        self._completions: dict[int, asyncio.Task[None]] = {}
        self.lease_expiries_total = 0
        self._build_statements()

    def _build_statements(self) -> None:
        """The hot transitions as statements built once: only their parameters change per call."""
        now = bindparam("now", type_=Float)
        lease: ColumnElement[Any] = now + self.config.default_lease_s
        if self.config.lease_s:
            lease = now + case(
                *((jobs.c.type == str(t), self.config.lease_for(t)) for t in JobType),
                else_=self.config.default_lease_s,
            )
        stored_payload = cast(jobs.c.payload, Text).label("payload")
        pending_columns = (jobs.c.uuid, jobs.c.type, stored_payload, jobs.c.priority, jobs.c.id)
        self._by_uuid_statement = select(jobs).where(jobs.c.uuid == bindparam("job_uuid"))
        self._of_runner_statement = select(jobs).where(
            jobs.c.uuid == bindparam("job_uuid"),
            jobs.c.processing_job_token == bindparam("job_token"),
            jobs.c.runner_id == bindparam("runner"),
        )
        self._view_statement = (
            select(*pending_columns)
            .where(jobs.c.state == JobState.PENDING)
            .order_by(jobs.c.priority, jobs.c.id)
            .limit(_PENDING_CACHE_SIZE + 1)
        )
        self._of_types_statement = (
            select(*pending_columns)
            .where(jobs.c.state == JobState.PENDING, jobs.c.type.in_(bindparam("types", expanding=True)))
            .order_by(jobs.c.priority, jobs.c.id)
            .limit(MAX_AVAILABLE_JOBS)
        )
        held = (
            jobs.c.uuid == bindparam("job_uuid"),
            jobs.c.processing_job_token == bindparam("job_token"),
            jobs.c.runner_id == bindparam("runner"),
            jobs.c.state == JobState.PROCESSING,
        )
        self._accept_statement = (
            update(jobs)
            .where(jobs.c.uuid == bindparam("job_uuid"), jobs.c.state == JobState.PENDING)
            .values(
                state=JobState.PROCESSING,
                processing_job_token=bindparam("new_token"),
                runner_id=bindparam("runner"),
                started_at=now,
                progress=None,
                lease_expires_at=lease,
                updated_at=now,
            )
            .returning(*jobs.c)
        )
        self._update_statement = (
            update(jobs)
            .where(*held, jobs.c.type != str(JobType.LIVE_RTMP_HLS))
            .values(
                lease_expires_at=lease,
                updated_at=now,
                progress=func.coalesce(bindparam("new_progress", type_=Integer), jobs.c.progress),
            )
        )
        self._abort_statement = (
            update(jobs)
            .where(*held, jobs.c.type.notin_(sorted(str(t) for t in NON_ABORTABLE_TYPES)))
            .values(
                state=JobState.PENDING,
                processing_job_token=None,
                runner_id=None,
                progress=None,
                started_at=None,
                lease_expires_at=None,
                updated_at=now,
            )
            .returning(jobs.c.id, jobs.c.type, jobs.c.priority, jobs.c.payload)
        )

    # ---------------------------------------------------------------- reads

    async def get(self, job_uuid: str) -> Job | None:
        params = {"job_uuid": job_uuid}
        row = await self.db.read_statement(
            lambda conn: conn.execute(self._by_uuid_statement, params).mappings().first()
        )
        return Job.from_row(row) if row else None

    async def get_by_id(self, job_id: int) -> Job | None:
        async with self.db.read() as conn:
            row = (await conn.execute(select(jobs).where(jobs.c.id == job_id))).mappings().first()
        return Job.from_row(row) if row else None

    async def job_of_runner(self, job_uuid: str, runner_id: int | None, job_token: str) -> Job:
        """The common check of spec §3.11 (step 2): this job, this token, this runner — else 404."""
        if runner_id is None:
            raise NotFound(Message.UNKNOWN_RUNNER_JOB)
        params = {"job_uuid": job_uuid, "job_token": job_token, "runner": runner_id}
        row = await self.db.read_statement(
            lambda conn: conn.execute(self._of_runner_statement, params).mappings().first()
        )
        if row is None:
            raise NotFound(Message.UNKNOWN_RUNNER_JOB)
        return Job.from_row(row)

    async def available_jobs(self, base_url: str, job_types: frozenset[str] | None) -> AvailableJobs:
        """The answer of `jobs/request`, served from memory while no job changed state."""
        if self._pending is not None and time.monotonic() - self._pending_loaded_at > self.config.view_ttl_s:
            self.invalidate()  # a bound on staleness when another process changed jobs unannounced
        key = (base_url, job_types)
        cached = self._answers.get(key)
        if cached is not None:
            return cached
        generation = self._generation
        entries = await self._available(job_types)
        body = json.dumps(
            {
                "availableJobs": [
                    {"uuid": e.uuid, "type": e.type, "payload": absolutize(e.payload, base_url)}
                    for e in entries
                ]
            },
            separators=(",", ":"),
        ).encode()
        answer = AvailableJobs(body, tuple((e.uuid, e.type) for e in entries))
        if generation == self._generation and self._pending is not None and len(self._answers) < 256:
            self._answers[key] = answer
        return answer

    async def _available(self, job_types: frozenset[str] | None) -> list[_Pending]:
        pending, complete = self._pending, self._pending_complete
        if pending is None:
            pending, complete = await self._load_view()
        if job_types is None:
            return pending[:MAX_AVAILABLE_JOBS]
        chosen = [e for e in pending if e.type in job_types][:MAX_AVAILABLE_JOBS]
        if len(chosen) == MAX_AVAILABLE_JOBS or complete:
            return chosen
        params = {"types": sorted(job_types)}
        rows = await self.db.read_statement(lambda conn: conn.execute(self._of_types_statement, params).all())
        return [_Pending(r.uuid, r.type, r.payload, r.priority, r.id) for r in rows]

    async def _load_view(self) -> tuple[list[_Pending], bool]:
        """The pending view, read once for all the callers waiting: a caller takes the kept view, or
        the result of a read that started after it arrived (even one not kept), else reads itself.

        A read that crossed a change is never kept as read: accepts and aborts committed meanwhile are
        patched into it (a patch is idempotent, so one the read already saw changes nothing); any other
        change crossing it means it is not kept at all."""
        arrived_after = self._loads_started
        async with self._pending_lock:
            if self._pending is not None:
                return self._pending, self._pending_complete
            last = self._last_load
            if last is not None and last.seq > arrived_after:
                return last.entries, last.complete
            self._loads_started += 1
            seq = self._loads_started
            generation = self._generation
            started_at = time.monotonic()
            crossing: list[_Patch] = []
            self._crossing = crossing
            try:
                rows = await self.db.read_statement(lambda conn: conn.execute(self._view_statement).all())
                patchable = self._crossing is crossing
            finally:
                if self._crossing is crossing:
                    self._crossing = None
            entries = [_Pending(r.uuid, r.type, r.payload, r.priority, r.id) for r in rows]
            complete = len(entries) <= _PENDING_CACHE_SIZE
            del entries[_PENDING_CACHE_SIZE:]
            kept: tuple[list[_Pending], bool] | None = None
            if generation == self._generation:
                kept = entries, complete
            elif patchable:
                kept = _patched(list(entries), complete, crossing)
            if kept is not None:
                entries, complete = kept
                # The kept view is patched in place; a waiter's answer must not move under it.
                self._pending, self._pending_complete = list(entries), complete
                self._pending_loaded_at = started_at
            self._last_load = _Load(seq, entries, complete)
            return entries, complete

    def invalidate(self) -> None:
        """Forget the in-memory pending view; the next `jobs/request` reads the database."""
        self._generation += 1
        self._pending = None
        self._crossing = None  # a read under way cannot be kept either
        self._answers.clear()

    def _changed(
        self, *, new_pending: bool, taken: str | None = None, requeued: _Pending | None = None
    ) -> None:
        """Call after every committed transition: patches the pending view for an accept (`taken`) or a
        job back to pending (`requeued`), drops it for anything else; pings runners if needed."""
        if taken is not None or requeued is not None:
            patch = _Patch(taken, requeued)
            self._generation += 1
            self._answers.clear()
            if self._crossing is not None:
                self._crossing.append(patch)
            if self._pending is not None:
                patched = _patched(self._pending, self._pending_complete, [patch])
                if patched is None:
                    self._pending = None
                else:
                    self._pending_complete = patched[1]
        else:
            self.invalidate()
        if new_pending:
            self.notify_pending()
        if self.on_change is not None:
            self.on_change()

    # ---------------------------------------------------------------- creation

    async def create(self, video_id: int | None, specs: Sequence[JobSpec]) -> None:
        """Create a job graph in one transaction; parents must come before their children."""
        now = self.clock()
        ids: dict[str, int] = {}
        any_pending = False
        async with self.db.write() as conn:
            for spec in specs:
                parent_id = ids[spec.parent_uuid] if spec.parent_uuid else None
                state = JobState.WAITING_FOR_PARENT_JOB if parent_id else JobState.PENDING
                any_pending |= state == JobState.PENDING
                result = await conn.execute(
                    insert(jobs).values(
                        uuid=spec.uuid,
                        type=str(spec.type),
                        state=state,
                        priority=spec.priority,
                        payload=spec.payload,
                        private_payload=spec.private_payload,
                        failures=0,
                        lease_expiries=0,
                        parent_id=parent_id,
                        video_id=video_id,
                        created_at=now,
                        updated_at=now,
                    )
                )
                inserted = result.inserted_primary_key
                assert inserted is not None
                ids[spec.uuid] = int(inserted[0])
        self._changed(new_pending=any_pending)

    # ---------------------------------------------------------------- runner transitions

    async def try_accept(self, job_uuid: str, runner_id: int) -> Job | None:
        """The usual accept in one statement (conditional UPDATE … RETURNING). None when it matched
        nothing: then `accept` after the usual checks gives the exact answer."""
        view = self._pending
        if view is not None and self._pending_complete and all(e.uuid != job_uuid for e in view):
            return None  # not pending as far as this process knows: no write for a lost race
        token, now = new_job_token(), self.clock()
        params = {"job_uuid": job_uuid, "new_token": token, "runner": runner_id, "now": now}
        try:
            row = await self.db.write_statement(
                lambda conn: conn.execute(self._accept_statement, params).mappings().first()
            )
        except IntegrityError as exc:
            # The runner was removed by another coordinator process since its token was checked.
            raise NotFound(Message.UNKNOWN_RUNNER_TOKEN, code=ErrorCode.UNKNOWN_RUNNER_TOKEN) from exc
        if row is None:
            return None
        self._changed(new_pending=False, taken=job_uuid)
        return Job.from_row(row)

    async def try_update(self, job_uuid: str, runner_id: int, job_token: str, progress: int | None) -> bool:
        """The usual heartbeat in one statement; False when it matched nothing (then: `update`)."""
        params = {
            "job_uuid": job_uuid,
            "job_token": job_token,
            "runner": runner_id,
            "now": self.clock(),
            "new_progress": progress,
        }
        matched = await self.db.write_statement(
            lambda conn: conn.execute(self._update_statement, params).rowcount
        )
        return bool(matched == 1)

    async def try_abort(self, job_uuid: str, runner_id: int, job_token: str) -> bool:
        """The usual abort in one statement; False when it matched nothing (then: `abort`)."""
        params = {"job_uuid": job_uuid, "job_token": job_token, "runner": runner_id, "now": self.clock()}
        row = await self.db.write_statement(lambda conn: conn.execute(self._abort_statement, params).first())
        if row is None:
            return False
        self._changed(
            new_pending=True, requeued=_Pending(job_uuid, row.type, row.payload, row.priority, row.id)
        )
        return True

    async def accept(self, job: Job, runner_id: int) -> Job:
        """PENDING → PROCESSING for exactly one caller; the others get 409 with its code."""
        now = self.clock()
        token = new_job_token()
        try:
            row = await self._take(job, runner_id, token, now)
        except IntegrityError as exc:
            # The runner was removed by another coordinator process since its token was checked.
            raise NotFound(Message.UNKNOWN_RUNNER_TOKEN, code=ErrorCode.UNKNOWN_RUNNER_TOKEN) from exc
        self._changed(new_pending=False, taken=job.uuid)
        return Job.from_row(row)

    async def _take(self, job: Job, runner_id: int, token: str, now: float) -> RowMapping:
        async with self.db.write() as conn:
            result = await conn.execute(
                update(jobs)
                .where(jobs.c.id == job.id, jobs.c.state == JobState.PENDING)
                .values(
                    state=JobState.PROCESSING,
                    processing_job_token=token,
                    runner_id=runner_id,
                    started_at=now,
                    progress=None,
                    lease_expires_at=now + self.config.lease_for(job.type),
                    updated_at=now,
                )
            )
            if result.rowcount != 1:
                raise Conflict(Message.JOB_NOT_PENDING_ANYMORE, code=ErrorCode.JOB_NOT_IN_PENDING_STATE)
            return (await conn.execute(select(jobs).where(jobs.c.id == job.id))).mappings().one()

    async def update(self, job: Job, progress: int | None) -> None:
        """A heartbeat: renews the lease, stores progress. Never throttled, never dropped."""
        if job.state in (JobState.COMPLETING, JobState.COMPLETED):
            return
        now = self.clock()
        values: dict[str, Any] = {
            "lease_expires_at": now + self.config.lease_for(job.type),
            "updated_at": now,
        }
        if progress is not None:
            values["progress"] = progress
        async with self.db.write() as conn:
            result = await conn.execute(
                update(jobs).where(*self._held(job), jobs.c.state == JobState.PROCESSING).values(**values)
            )
            if result.rowcount != 1:
                await self._explain_lost(conn, job, done_is_fine=True)

    async def abort(self, job: Job) -> None:
        if job.type in NON_ABORTABLE_TYPES:
            await self._fail(job, Message.ABORT_NOT_SUPPORTED, count_failure=False, terminal=True)
            return
        async with self.db.write() as conn:
            await self._requeue(conn, job, expected=JobState.PROCESSING)
        self._changed(new_pending=True, requeued=_pending_of(job))

    async def error(self, job: Job, message: str) -> None:
        await self._fail(job, message, count_failure=True, terminal=job.type in NON_ABORTABLE_TYPES)

    async def _fail(self, job: Job, message: str, *, count_failure: bool, terminal: bool) -> None:
        failures = job.failures + (1 if count_failure else 0)
        requeue = not terminal and failures < MAX_FAILURES
        async with self.db.write() as conn:
            if requeue:
                await self._requeue(conn, job, expected=JobState.PROCESSING, failures=failures)
            else:
                await self._end_with_error(conn, job, message, failures=failures, held=True)
        self._changed(new_pending=requeue, requeued=_pending_of(job) if requeue else None)

    async def success(self, job: Job, result: JobResult) -> None:
        """PROCESSING → COMPLETING (committed), then completion; waits for it up to SUCCESS_WAIT_S."""
        now = self.clock()
        retried = False
        try:
            async with self.db.write() as conn:
                updated = await conn.execute(
                    update(jobs)
                    .where(*self._held(job), jobs.c.state == JobState.PROCESSING)
                    .values(
                        state=JobState.COMPLETING,
                        result=result.as_json(),
                        progress=100,
                        lease_expires_at=now + self.config.lease_for(job.type),
                        updated_at=now,
                    )
                )
                if updated.rowcount != 1:
                    row = (await conn.execute(select(jobs).where(jobs.c.id == job.id))).mappings().first()
                    current = Job.from_row(row) if row else None
                    same_call = (
                        current is not None and current.processing_job_token == job.processing_job_token
                    )
                    # A concurrent copy of this same `success` got there first: as for a retry.
                    retried = same_call and current is not None and self.is_retried_success(current)
                    if not retried:
                        await self._explain_lost(conn, job)
        except BaseException:
            await self._discard(result)
            raise
        if retried:
            await self._discard(result)
            return
        task = self._start_completion(job.id)
        try:
            await asyncio.wait_for(asyncio.shield(task), SUCCESS_WAIT_S)
        except TimeoutError:
            log.warning(
                "completion of job %s takes longer than %.0f s; answering now", job.uuid, SUCCESS_WAIT_S
            )

    async def _discard(self, result: JobResult) -> None:
        """The stored files of a `success` that did not take (each call has its own folder)."""
        for key in result.files.values():
            await self._delete_quietly(key.rsplit("/", 1)[0] + "/")

    async def _delete_quietly(self, prefix: str) -> None:
        try:
            await self.storage.delete_prefix(prefix)
        except StorageError as exc:  # garbage left in storage, not a reason to fail the call
            log.warning("could not remove %s from storage: %s", prefix, exc)

    def is_retried_success(self, job: Job) -> bool:
        """A `success` whose earlier attempt got through: same token, already past PROCESSING."""
        return job.result is not None and job.state in (
            JobState.COMPLETING,
            JobState.COMPLETED,
            JobState.ERRORED,
        )

    # ---------------------------------------------------------------- completion

    def _start_completion(self, job_id: int) -> asyncio.Task[None]:
        task = self._completions.get(job_id)
        if task is None or task.done():
            task = asyncio.create_task(self._complete(job_id), name=f"complete-job-{job_id}")
            self._completions[job_id] = task
            task.add_done_callback(lambda t: self._completions.pop(job_id, None))
        return task

    async def _complete(self, job_id: int) -> None:
        job = await self.get_by_id(job_id)
        if job is None or job.state != JobState.COMPLETING or job.result is None:
            return
        error: str | None = None
        try:
            await self.completer(job, JobResult.from_json(job.result))
        except asyncio.CancelledError:
            raise  # shutdown: the job stays COMPLETING and is completed again at the next start
        except StorageUnavailable as exc:
            # Nothing is wrong with the result: the job stays COMPLETING and the reaper (any process)
            # runs its completion again once this short lease expires.
            log.warning("completion of job %s waits for storage: %s", job.uuid, exc)
            async with self.db.write() as conn:
                await conn.execute(
                    update(jobs)
                    .where(jobs.c.id == job.id, jobs.c.state == JobState.COMPLETING)
                    .values(lease_expires_at=self.clock() + self.config.reaper_interval_s)
                )
            return
        except Exception as exc:
            log.exception("completion of job %s failed", job.uuid)
            error = f"Completion failed: {exc}"[:5000] or "Completion failed"
        now = self.clock()
        async with self.db.write() as conn:
            if error is None:
                done = await conn.execute(
                    update(jobs)
                    .where(jobs.c.id == job.id, jobs.c.state == JobState.COMPLETING)
                    .values(
                        state=JobState.COMPLETED,
                        progress=None,
                        finished_at=now,
                        lease_expires_at=None,
                        updated_at=now,
                    )
                )
                released = 0
                if done.rowcount == 1:
                    children = await conn.execute(
                        update(jobs)
                        .where(jobs.c.parent_id == job.id, jobs.c.state == JobState.WAITING_FOR_PARENT_JOB)
                        .values(state=JobState.PENDING, updated_at=now)
                    )
                    released = children.rowcount
            else:
                await self._end_with_error(conn, job, error, failures=job.failures, held=False)
                released = 0
        await self._delete_quietly(result_prefix(job.uuid))
        self._changed(new_pending=released > 0)

    async def recover_completions(self) -> int:
        """At start-up: redo every completion a crash interrupted."""
        async with self.db.read() as conn:
            ids = (await conn.execute(select(jobs.c.id).where(jobs.c.state == JobState.COMPLETING))).scalars()
            job_ids = list(ids)
        for job_id in job_ids:
            self._start_completion(job_id)
        return len(job_ids)

    async def wait_completions(self) -> None:
        while self._completions:
            await asyncio.gather(*self._completions.values(), return_exceptions=True)

    async def cancel_completions(self) -> None:
        tasks = list(self._completions.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---------------------------------------------------------------- leases

    async def extend_leases(self) -> None:
        """At start-up: runners could not reach us while we were down. Every held job (processing, or
        completing: its completion may be another process's) gets a full lease, and at least
        `restart_grace_s`, so that a runner's first heartbeat after our return renews it in time."""
        now = self.clock()
        async with self.db.write() as conn:
            for job_type in JobType:
                grace_s = max(self.config.lease_for(job_type), self.config.restart_grace_s)
                await conn.execute(
                    update(jobs)
                    .where(
                        jobs.c.state.in_([JobState.PROCESSING, JobState.COMPLETING]),
                        jobs.c.type == str(job_type),
                    )
                    .values(lease_expires_at=now + grace_s)
                )

    async def reap_expired(self) -> int:
        """Take back every processing job whose lease expired; restart lost completions."""
        now = self.clock()
        async with self.db.read() as conn:
            rows = (
                (
                    await conn.execute(
                        select(jobs).where(
                            jobs.c.state.in_([JobState.PROCESSING, JobState.COMPLETING]),
                            jobs.c.lease_expires_at < now,
                        )
                    )
                )
                .mappings()
                .all()
            )
        expired = [Job.from_row(r) for r in rows]
        requeued = 0
        holders: set[int] = set()
        for job in expired:
            if job.state == JobState.COMPLETING:
                if job.id not in self._completions:
                    log.warning("completion of job %s was lost; running it again", job.uuid)
                    async with self.db.write() as conn:
                        await conn.execute(
                            update(jobs)
                            .where(jobs.c.id == job.id, jobs.c.state == JobState.COMPLETING)
                            .values(lease_expires_at=now + self.config.lease_for(job.type))
                        )
                    self._start_completion(job.id)
                continue
            expiries = job.lease_expiries + 1
            # A heartbeat may have renewed the lease since the read above: then nothing happens.
            still_expired = (jobs.c.lease_expires_at < now,)
            async with self.db.write() as conn:
                if job.type in NON_ABORTABLE_TYPES:
                    taken = await self._end_with_error(
                        conn,
                        job,
                        Message.STALLED_JOB,
                        failures=job.failures,
                        held=True,
                        only_if=still_expired,
                    )
                elif expiries >= self.config.max_lease_expiries:
                    message = f"Job lease expired {expiries} times: no runner could finish it"
                    taken = await self._end_with_error(
                        conn,
                        job,
                        message,
                        failures=job.failures,
                        held=True,
                        lease_expiries=expiries,
                        only_if=still_expired,
                    )
                else:
                    taken = await self._requeue(
                        conn,
                        job,
                        expected=JobState.PROCESSING,
                        lease_expiries=expiries,
                        only_if=still_expired,
                    )
                    requeued += taken
            if taken:
                log.warning(
                    "lease of job %s (%s) expired (%d time(s)); taken back", job.uuid, job.type, expiries
                )
                self.lease_expiries_total += 1
                if job.runner_id is not None:
                    holders.add(job.runner_id)
        if expired:
            self._changed(new_pending=requeued > 0)
        self._taken_back(holders)
        return len(expired)

    # ---------------------------------------------------------------- admin transitions

    async def cancel(self, job: Job) -> None:
        if job.state not in CANCELLABLE_STATES:
            raise BadRequest(Message.CANNOT_CANCEL)
        now = self.clock()
        async with self.db.write() as conn:
            result = await conn.execute(
                update(jobs)
                .where(jobs.c.id == job.id, jobs.c.state.in_(list(CANCELLABLE_STATES)))
                .values(
                    state=JobState.CANCELLED,
                    processing_job_token=None,
                    lease_expires_at=None,
                    progress=None,
                    finished_at=now,
                    updated_at=now,
                )
            )
            if result.rowcount != 1:
                raise BadRequest(Message.CANNOT_CANCEL)
            await self._mark_descendants(conn, [job.id], JobState.PARENT_CANCELLED, None, now)
        self._changed(new_pending=False)
        if job.state == JobState.PROCESSING and job.runner_id is not None:
            self._taken_back({job.runner_id})

    async def delete(self, job: Job) -> None:
        """Cancel if cancellable, then delete the job and (by cascade) its descendants."""
        if job.state in CANCELLABLE_STATES:
            with suppress(BadRequest):  # its state changed meanwhile: delete it anyway
                await self.cancel(job)
        async with self.db.write() as conn:
            await conn.execute(delete(jobs).where(jobs.c.id == job.id))
        await self._delete_quietly(result_prefix(job.uuid))
        self._changed(new_pending=False)

    async def requeue_runner_jobs(self, conn: AsyncConnection, runner_ids: Iterable[int]) -> int:
        """Give back the processing jobs of runners about to be deleted (inside the caller's transaction)."""
        ids = list(runner_ids)
        if not ids:
            return 0
        rows = (
            (
                await conn.execute(
                    select(jobs).where(jobs.c.runner_id.in_(ids), jobs.c.state == JobState.PROCESSING)
                )
            )
            .mappings()
            .all()
        )
        count = 0
        for row in rows:
            job = Job.from_row(row)
            if job.type in NON_ABORTABLE_TYPES:
                await self._end_with_error(
                    conn,
                    job,
                    "Runner was removed",
                    failures=job.failures,
                    held=True,
                    only_if=(jobs.c.runner_id.in_(ids),),
                )
            elif await self._requeue(
                conn, job, expected=JobState.PROCESSING, only_if=(jobs.c.runner_id.in_(ids),)
            ):
                count += 1
        return count

    def _taken_back(self, runner_ids: set[int]) -> None:
        if runner_ids and self.on_taken_back is not None:
            self.on_taken_back(runner_ids)

    def runners_removed(self, requeued: int) -> None:
        self._changed(new_pending=requeued > 0)

    # ---------------------------------------------------------------- helpers (inside a transaction)

    @staticmethod
    def _held(job: Job) -> tuple[Any, ...]:
        return (jobs.c.id == job.id, jobs.c.processing_job_token == job.processing_job_token)

    async def _requeue(
        self,
        conn: AsyncConnection,
        job: Job,
        *,
        expected: JobState,
        failures: int | None = None,
        lease_expiries: int | None = None,
        only_if: tuple[Any, ...] = (),
    ) -> bool:
        """Back to PENDING. With `only_if` (the reaper) a job that changed meanwhile is left alone;
        otherwise the caller is told why it lost (404 / 400)."""
        values: dict[str, Any] = {
            "state": JobState.PENDING,
            "processing_job_token": None,
            "runner_id": None,
            "progress": None,
            "started_at": None,
            "lease_expires_at": None,
            "updated_at": self.clock(),
        }
        if failures is not None:
            values["failures"] = failures
        if lease_expiries is not None:
            values["lease_expiries"] = lease_expiries
        result = await conn.execute(
            update(jobs).where(*self._held(job), jobs.c.state == expected, *only_if).values(**values)
        )
        if result.rowcount == 1:
            return True
        if not only_if:
            await self._explain_lost(conn, job)
        return False

    async def _end_with_error(
        self,
        conn: AsyncConnection,
        job: Job,
        message: str,
        *,
        failures: int,
        held: bool,
        lease_expiries: int | None = None,
        only_if: tuple[Any, ...] = (),
    ) -> bool:
        now = self.clock()
        values: dict[str, Any] = {
            "state": JobState.ERRORED,
            "failures": failures,
            "error": message[:5000],
            "progress": None,
            "lease_expires_at": None,
            "finished_at": now,
            "updated_at": now,
        }
        if held:
            # A failed completion keeps its token so that a retried `success` is still recognised.
            values["processing_job_token"] = None
            condition = and_(*self._held(job), jobs.c.state == JobState.PROCESSING)
        else:
            condition = and_(jobs.c.id == job.id, jobs.c.state == JobState.COMPLETING)
        if lease_expiries is not None:
            values["lease_expiries"] = lease_expiries
        result = await conn.execute(update(jobs).where(condition, *only_if).values(**values))
        if result.rowcount != 1:
            if only_if:
                return False
            await self._explain_lost(conn, job)
        await self._mark_descendants(conn, [job.id], JobState.PARENT_ERRORED, Message.PARENT_ERROR, now)
        return True

    async def _mark_descendants(
        self, conn: AsyncConnection, parent_ids: list[int], state: JobState, error: str | None, now: float
    ) -> None:
        frontier = parent_ids
        while frontier:
            children = list(
                (
                    await conn.execute(
                        select(jobs.c.id).where(
                            jobs.c.parent_id.in_(frontier),
                            jobs.c.state.notin_([s.value for s in JobState if s.is_final]),
                        )
                    )
                ).scalars()
            )
            if children:
                await conn.execute(
                    update(jobs)
                    .where(jobs.c.id.in_(children))
                    .values(
                        state=state,
                        error=error,
                        processing_job_token=None,
                        lease_expires_at=None,
                        finished_at=now,
                        updated_at=now,
                    )
                )
            frontier = children

    async def _explain_lost(self, conn: AsyncConnection, job: Job, *, done_is_fine: bool = False) -> None:
        """A conditional UPDATE matched nothing: another call changed the job first. Answer as if this
        call had come second (spec §3.11): the token is gone → 404, the state moved on → 400 + code
        (or nothing, for an update that crossed its own job's `success`)."""
        row = (
            (await conn.execute(select(jobs.c.state, jobs.c.processing_job_token).where(jobs.c.id == job.id)))
            .mappings()
            .first()
        )
        if row is None or row["processing_job_token"] != job.processing_job_token:
            raise NotFound(Message.UNKNOWN_RUNNER_JOB)
        if done_is_fine and row["state"] in (JobState.COMPLETING, JobState.COMPLETED):
            return
        raise BadRequest(Message.JOB_NOT_PROCESSING, code=ErrorCode.JOB_NOT_IN_PROCESSING_STATE)


async def run_forever(interval_s: float, step: Callable[[], Awaitable[object]], name: str) -> None:
    """A periodic loop that logs and survives any failure of one step."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await step()
        except Exception:
            log.exception("%s failed; trying again in %.1f s", name, interval_s)


def random_token(prefix: str) -> str:
    return prefix + str(uuidlib.UUID(bytes=secrets.token_bytes(16), version=4))
