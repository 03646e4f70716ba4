"""One reaper among the processes of a PostgreSQL database, taken over when its holder's connection dies."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tests.support.databases import postgres_available, postgres_database
from tuberunner.coordinator.database import Database
from tuberunner.coordinator.reaper_lock import REAPER_LOCK_KEY, ReaperLock


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    reason = await postgres_available()
    if reason:
        pytest.skip(reason)
    async with postgres_database() as url:
        yield url


@pytest.mark.postgres
async def test_one_holder_and_a_takeover_when_its_connection_is_killed(pg_url: str) -> None:
    first, second = Database(pg_url), Database(pg_url)
    a, b = ReaperLock(first), ReaperLock(second)
    try:
        assert await a.hold()
        assert not await b.hold()
        assert await a.hold()  # kept across ticks

        # The holder's session is killed (a crashed process, a DBA's pg_terminate_backend).
        admin = await asyncpg.connect(pg_url.replace("postgresql+asyncpg", "postgresql"))
        try:
            killed = await admin.fetchval(
                # Advisory locks are per database: only this test's database, not another test's running
                # on the same server at the same time.
                "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l "
                "JOIN pg_database d ON d.oid = l.database "
                "WHERE l.locktype = 'advisory' AND l.objid = $1::bigint % 4294967296 "
                "AND d.datname = current_database()",
                REAPER_LOCK_KEY,
            )
        finally:
            await admin.close()
        assert killed == 1

        assert await b.hold()  # the next tick of another process takes it over
        assert not await a.hold()  # the old holder notices it lost it, and does not reap
        assert not a.is_held
        await b.release()
        assert await a.hold()  # released on stop: the other one takes it at once
    finally:
        await a.release()
        await b.release()
        await first.dispose()
        await second.dispose()


async def test_sqlite_always_holds_it(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/c.sqlite3")
    try:
        assert await ReaperLock(db).hold()
    finally:
        await db.dispose()
