"""A real coordinator (`serve_coordinator`: uvicorn on loopback) in a thread of its own, for synchronous
clients such as schemathesis (requests) and hypothesis state machines, which block the calling thread.

    with ThreadedCoordinator(config) as server:
        requests.get(server.url + "/api/v1/openapi.json")
        server.run(server.running.coordinator.jobs.reap_expired())   # a coroutine on the server's loop
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

from tests.support.servers import RunningCoordinator, serve_coordinator
from tuberunner.coordinator.config import CoordinatorConfig

T = TypeVar("T")
_START_TIMEOUT_S = 60.0
_CALL_TIMEOUT_S = 60.0


class ThreadedCoordinator:
    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self._thread = threading.Thread(target=self._main, name="coordinator", daemon=True)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._running: RunningCoordinator | None = None
        self._error: BaseException | None = None

    @property
    def running(self) -> RunningCoordinator:
        assert self._running is not None, "not started"
        return self._running

    @property
    def url(self) -> str:
        return self.running.url

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = _CALL_TIMEOUT_S) -> T:
        """Run a coroutine on the coordinator's loop and wait for its result."""
        assert self._loop is not None, "not started"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the thread that waits
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with serve_coordinator(self.config) as running:
            self._loop = asyncio.get_running_loop()
            self._running = running
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> ThreadedCoordinator:
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT_S):
            raise RuntimeError("the coordinator did not start in time")
        if self._error is not None:
            raise RuntimeError("the coordinator did not start") from self._error
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(_START_TIMEOUT_S)
        if self._thread.is_alive():
            raise RuntimeError("the coordinator did not stop in time")
        if self._error is not None and kind is None:
            raise RuntimeError("the coordinator failed") from self._error
