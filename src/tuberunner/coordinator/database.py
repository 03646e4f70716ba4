"""Engine creation, migrations at start-up, and the transaction helpers every write goes through.

SQLite allows one writer at a time; instead of letting concurrent transactions fight over the file lock
(SQLITE_BUSY, retries, latency spikes) the coordinator serialises its own writes with an asyncio lock and
keeps each write transaction short: no network I/O and no file copying happens inside one. On a SQLite
file, single statements (`write_statement`, `read_statement`) run on the event loop's thread through a
connection kept for them (`sqlite_inline`), under the same lock for writes; a statement that cannot run
there (the file locked by another process) goes through aiosqlite, as transactions always do.
PostgreSQL needs no such lock: correctness comes from conditional UPDATEs (`... WHERE state = pending`).
On PostgreSQL every round trip counts: reads and single-statement writes run without BEGIN/COMMIT
(autocommit), those of the hot paths on connections kept for them out of the pool; pooled connections are
not pinged (one closed while idle is noticed without a round trip and replaced), and loopback connections
skip the SSL attempt.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from tuberunner.coordinator.sqlite_inline import InlineSqlite, NotDone

T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Enough for one connection per concurrent request at the load we are built for (hundreds of runners
# make a few dozen calls at a time): connections beyond the pool are closed after each use.
PG_POOL_SIZE = 40
PG_POOL_OVERFLOW = 20
# Of those, kept out of the pool for single statements (`_Lender`).
PG_LENT_CONNECTIONS = 30
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": 30}
        else:
            kwargs.update(pool_size=PG_POOL_SIZE, max_overflow=PG_POOL_OVERFLOW, pool_pre_ping=False)
            if _is_plain_loopback(url):
                kwargs["connect_args"] = {"ssl": False}
        # Parameters hold tokens: kept out of exception texts (which end in logs).
        self.engine: AsyncEngine = create_async_engine(url, hide_parameters=True, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        else:
            event.listen(self.engine.sync_engine, "checkout", _refuse_closed)
        # Statements that commit by themselves (PostgreSQL: no BEGIN/COMMIT round trips).
        self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        self._lender = None if self.is_sqlite else _Lender(self.engine, PG_LENT_CONNECTIONS)
        path = make_url(url).database if self.is_sqlite else None
        # Not for an in-memory database (each connection has its own) nor a `file:` URI (not a path).
        self._inline = (
            InlineSqlite(path) if path and path != ":memory:" and not path.startswith("file:") else None
        )

    async def migrate(self) -> None:
        """Bring the schema to the newest revision (idempotent, safe on every start)."""
        async with self.engine.begin() as conn:
            await conn.run_sync(_upgrade_to_head)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """One short write transaction: committed on exit, rolled back on any exception."""
        if self._write_lock is None:
            async with self.engine.begin() as conn:
                yield conn
            return
        async with self._write_lock, self.engine.begin() as conn:
            yield conn

    async def write_statement(self, statement: Callable[[Connection], T]) -> T:
        """Run `statement` (one write statement, results read inside) and commit it: on PostgreSQL in
        autocommit (a conditional UPDATE is atomic by itself), on a SQLite file on the loop's thread
        under the write lock, else as `write()`. One hop into SQLAlchemy's sync layer at most instead of
        one per step."""
        if self._lender is not None:
            return await self._lender.run(statement)
        assert self._write_lock is not None
        async with self._write_lock:
            if self._inline is not None:
                try:
                    return self._inline.write(statement)
                except NotDone:
                    pass  # nothing was done: aiosqlite's thread waits for the lock instead of the loop
            async with self.engine.begin() as conn:
                return await conn.run_sync(statement)

    async def read_statement(self, statement: Callable[[Connection], T]) -> T:
        """Run a short read (`statement`, results read inside), as `write_statement` does. On SQLite it
        runs on the loop's thread too: an indexed read costs less than the hops to a reader thread, and
        that thread would wait for the GIL at every row while the loop is busy. Not for reads of
        unbounded size."""
        if self._lender is not None:
            return await self._lender.run(statement)
        if self._inline is not None:
            try:
                return self._inline.read(statement)
            except NotDone:
                pass  # another process recovering the WAL, say: aiosqlite's thread waits instead
        async with self.engine.connect() as conn:
            return await conn.run_sync(statement)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """Reads see committed data; several statements may see different commits (as with READ
        COMMITTED), so a read that must agree with a write belongs in the write's transaction."""
        if self._write_lock is not None:
            async with self.engine.connect() as conn:
                yield conn
            return
        async with self._autocommit.connect() as conn:
            yield conn

    async def dispose(self) -> None:
        if self._lender is not None:
            await self._lender.close()
        if self._inline is not None:
            # No inline statement is under way: none of them awaits anything.
            await self._inline.close()
        await self.engine.dispose()


class _Lender:
    """Autocommit connections kept out of the pool and lent to one statement at a time: a pool checkout
    and return (events, isolation level set and reset, rollback) cost more CPU than the statement. A
    connection whose socket closed meanwhile is replaced before use; one that saw any error is dropped."""

    def __init__(self, engine: AsyncEngine, limit: int) -> None:
        self._engine = engine
        self._idle: list[AsyncConnection] = []
        self._slots = asyncio.Semaphore(limit)

    async def run(self, statement: Callable[[Connection], T]) -> T:
        async with self._slots:
            conn = await self._take()
            try:
                result = await conn.run_sync(statement)
            except BaseException:
                await _drop(conn)
                raise
            self._idle.append(conn)
            return result

    async def _take(self) -> AsyncConnection:
        while self._idle:
            conn = self._idle.pop()
            if not _closed_meanwhile(conn):
                return conn
            await _drop(conn)
        conn = await self._engine.connect()
        try:
            return await conn.execution_options(isolation_level="AUTOCOMMIT")
        except BaseException:
            await _drop(conn)
            raise

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            with suppress(Exception):
                await conn.close()


def _closed_meanwhile(conn: AsyncConnection) -> bool:
    sync = conn.sync_connection
    if sync is None or sync.closed or sync.invalidated:
        return True
    try:
        driver = sync.connection.driver_connection
    except Exception:  # no longer usable
        return True
    is_closed = getattr(driver, "is_closed", None)
    return bool(is_closed is not None and is_closed())


async def _drop(conn: AsyncConnection) -> None:
    """Close a connection whose state is unknown (an error, a cancellation mid-statement) for good."""
    with suppress(Exception):
        await conn.invalidate()
    with suppress(Exception):
        await conn.close()


def _is_plain_loopback(url: str) -> bool:
    """A TCP connection to this machine with no SSL option given: asyncpg would try SSL first (a
    round trip and a refusal on every new connection)."""
    parsed = make_url(url)
    return parsed.host in _LOOPBACK_HOSTS and not {"ssl", "sslmode"} & set(parsed.query)


def _refuse_closed(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
    """Instead of a ping per checkout: a pooled connection whose socket was closed meanwhile (server
    restart, idle timeout, terminated backend) is replaced before use, at no round trip."""
    driver = getattr(dbapi_conn, "driver_connection", None)
    is_closed = getattr(driver, "is_closed", None)
    if is_closed is not None and is_closed():
        raise DisconnectionError("connection closed while idle in the pool")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # NORMAL is durable in WAL mode against process crashes (SIGKILL); only a power loss may lose
    # the last transactions, never corrupt the file.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _upgrade_to_head(conn: Connection) -> None:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, "head")
