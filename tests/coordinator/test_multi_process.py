"""Two coordinator processes on one PostgreSQL database and one Redis: what one changes, the other sees."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from tests.coordinator.test_runner_api import Env
from tests.support.databases import postgres_available, postgres_database
from tests.support.servers import ADMIN_TOKEN, serve_coordinator
from tuberunner.coordinator.config import CoordinatorConfig

REDIS_URL = "redis://127.0.0.1:6379/0"


async def _redis_reason() -> str | None:
    client = aioredis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception as exc:
        return f"Redis at 127.0.0.1:6379 is not reachable ({exc})"
    finally:
        await client.aclose()
    return None


async def _eventually(check, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "the other process never saw the change"
        await asyncio.sleep(0.02)


async def test_a_second_process_sees_accepts_and_removed_runners(
    tmp_path: Path, result_files: dict[str, Path]
) -> None:
    for reason in (await postgres_available(), await _redis_reason()):
        if reason:
            pytest.skip(reason)
    async with postgres_database() as url:
        # Views that would stay stale for a minute without the change bus.
        configs = [
            CoordinatorConfig(
                data_dir=tmp_path / name,
                database_url=url,
                admin_token=ADMIN_TOKEN,
                redis_url=REDIS_URL,
                view_ttl_s=60,
            )
            for name in ("a", "b")
        ]
        async with serve_coordinator(configs[0]) as a, serve_coordinator(configs[1]) as b:
            b.coordinator.runners.token_ttl_s = 60
            async with (
                httpx.AsyncClient(base_url=a.url) as http_a,
                httpx.AsyncClient(base_url=b.url) as http_b,
            ):
                env = Env(a, http_a, result_files)
                token = await env.register("shared")
                seeded = await env.seed(children=0)

                async def offered_on_b() -> list[str]:
                    r = await http_b.post("/api/v1/runners/jobs/request", json={"runnerToken": token})
                    return [j["uuid"] for j in r.json()["availableJobs"]]

                await _eventually(lambda: _is(offered_on_b, [seeded.parent]))
                await env.accept(token, seeded.parent)
                await _eventually(lambda: _is(offered_on_b, []))

                await http_a.post("/api/v1/runners/unregister", json={"runnerToken": token})

                async def refused_on_b() -> bool:
                    r = await http_b.post("/api/v1/runners/jobs/request", json={"runnerToken": token})
                    return r.status_code == 404 and r.json()["code"] == "unknown_runner_token"

                await _eventually(refused_on_b)


async def _is(get, expected) -> bool:  # type: ignore[no-untyped-def]
    return await get() == expected
