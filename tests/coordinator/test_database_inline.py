"""SQLite single statements on the event loop's thread (`sqlite_inline`): visible to every connection,
atomic, serialised with transactions, never waiting on the loop for another process's lock, closed at
dispose."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import Connection, insert, select, update
from sqlalchemy.exc import IntegrityError, ProgrammingError

from tuberunner.coordinator.database import Database
from tuberunner.coordinator.schema import runners, settings


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "coordinator.sqlite3"


@pytest.fixture
async def db(db_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{db_path}")
    await database.migrate()
    try:
        yield database
    finally:
        await database.dispose()


def _put(key: str, value: str) -> object:
    return insert(settings).values(key=key, value=value)


def _driver(conn: Connection) -> str:
    """Which connection ran a statement: "pysqlite" inline on the loop's thread, "aiosqlite" if not
    (`run_sync` runs statements on the loop's thread too, so the thread tells nothing)."""
    return str(conn.dialect.driver)


def _value_of(conn: Connection, key: str) -> str | None:
    return conn.execute(select(settings.c.value).where(settings.c.key == key)).scalar()


async def _stored(db: Database, key: str) -> str | None:
    """As a multi-statement transaction reads it: through aiosqlite, not the inline connection."""
    async with db.read() as conn:
        return (await conn.execute(select(settings.c.value).where(settings.c.key == key))).scalar()


async def test_inline_write_is_seen_by_aiosqlite_and_inline_read_sees_aiosqlite(db: Database) -> None:
    def write(conn: Connection) -> str:
        conn.execute(insert(settings).values(key="k", value="inline"))
        return _driver(conn)

    assert await db.write_statement(write) == "pysqlite"
    assert await _stored(db, "k") == "inline"
    async with db.write() as conn:
        await conn.execute(update(settings).where(settings.c.key == "k").values(value="transaction"))
    assert await db.read_statement(lambda conn: (_driver(conn), _value_of(conn, "k"))) == (
        "pysqlite",
        "transaction",
    )


async def test_inline_read_sees_later_commits_even_after_a_result_left_unread(db: Database) -> None:
    async with db.write() as conn:
        await conn.execute(insert(settings).values(key="a", value="1"))
        await conn.execute(insert(settings).values(key="b", value="1"))
    # A read whose rows were not all read (against the rules): had its statement stayed active, it
    # would have kept its snapshot, and the next reads would not see the update.
    left_unread = await db.read_statement(lambda conn: conn.execute(select(settings.c.value)))
    async with db.write() as conn:
        await conn.execute(update(settings).where(settings.c.key == "a").values(value="2"))
    assert await db.read_statement(lambda conn: _value_of(conn, "a")) == "2"
    assert await db.write_statement(_driver) == "pysqlite"  # no stale snapshot in the way of writes
    with pytest.raises(ProgrammingError, match="closed cursor"):
        left_unread.fetchall()


async def test_failed_inline_write_commits_nothing_and_leaves_no_lock(db: Database) -> None:
    def insert_then_break_a_foreign_key(conn: Connection) -> None:
        conn.execute(insert(settings).values(key="half", value="done"))
        conn.execute(
            insert(runners).values(
                token="t",
                name="n",
                last_contact=0.0,
                created_at=0.0,
                updated_at=0.0,
                registration_token_id=404,
            )
        )

    def insert_then_raise(conn: Connection) -> None:
        conn.execute(insert(settings).values(key="half", value="done"))
        raise ValueError("not this time")

    # foreign_keys is on for the inline connection too: callers tell a removed runner by this error.
    with pytest.raises(IntegrityError):
        await db.write_statement(insert_then_break_a_foreign_key)
    # Had the failed transaction been left open, this one could not begin inline.
    assert await db.write_statement(_driver) == "pysqlite"
    with pytest.raises(ValueError, match="not this time"):
        await db.write_statement(insert_then_raise)
    assert await db.write_statement(_driver) == "pysqlite"
    assert await _stored(db, "half") is None
    # No transaction was left open on the inline connection: an aiosqlite write would wait 30 s for it.
    async with db.write() as conn:
        await conn.execute(insert(settings).values(key="after", value="transaction"))
    await db.write_statement(lambda conn: conn.execute(insert(settings).values(key="after2", value="inline")))
    assert await _stored(db, "after") == "transaction"
    assert await _stored(db, "after2") == "inline"


async def test_inline_write_waits_for_a_transaction_under_way(db: Database) -> None:
    def read_then_write(conn: Connection) -> tuple[str, str | None]:
        seen = _value_of(conn, "k")
        conn.execute(update(settings).where(settings.c.key == "k").values(value="statement"))
        return _driver(conn), seen

    async with db.write() as conn:
        await conn.execute(insert(settings).values(key="k", value="first"))
        statement = asyncio.create_task(db.write_statement(read_then_write))
        # Awaiting aiosqlite gives the loop away: the statement starts meanwhile and must wait.
        await conn.execute(update(settings).where(settings.c.key == "k").values(value="transaction"))
    # Had it not waited for the write lock, it would have found the file locked and gone to aiosqlite.
    assert await statement == ("pysqlite", "transaction")
    assert await _stored(db, "k") == "statement"


async def test_lock_held_by_another_connection_never_blocks_the_loop(db: Database, db_path: Path) -> None:
    await db.write_statement(lambda conn: conn.execute(_put("k", "before")))  # inline connection opened

    def write(conn: Connection) -> str:
        conn.execute(update(settings).where(settings.c.key == "k").values(value="after"))
        return _driver(conn)

    other = sqlite3.connect(db_path, isolation_level=None)  # an operator's sqlite3 shell, say
    try:
        other.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        writing = asyncio.create_task(db.write_statement(write))
        # One turn of the loop: the task tries inline, finds the lock held and hands the write to
        # aiosqlite, whose thread waits (up to 30 s) for the lock.
        await asyncio.sleep(0)
        assert time.monotonic() - started < 1.0
        assert not writing.done()
        # Readers are not blocked by a writer in WAL mode, inline included.
        assert await db.read_statement(lambda conn: _value_of(conn, "k")) == "before"
        other.execute("COMMIT")
    finally:
        other.close()
    assert await writing == "aiosqlite"
    assert await db.read_statement(lambda conn: _value_of(conn, "k")) == "after"
    # The next write runs inline again.
    assert await db.write_statement(write) == "pysqlite"


async def test_dispose_closes_every_connection(db_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{db_path}")
    await db.migrate()
    # Enough commits for a checkpoint in a worker thread, which has a connection of its own.
    for index in range(300):
        await db.write_statement(lambda conn, index=index: conn.execute(_put(f"k{index}", "v")))
    assert await db.read_statement(lambda conn: _value_of(conn, "k299")) == "v"
    wal = db_path.with_name(db_path.name + "-wal")
    assert wal.exists()
    await db.dispose()
    # SQLite removes the WAL when the last connection to the file closes.
    assert not wal.exists()
    # A disposed database can be used again, as its engine can.
    assert await db.read_statement(lambda conn: _value_of(conn, "k0")) == "v"
    await db.dispose()
    assert not wal.exists()
