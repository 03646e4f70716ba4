"""A job's heartbeat: `update` calls carrying the latest progress, and what a failed one means.

The first update goes out right after the accept, then one every `interval_s` with whatever progress the
processor last reported (reports in between are coalesced; nothing queues up). Every send is awaited and its
failure classified, never fired and forgotten (STYLE lesson 7):

* JobGone — the server took the job back (deleted, cancelled, re-queued): `on_lost(GONE)` at once, or
  `on_lost(NOT_PROCESSING)` for "not in processing state", which is also what an update racing with our
  own `success` may get (the supervisor lets the success call decide then);
* TransientError, RequestRejected, no answer in time — sent again after a jittered, growing delay, until
  nothing was delivered for `lease_s`: the server has re-queued the job by then, `on_lost(LEASE_EXPIRED)`.

The heartbeat never cancels anything itself: `on_lost` is the supervisor's `JobRun.cancel`.
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
        interval_s: float,
        lease_s: float,
        progress: Callable[[], float | None],
        on_lost: Callable[[Loss, str], None],
        on_delivered: Callable[[], None] = lambda: None,
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.job = job
        self.interval_s = interval_s
        self.lease_s = lease_s
        self.progress = progress
        self.on_lost = on_lost
        self.on_delivered = on_delivered
        self.retry = retry or RetryPolicy()
        self.clock = clock
        # The accept renewed the lease: it is the first "delivery".
        self.last_delivered = clock()
        self.delivered = 0
        self.delivered_progress: int | None = None
        self.last_error: str | None = None
        self._poke = asyncio.Event()

    def poke(self) -> None:
        """Send the next update now (e.g. after a reconnection, to re-check that the job is still ours)."""
        self._poke.set()

    def _progress_value(self) -> int | None:
        value = self.progress()
        if value is None or not math.isfinite(value):
            return None
        return min(max(round(value), 0), 100)

    async def run(self) -> None:
        failures = 0
        last_failure: Exception | None = None
        while True:
            remaining_s = self.lease_s - (self.clock() - self.last_delivered)
            if remaining_s <= 0:
                detail = f"{Loss.LEASE_EXPIRED.value} ({self.lease_s:g} s; last error: {self.last_error})"
                log.warning("job %s: %s; giving it up", self.job.uuid, detail)
                self.retry.note_give_up(last_failure or TimeoutError(detail))
                self.on_lost(Loss.LEASE_EXPIRED, detail)
                return
            progress = self._progress_value()
            try:
                async with asyncio.timeout(remaining_s):
                    await self.client.update(self.job, progress)
            except (JobGone, RunnerUnknown) as exc:
                loss = Loss.NOT_PROCESSING if exc.code == ErrorCode.JOB_NOT_IN_PROCESSING_STATE else Loss.GONE
                log.info("job %s: %s (%s)", self.job.uuid, loss.value, exc.message)
                self.on_lost(loss, exc.message)
                return
            except (TransientError, RequestRejected, TimeoutError) as exc:
                failures += 1
                last_failure = exc
                self.retry.note_retry(exc)
                self.last_error = getattr(exc, "message", None) or f"no answer within {remaining_s:.1f} s"
                level = logging.ERROR if isinstance(exc, RequestRejected) else logging.WARNING
                log.log(level, "job %s: update not delivered (%s); retrying", self.job.uuid, self.last_error)
                remaining_s = self.lease_s - (self.clock() - self.last_delivered)
                await self._wait(max(min(self.retry.delay(failures), self.interval_s, remaining_s), 0.05))
                continue
            failures = 0
            self.last_delivered = self.clock()
            self.delivered += 1
            self.delivered_progress = progress
            self.on_delivered()
            await self._wait(self.interval_s)

    async def _wait(self, delay_s: float) -> None:
        try:
            async with asyncio.timeout(delay_s):
                await self._poke.wait()
        except TimeoutError:
            pass
        self._poke.clear()
