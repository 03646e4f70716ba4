"""Shared fixtures: a real coordinator on loopback, on SQLite and (when reachable) PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.databases import postgres_available, postgres_database
from tests.support.servers import ADMIN_TOKEN, RunningCoordinator, serve_coordinator
from tuberunner.coordinator.config import CoordinatorConfig


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest) -> AsyncIterator[str | None]:
    if request.param == "sqlite":
        yield None
        return
    reason = await postgres_available()
    if reason:
        pytest.skip(reason)
    async with postgres_database() as url:
        yield url


@pytest.fixture
def coordinator_config(tmp_path: Path, database_url: str | None) -> CoordinatorConfig:
    return CoordinatorConfig(
        data_dir=tmp_path / "coordinator",
        database_url=database_url,
        admin_token=ADMIN_TOKEN,
        reaper_interval_s=0.2,
        ping_debounce_s=0.01,
    )


@pytest.fixture
async def coordinator(coordinator_config: CoordinatorConfig) -> AsyncIterator[RunningCoordinator]:
    async with serve_coordinator(coordinator_config) as running:
        yield running


@pytest.fixture(scope="session")
def result_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.support.results import make_result_files

    return make_result_files(tmp_path_factory.mktemp("results"))
