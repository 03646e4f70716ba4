"""A job's heartbeat: `update` calls carrying the latest progress, and what a failed one means.

The first update goes out right after the accept (or the restart that found the job's result in the outbox),
then one every `interval_s` — read before each wait: the supervisor makes it short when the server would not
tell us that it took the job back — with whatever progress the processor last reported (reports in between
are coalesced; nothing queues up). It goes on while the job's result waits in the outbox. Every send is
awaited and its failure classified, never fired and forgotten (STYLE lesson 7):

* JobGone — the server took the job back (deleted, cancelled, re-queued): `on_lost(GONE)` at once, or
  `on_lost(NOT_PROCESSING)` for "not in processing state", which is also what an update racing with our
  own `success` may get (the supervisor lets the success call decide then);
* the server answered with an error (a 500, a rejection) — it is up, so its stale-job watchdog runs: logged
  as an error, sent again after a jittered, growing delay, and after `lease_s` of such answers the job is
  given up, `on_lost(LEASE_EXPIRED)` (the server has re-queued it by then);
* no answer (connection refused, timeout, a proxy's 502/503/504) — the server may be down, and then nobody
  re-queues the job: sent again (at most every `interval_s`, so the first call after a recovery renews the
  job before PeerTube's watchdog looks at it) for up to `outage_limit_s`, then `on_lost(LEASE_EXPIRED)`.

The heartbeat never cancels anything itself: `on_lost` is the supervisor's `JobRun.cancel`. `on_answer` is
told of every answer the server gives (the outbox's delivery waits for one after an outage).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from enum import Enum

from tuberunner.protocol.errors import ErrorCode
from tuberunner.runner.client import InstanceClient
from tuberunner.runner.errors import JobGone, RequestRejected, RunnerUnknown, TransientError
from tuberunner.runner.job import AcceptedJob
from tuberunner.runner.retry import RetryPolicy

__all__ = [
    "Heartbeat",
    "Loss",
]

log = logging.getLogger(__name__)

# A failure like the previous ones is logged again at most this often (an outage may last hours).
_REPEAT_LOG_S = 60.0


class Loss(Enum):
    GONE = "the server took the job back"
    # 400 `runner_job_not_in_processing_state`: taken back, or completing because our success arrived.
    NOT_PROCESSING = "the job is not in the processing state any more"
    LEASE_EXPIRED = "no update could be delivered for longer than the lease"


class Heartbeat:
    def __init__(
        self,
        client: InstanceClient,
        job: AcceptedJob,
        *,
        interval_s: float | Callable[[], float],
        lease_s: float,
        outage_limit_s: float | None = None,
        progress: Callable[[], float | None],
        on_lost: Callable[[Loss, str], None],
        on_delivered: Callable[[], None] = lambda: None,
        on_answer: Callable[[], None] = lambda: None,
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.job = job
        self._interval = interval_s if callable(interval_s) else (lambda: float(interval_s))
        self.lease_s = lease_s
        self.outage_limit_s = lease_s if outage_limit_s is None else outage_limit_s
        self.progress = progress
        self.on_lost = on_lost
        self.on_delivered = on_delivered
        self.on_answer = on_answer
        self.retry = retry or RetryPolicy()
        self.clock = clock
        # The accept renewed the lease: it is the first "delivery".
        self.last_delivered = clock()
        # When the server first answered an update with an error since the last delivery (it is up).
        self.refused_since: float | None = None
        self.last_failure_at: float | None = None
        self.delivered = 0
        self.delivered_progress: int | None = None
        self.last_error: str | None = None
        # No more updates will be sent (the job was lost, or the task ended).
        self.stopped = False
        self._poke = asyncio.Event()
        self._logged_at = -math.inf

    @property
    def interval_s(self) -> float:
        return self._interval()

    def poke(self) -> None:
        """Send the next update now (e.g. after a reconnection, to re-check that the job is still ours)."""
        self._poke.set()

    def _progress_value(self) -> int | None:
        value = self.progress()
        if value is None or not math.isfinite(value):
            return None
        return min(max(round(value), 0), 100)

    def _give_up_at(self) -> tuple[float, str]:
        outage = (self.last_delivered + self.outage_limit_s, f"no answer for {self.outage_limit_s:g} s")
        if self.refused_since is None:
            return outage
        refused = (self.refused_since + self.lease_s, f"refused by the server for {self.lease_s:g} s")
        return min(outage, refused)

    async def run(self) -> None:
        try:
            await self._beat()
        finally:
            self.stopped = True

    async def _beat(self) -> None:
        failures = 0
        last_failure: Exception | None = None
        while True:
            give_up_at, why = self._give_up_at()
            remaining_s = give_up_at - self.clock()
            if remaining_s <= 0:
                detail = f"{Loss.LEASE_EXPIRED.value} ({why}; last error: {self.last_error})"
                log.warning("job %s: %s; giving it up", self.job.uuid, detail)
                self.retry.note_give_up(last_failure or TimeoutError(detail))
                self.on_lost(Loss.LEASE_EXPIRED, detail)
                return
            progress = self._progress_value()
            try:
                async with asyncio.timeout(remaining_s):
                    await self.client.update(self.job, progress)
            except (JobGone, RunnerUnknown) as exc:
                self.on_answer()
                loss = Loss.NOT_PROCESSING if exc.code == ErrorCode.JOB_NOT_IN_PROCESSING_STATE else Loss.GONE
                log.info("job %s: %s (%s)", self.job.uuid, loss.value, exc.message)
                self.on_lost(loss, exc.message)
                return
            except (TransientError, RequestRejected, TimeoutError) as exc:
                failures += 1
                last_failure = exc
                self.retry.note_retry(exc)
                self.last_failure_at = now = self.clock()
                self.last_error = getattr(exc, "message", None) or f"no answer within {remaining_s:.1f} s"
                answered = isinstance(exc, RequestRejected) or (
                    isinstance(exc, TransientError) and exc.server_answered
                )
                if answered:
                    if self.refused_since is None:
                        self.refused_since = now
                    self.on_answer()
                self._log_failure(answered, failures)
                remaining_s = self._give_up_at()[0] - self.clock()
                delay_s = min(self.retry.delay(failures), self.interval_s, remaining_s)
                await self._wait(max(delay_s, 0.05))
                continue
            failures = 0
            self.last_delivered = self.clock()
            self.refused_since = None
            self.delivered += 1
            self.delivered_progress = progress
            self.on_answer()
            self.on_delivered()
            await self._wait(self.interval_s)

    def _log_failure(self, answered: bool, failures: int) -> None:
        """Every first failure, then a reminder a minute; a refusing server is an error, never harmless."""
        now = self.clock()
        if failures > 1 and now - self._logged_at < _REPEAT_LOG_S:
            log.debug("job %s: update not delivered (%s)", self.job.uuid, self.last_error)
            return
        self._logged_at = now
        again = f" ({failures} attempts so far)" if failures > 1 else ""
        if answered:
            log.error(
                "job %s: the server refused its update%s: %s. The job is given up if no update lands within "
                "%g s: the server takes it back then",
                self.job.uuid,
                again,
                self.last_error,
                self.lease_s,
            )
        else:
            log.warning(
                "job %s: update not delivered%s (%s); the job goes on and updates are retried for up to %g s",
                self.job.uuid,
                again,
                self.last_error,
                self.outage_limit_s,
            )

    async def _wait(self, delay_s: float) -> None:
        try:
            async with asyncio.timeout(delay_s):
                await self._poke.wait()
        except TimeoutError:
            pass
        self._poke.clear()
