"""Shared fixtures: a real coordinator on loopback, on SQLite and (when reachable) PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.databases import postgres_available, postgres_database
from tests.support.servers import ADMIN_TOKEN, RunningCoordinator, serve_coordinator
from tuberunner.coordinator.config import CoordinatorConfig
from tuberunner.media.binaries import FFMPEG_PATH_ENV, check_ffmpeg, find_ffmpeg
from tuberunner.media.errors import FfmpegUnavailable


def pytest_sessionstart(session: pytest.Session) -> None:
    # Which ffmpeg the media tests ran on (FFMPEG_PATH selects one); written even under -q, unlike the
    # report header, so that a CI log names it.
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"ffmpeg: {_ffmpeg_in_use()}")


def _ffmpeg_in_use() -> str:
    chosen_by = f" (chosen by {FFMPEG_PATH_ENV})" if os.environ.get(FFMPEG_PATH_ENV) else ""
    try:
        path = find_ffmpeg()
        return f"{asyncio.run(check_ffmpeg(path)).version} at {path}{chosen_by}"
    except FfmpegUnavailable as exc:
        return f"unusable ({exc})"


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
        rtmp_port=None,  # live on, RTMP on a free port
    )


@pytest.fixture
async def coordinator(coordinator_config: CoordinatorConfig) -> AsyncIterator[RunningCoordinator]:
    async with serve_coordinator(coordinator_config) as running:
        yield running


@pytest.fixture(scope="session")
def result_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.support.results import make_result_files

    return make_result_files(tmp_path_factory.mktemp("results"))


@pytest.fixture
def root_level() -> Iterator[logging.Logger]:
    """The root logger's level and the levels `configure_logging` touches, put back afterwards."""
    names = ("", "alembic", "httpx", "httpcore")
    saved = {name: logging.getLogger(name).level for name in names}
    handlers = list(logging.getLogger().handlers)
    try:
        yield logging.getLogger()
    finally:
        root = logging.getLogger()
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
            handler.close()
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
