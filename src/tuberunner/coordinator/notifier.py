"""The `/runners` socket.io namespace: token check on connect, coalesced `available-jobs` pings, and
`tuberunner-jobs-taken-back` sent to the runner whose processing job was cancelled, deleted or expired."""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress
from typing import Any

import socketio

from tuberunner.coordinator.runners import RunnerRegistry
from tuberunner.protocol.errors import Message
from tuberunner.protocol.jobs import AVAILABLE_JOBS_EVENT, JOBS_TAKEN_BACK_EVENT

log = logging.getLogger(__name__)
NAMESPACE = "/runners"


class RunnersNamespace(socketio.AsyncNamespace):  # type: ignore[misc]
    def __init__(self, registry: RunnerRegistry) -> None:
        super().__init__(NAMESPACE)
        self.registry = registry
        self.runner_of_sid: dict[str, int] = {}

    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        token = auth.get("runnerToken") if isinstance(auth, dict) else None
        if token is None:
            raise socketio.exceptions.ConnectionRefusedError(Message.NO_SOCKET_TOKEN)
        if not isinstance(token, str):
            raise socketio.exceptions.ConnectionRefusedError(Message.SOCKET_TOKEN_NOT_STRING)
        runner = await self.registry.by_token(token)
        if runner is None:
            raise socketio.exceptions.ConnectionRefusedError(Message.SOCKET_TOKEN_UNKNOWN)
        scope = environ.get("asgi.scope", {})
        client = scope.get("client") or (None,)
        self.registry.touch(runner.runner.id, client[0])
        self.runner_of_sid[sid] = runner.runner.id
        # A room per runner: with the Redis manager, any coordinator process can reach its sockets.
        await self.enter_room(sid, room_of(runner.runner.id))

    async def on_disconnect(self, sid: str, *_: Any) -> None:
        self.runner_of_sid.pop(sid, None)


def room_of(runner_id: int) -> str:
    return f"runner-{runner_id}"


class Notifier:
    """Pings every connected runner when jobs become pending; bursts of triggers become one ping."""

    def __init__(self, registry: RunnerRegistry, debounce_s: float, redis_url: str | None = None) -> None:
        manager = socketio.AsyncRedisManager(redis_url) if redis_url else None
        self.sio = socketio.AsyncServer(
            async_mode="asgi", client_manager=manager, cors_allowed_origins="*", logger=False
        )
        self.namespace = RunnersNamespace(registry)
        self.sio.register_namespace(self.namespace)
        self.debounce_s = debounce_s
        self._scheduled: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self.pings_sent = 0
        self.taken_back_sent = 0

    def available_jobs(self) -> None:
        if self._scheduled is not None and not self._scheduled.done():
            return
        task = asyncio.get_running_loop().create_task(self._emit_later(), name="available-jobs-ping")
        self._scheduled = task
        self._sending.add(task)  # kept (and cancelled by `close`) until it has sent
        task.add_done_callback(self._sending.discard)

    async def _emit_later(self) -> None:
        await asyncio.sleep(self.debounce_s)
        # From here on a new trigger needs a ping of its own: runners woken by this one may already have
        # asked before the job that triggered it was committed.
        self._scheduled = None
        try:
            await self.sio.emit(AVAILABLE_JOBS_EVENT, namespace=NAMESPACE)
            self.pings_sent += 1
        except Exception:
            log.exception("could not send the available-jobs ping")

    def jobs_taken_back(self, runner_ids: set[int]) -> None:
        """Tell these runners (at once, not debounced: their ffmpeg is burning CPU for nothing) to check
        their jobs. The event carries nothing: the runner asks the server which of its jobs still hold."""
        task = asyncio.get_running_loop().create_task(
            self._emit_taken_back(sorted(runner_ids)), name="jobs-taken-back"
        )
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _emit_taken_back(self, runner_ids: list[int]) -> None:
        for runner_id in runner_ids:
            try:
                await self.sio.emit(JOBS_TAKEN_BACK_EVENT, to=room_of(runner_id), namespace=NAMESPACE)
                self.taken_back_sent += 1
            except Exception:  # the runner still learns it at its next heartbeat
                log.exception("could not tell runner %d its job was taken back", runner_id)

    async def disconnect_runners(self, runner_ids: set[int]) -> None:
        """Close sockets of removed runners: their next connection attempt learns the token is gone."""
        for sid, rid in list(self.namespace.runner_of_sid.items()):
            if rid in runner_ids:
                await self.sio.disconnect(sid, namespace=NAMESPACE)

    async def close(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
        for task in list(self._sending):
            task.cancel()
        # The Redis manager (several processes) listens in a task of its own and keeps a connection.
        manager = self.sio.manager
        listener = getattr(manager, "thread", None)
        if isinstance(listener, asyncio.Task):
            listener.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await listener
        redis = getattr(manager, "redis", None)
        if redis is not None:
            with suppress(Exception):
                await redis.aclose()
