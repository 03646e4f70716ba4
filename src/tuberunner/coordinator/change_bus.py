"""Tells the other coordinator processes sharing a database what this one changed (Redis pub/sub).

Each process keeps in-memory views (pending jobs, runner tokens) invalidated by its own writes; with several
processes a message makes the others drop theirs at once. Messages are a speed-up, not a correctness
requirement: the views also expire on their own (`view_ttl_s`, the token TTL), so a lost message or a
Redis outage only delays what the other processes see.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Callable

import redis.asyncio as aioredis

log = logging.getLogger(__name__)
CHANNEL = "tuberunner:coordinator:changes"


class ChangeBus:
    def __init__(self, redis_url: str) -> None:
        self.redis = aioredis.from_url(redis_url)
        self.origin = secrets.token_hex(8)
        self._jobs_dirty = asyncio.Event()

    def jobs_changed(self) -> None:
        """Cheap and synchronous; bursts of changes become one message."""
        self._jobs_dirty.set()

    async def runners_removed(self, runner_ids: set[int]) -> None:
        await self._publish({"runners_removed": sorted(runner_ids)})

    async def _publish(self, message: dict[str, object]) -> None:
        try:
            await self.redis.publish(CHANNEL, json.dumps({"origin": self.origin, **message}))
        except Exception as exc:  # the TTLs cover it
            log.warning("could not tell other coordinator processes about a change: %s", exc)

    async def publish_loop(self) -> None:
        while True:
            await self._jobs_dirty.wait()
            self._jobs_dirty.clear()
            await self._publish({"jobs_changed": True})

    async def listen_loop(
        self, on_jobs_changed: Callable[[], None], on_runners_removed: Callable[[set[int]], None]
    ) -> None:
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    async for item in pubsub.listen():
                        if item.get("type") != "message":
                            continue
                        message = json.loads(item["data"])
                        if message.get("origin") == self.origin:
                            continue
                        if message.get("jobs_changed"):
                            on_jobs_changed()
                        removed = message.get("runners_removed")
                        if removed:
                            on_runners_removed({int(i) for i in removed})
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("change bus: %s; listening again in 2 s", exc)
                await asyncio.sleep(2)

    async def close(self) -> None:
        await self.redis.aclose()
