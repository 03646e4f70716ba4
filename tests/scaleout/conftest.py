"""The scale-out set-up for tests: coordinator processes (in-process uvicorn, each with its own data
folder, as on separate machines) sharing PostgreSQL, Redis and an S3 server (moto's, over HTTP)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.e2e.conftest import e2e_coordinator_config, start_runner  # noqa: F401 (a fixture)
from tests.support.databases import postgres_available, postgres_database
from tests.support.s3_server import S3Server, moto_available
from tuberunner.coordinator.config import CoordinatorConfig

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    reason = moto_available()
    if reason:
        pytest.skip(reason)
    with S3Server(tmp_path_factory.mktemp("s3") / "moto.log") as server:
        yield server


@pytest.fixture
def bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new bucket, and the AWS variables every coordinator of the test reads (as it would for AWS)."""
    name = f"tuberunner-{secrets.token_hex(4)}"
    s3_server.create_bucket(name)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return name


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    reason = await postgres_available()
    if reason:
        pytest.skip(reason)
    async with postgres_database() as url:
        yield url


@pytest.fixture
async def redis_url() -> str:
    client = aioredis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception as exc:
        pytest.skip(f"Redis at 127.0.0.1:6379 is not reachable ({exc})")
    finally:
        await client.aclose()
    return REDIS_URL


def scale_out_config(
    data_dir: Path, pg_url: str, redis_url: str, bucket: str, **overrides: Any
) -> CoordinatorConfig:
    """One coordinator process of the set-up: its own data folder, the shared database, Redis and bucket."""
    base = e2e_coordinator_config(data_dir, pg_url)
    # A lease long enough to outlive the storage outages the tests make (each failing call is retried).
    settings: dict[str, Any] = {"default_lease_s": 30.0, **overrides}
    return replace(base, redis_url=redis_url, storage=f"s3://{bucket}/farm", **settings)
