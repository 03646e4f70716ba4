"""Delivering one result of the outbox: `success` until the server answers for it.

    success ─► 204 ─────────────────────────────────► delivered
            ├► JobGone: 404, not processing, 409 ──► not ours any more (raised: the result is dropped),
            │    except "not in processing state" / 409 after an attempt that may have got through
            │    (before a restart too): delivered
            ├► RequestRejected, JobFailed ─────────► raised: the server refuses this result (reported)
            ├► the server answered an error (500) ─► again after a growing delay, `retry.attempts` times
            └► no answer (down, cut, timeout) ─────► again once the server answers: the job's heartbeat
                 probes it (a small `update` at most every update interval), and its first answer lets the
                 upload go at once; for up to `outage_limit_s` after the result entered the outbox

Waiting for the heartbeat, rather than re-sending on a timer, means a result is uploaded again only when the
server is there and still holds the job for us: a job it took back during a network cut is learnt from a
404 to an `update`, and its result is dropped without being sent. An upload that fails while the heartbeat
gets through (a proxy cutting big bodies) counts as a failure of this result, bounded like the others.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Protocol

from tuberunner.protocol.errors import ErrorCode
from tuberunner.runner.client import InstanceClient
from tuberunner.runner.errors import JobGone, TransientError
from tuberunner.runner.outbox import Outbox, OutboxEntry
from tuberunner.runner.retry import RetryPolicy

__all__ = [
    "Delivery",
    "Probe",
]

log = logging.getLogger(__name__)

# An unreachable server is mentioned again at most this often while a result waits.
_REPEAT_LOG_S = 60.0


class Probe(Protocol):
    """The job's heartbeat, as the delivery sees it."""

    @property
    def stopped(self) -> bool: ...

    @property
    def last_failure_at(self) -> float | None: ...

    def poke(self) -> None: ...


class Delivery:
    def __init__(
        self,
        client: InstanceClient,
        entry: OutboxEntry,
        outbox: Outbox,
        *,
        probe: Probe,
        retry: RetryPolicy,
        outage_limit_s: float,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.entry = entry
        self.outbox = outbox
        self.probe = probe
        self.retry = retry
        self.outage_limit_s = outage_limit_s
        self.clock = clock
        self.wall_clock = wall_clock
        self.attempts = 0
        self.last_error: str | None = None
        # The server answered "not in processing state" to an attempt after one that may have got through.
        self.already_delivered = False
        self._answered = asyncio.Event()
        self._logged_at = -math.inf

    def server_answered(self) -> None:
        """The server answered a call of this job (its heartbeat): an upload held back by an outage goes."""
        self._answered.set()

    async def run(self) -> None:
        """Return once delivered; raise JobGone (the job is not ours: drop the result), RequestRejected or
        JobFailed (this result is refused: report it), TransientError (given up)."""
        job = self.entry.job
        failures = 0  # failed attempts while the server could be reached
        while True:
            attempted_before = self.entry.attempted
            if not attempted_before:
                self.entry = await asyncio.to_thread(self.outbox.mark_attempted, self.entry)
            self.attempts += 1
            started = self.clock()
            try:
                await self.client.success(job, self.entry.output)
                return
            except JobGone as exc:
                not_processing = exc.code == ErrorCode.JOB_NOT_IN_PROCESSING_STATE or exc.status == 409
                if attempted_before and not_processing:
                    log.info("job %s: an earlier success attempt got through (%s)", job.uuid, exc.message)
                    self.already_delivered = True
                    return
                raise
            except TransientError as exc:
                self.last_error = exc.message
                if exc.server_answered:
                    failures += 1
                    self._give_up_if(failures >= self.retry.attempts, exc)
                    self._log(exc, logging.ERROR, failures)
                    delay_s = self.retry.delay(failures)
                    if exc.retry_after_s is not None:
                        delay_s = max(delay_s, min(exc.retry_after_s, self.retry.max_delay_s))
                    self.retry.note_retry(exc)
                    await self._sleep(delay_s, exc)
                    continue
                self._log(exc, logging.WARNING, failures)
                self.retry.note_retry(exc)
                if await self._until_server_answers(started, exc):
                    # The heartbeat got through at once: this upload itself fails, not the network.
                    failures += 1
                    self._give_up_if(failures >= self.retry.attempts, exc)
                    await self._sleep(self.retry.delay(failures), exc)
                else:
                    failures = 0

    async def _until_server_answers(self, failed_at: float, exc: TransientError) -> bool:
        """Wait until the heartbeat reaches the server; True when it did so without failing meanwhile."""
        if self.probe.stopped:
            # No heartbeat any more (its job is not processing: the next answer tells): a plain retry.
            await self._sleep(self.retry.delay(1), exc)
            return True
        self._answered.clear()
        self.probe.poke()
        try:
            async with asyncio.timeout(self._remaining_s()):
                await self._answered.wait()
        except TimeoutError:
            self._give_up_if(True, exc)
        failed = self.probe.last_failure_at
        return failed is None or failed <= failed_at

    def _remaining_s(self) -> float:
        return self.outage_limit_s - (self.wall_clock() - self.entry.created_at)

    async def _sleep(self, delay_s: float, exc: TransientError) -> None:
        if self._remaining_s() < delay_s:
            self._give_up_if(True, exc)
        await asyncio.sleep(delay_s)

    def _give_up_if(self, condition: bool, exc: TransientError) -> None:
        if not condition:
            return
        self.retry.note_give_up(exc)
        waited_s = self.wall_clock() - self.entry.created_at
        raise TransientError(
            f"result not delivered after {self.attempts} attempt(s) in {waited_s:.0f} s: {exc.message}",
            status=exc.status,
            code=exc.code,
        ) from exc

    def _log(self, exc: TransientError, level: int, failures: int) -> None:
        now = self.clock()
        uuid = self.entry.job.uuid
        if level < logging.ERROR and self.attempts > 1 and now - self._logged_at < _REPEAT_LOG_S:
            log.debug("job %s: result not delivered (%s)", uuid, exc.message)
            return
        self._logged_at = now
        if level >= logging.ERROR:
            log.error(
                "job %s: the server failed on our result (%s); sending it again (%d of %d)",
                uuid,
                exc.message,
                failures + 1,
                self.retry.attempts,
            )
        else:
            log.warning(
                "job %s: result not delivered (%s; %d attempt(s)); it waits in the outbox and goes again as "
                "soon as the server answers",
                uuid,
                exc.message,
                self.attempts,
            )
