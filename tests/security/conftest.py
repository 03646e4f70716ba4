"""Security tests run against the real coordinator on loopback (SQLite and PostgreSQL, see
tests/conftest.py), through the same `Env` helper as the protocol conformance tests. Checks that do not
depend on the database carry `marks.SQLITE_ONLY`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.coordinator.test_runner_api import Env
from tests.support.servers import RunningCoordinator


@pytest.fixture
async def env(coordinator: RunningCoordinator, result_files: dict[str, Path]) -> AsyncIterator[Env]:
    async with httpx.AsyncClient(base_url=coordinator.url, timeout=30) as http:
        yield Env(coordinator, http, result_files)
