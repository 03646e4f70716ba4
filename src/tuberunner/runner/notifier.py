"""The socket.io side of job discovery (protocol spec §8): one connection per instance that wakes its
check loop on every (re)connection and on every `available-jobs` ping.

python-socketio's own reconnection is off: it gives up for good after an authentication rejection and
knows nothing of our deadlines. Instead `SocketNotifier.run` connects with a fresh client each time,
within a deadline, waits for the disconnection, and tries again after a jittered, growing delay. The socket
is only a hint: polling goes on whatever happens here, so a deaf socket costs latency, never work.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import aiohttp
import socketio

from tuberunner.protocol.jobs import AVAILABLE_JOBS_EVENT, JOBS_TAKEN_BACK_EVENT
from tuberunner.runner.retry import RetryPolicy

__all__ = [
    "NAMESPACE",
    "PING_EVENT",
    "SocketNotifier",
]

log = logging.getLogger(__name__)

NAMESPACE = "/runners"
PING_EVENT = AVAILABLE_JOBS_EVENT


class SocketNotifier:
    """Keeps a `/runners` socket open to one instance; calls `wake(reason)`, never blocks on it."""

    def __init__(
        self,
        url: str,
        runner_token: str,
        *,
        wake: Callable[[str], None],
        on_connection: Callable[[bool, str | None], None],
        on_jobs_taken_back: Callable[[], None] = lambda: None,
        connect_timeout_s: float = 10.0,
        retry_max_s: float = 60.0,
    ) -> None:
        self.url = url
        self.runner_token = runner_token
        self.wake = wake
        self.on_connection = on_connection
        self.on_jobs_taken_back = on_jobs_taken_back
        self.connect_timeout_s = connect_timeout_s
        self.backoff = RetryPolicy(base_delay_s=1.0, max_delay_s=retry_max_s)
        self.attempts = 0
        self.connections = 0

    async def run(self) -> None:
        """Connect, wait for the end of the connection, repeat; only cancellation stops it."""
        failures = 0
        while True:
            connected = await self._one_connection()
            failures = 0 if connected else failures + 1
            # A fresh connection that dropped at once still waits a little: no busy loop.
            await asyncio.sleep(max(self.backoff.delay(failures), 0.05 if connected else 0.2))

    async def _one_connection(self) -> bool:
        """One connection's life; True when it connected at all."""
        self.attempts += 1
        # Our own HTTP session, closed below whatever happened: engine.io's own is left open when a
        # connection attempt fails midway ("Unclosed client session" at exit after network faults).
        http = aiohttp.ClientSession()
        sio = socketio.AsyncClient(
            http_session=http,
            reconnection=False,
            handle_sigint=False,
            logger=False,
            engineio_logger=False,
            request_timeout=self.connect_timeout_s,
        )
        ended = asyncio.Event()
        rejection: list[str] = []

        async def on_connect() -> None:
            self.connections += 1
            self.on_connection(True, None)
            self.wake("socket connected")

        async def on_disconnect(*_: Any) -> None:
            ended.set()

        async def on_connect_error(data: Any = None) -> None:
            message = data.get("message") if isinstance(data, dict) else data
            rejection.append(str(message))

        async def on_ping(*_: Any) -> None:
            self.wake("available-jobs ping")

        sio.on("connect", on_connect, namespace=NAMESPACE)
        sio.on("disconnect", on_disconnect, namespace=NAMESPACE)
        sio.on("connect_error", on_connect_error, namespace=NAMESPACE)

        async def on_taken_back(*_: Any) -> None:
            self.on_jobs_taken_back()

        sio.on(PING_EVENT, on_ping, namespace=NAMESPACE)
        sio.on(JOBS_TAKEN_BACK_EVENT, on_taken_back, namespace=NAMESPACE)
        connected = False
        try:
            try:
                async with asyncio.timeout(self.connect_timeout_s):
                    await sio.connect(
                        self.url,
                        auth={"runnerToken": self.runner_token},
                        transports=["websocket"],
                        namespaces=[NAMESPACE],
                        wait_timeout=self.connect_timeout_s,
                    )
            except TimeoutError:
                self._failed(f"no connection within {self.connect_timeout_s:g} s")
                return False
            except Exception as exc:  # socketio, aiohttp and OS errors: the socket is only a hint
                _raise_if_cancel_swallowed()
                reason = rejection[-1] if rejection else f"{type(exc).__name__}: {exc}"
                self._failed(reason)
                return False
            _raise_if_cancel_swallowed()
            connected = True
            log.info("socket to %s connected", self.url)
            await ended.wait()
            log.warning("socket to %s disconnected; polling continues, reconnecting", self.url)
            return True
        finally:
            if connected:
                self.on_connection(False, "socket disconnected")
            with suppress(Exception):
                async with asyncio.timeout(self.connect_timeout_s):
                    await sio.disconnect()
            await http.close()

    def _failed(self, reason: str) -> None:
        log.warning("socket to %s failed (%s); polling continues, retrying later", self.url, reason)
        self.on_connection(False, f"socket: {reason}")


def _raise_if_cancel_swallowed() -> None:
    """python-socketio's connect() may catch the CancelledError meant for us and end normally or with
    an error of its own: the cancel would be lost and the runner could never stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
