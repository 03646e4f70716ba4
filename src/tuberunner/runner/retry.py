"""The one retry policy: exponential backoff with full jitter, bounded by attempts and by a deadline."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import httpx

from tuberunner.runner.errors import TransientError

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Deadlines:
    """Per-call limits, in seconds, for every phase of one HTTP call (DESIGN principle 1)."""

    connect_s: float = 10.0
    read_s: float = 30.0
    write_s: float = 30.0
    pool_s: float = 10.0

    def timeout(self) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect_s, read=self.read_s, write=self.write_s, pool=self.pool_s)


class RetryObserver(Protocol):
    """Told of every retry and of every retryable failure given up on (the runner's metrics)."""

    def retrying(self, exc: BaseException) -> None: ...

    def gave_up(self, exc: BaseException) -> None: ...


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    base_delay_s: float = 0.5
    max_delay_s: float = 15.0
    # No retry starts after this many seconds from the first attempt.
    deadline_s: float = 60.0
    observer: RetryObserver | None = field(default=None, compare=False, repr=False)

    def note_retry(self, exc: BaseException) -> None:
        if self.observer is not None:
            self.observer.retrying(exc)

    def note_give_up(self, exc: BaseException) -> None:
        if self.observer is not None:
            self.observer.gave_up(exc)

    def delay(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2^attempt)]."""
        return random.uniform(0, min(self.max_delay_s, self.base_delay_s * 2**attempt))

    async def run(
        self,
        call: Callable[[], Awaitable[T]],
        *,
        what: str,
        retryable: Callable[[Exception], bool] = lambda e: isinstance(e, TransientError),
        deadline_s: float | None = None,
    ) -> T:
        """Run `call`, retrying retryable failures; the last failure is raised as is."""
        started = time.monotonic()
        limit = self.deadline_s if deadline_s is None else deadline_s
        attempt = 0
        while True:
            try:
                return await call()
            except Exception as exc:
                attempt += 1
                if not retryable(exc):
                    raise
                if attempt >= self.attempts:
                    self.note_give_up(exc)
                    raise
                delay = self.delay(attempt)
                if isinstance(exc, TransientError) and exc.retry_after_s is not None:
                    delay = max(delay, min(exc.retry_after_s, self.max_delay_s))
                if time.monotonic() - started + delay > limit:
                    self.note_give_up(exc)
                    raise
                self.note_retry(exc)
                log.info("%s failed (%s); attempt %d in %.1f s", what, exc, attempt + 1, delay)
                await asyncio.sleep(delay)
