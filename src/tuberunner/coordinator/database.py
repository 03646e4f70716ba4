"""Engine creation, migrations at start-up, and the transaction helpers every write goes through.

SQLite allows one writer at a time. The coordinator writes through one connection of its own, used on the
event loop's thread with no thread hop: a write transaction (BEGIN IMMEDIATE … COMMIT) runs from start to
end without giving the loop away, so the file lock is never held across an await and no other coroutine
waits behind it. Commits in WAL mode with `synchronous=NORMAL` do not wait for the disk; the WAL is copied
back into the database (checkpoint, the part that does) by a worker thread at most once a second. An
asyncio lock still serialises writers, for the rare transaction that awaits something in the middle.
The file lock held by another process is never waited for on the loop: BEGIN IMMEDIATE fails at once
(no busy timeout) and is retried after an asyncio sleep. Reads go through aiosqlite (its own threads).

PostgreSQL needs no such lock: correctness comes from conditional UPDATEs (`... WHERE state = pending`).
There every round trip counts: reads and single-statement writes run without BEGIN/COMMIT (autocommit),
on connections kept for them out of the pool, pooled connections are not pinged (one closed while idle is
noticed without a round trip and replaced), and loopback connections skip the SSL attempt.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DisconnectionError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

log = logging.getLogger(__name__)
T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Enough for one connection per concurrent request at the load we are built for (hundreds of runners
# make a few dozen calls at a time): connections beyond the pool are closed after each use.
PG_POOL_SIZE = 40
PG_POOL_OVERFLOW = 20
# Of those, kept out of the pool for single statements (`_Lender`).
PG_LENT_CONNECTIONS = 30
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
# How long a write waits for another process to release the SQLite file lock (as `busy_timeout` did).
SQLITE_BUSY_WAIT_S = 30.0
SQLITE_CHECKPOINT_INTERVAL_S = 1.0


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
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        else:
            event.listen(self.engine.sync_engine, "checkout", _refuse_closed)
        # Statements that commit by themselves (PostgreSQL: no BEGIN/COMMIT round trips).
        self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self._lender = None if self.is_sqlite else _Lender(self.engine, PG_LENT_CONNECTIONS)
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        # SQLite on a file: the one writer connection and a reader for short reads, both used on the
        # loop's thread and kept open (see the module docstring).
        self._writer: AsyncEngine | None = None
        self._writer_conn: AsyncConnection | None = None
        self._reader: AsyncEngine | None = None
        self._reader_conn: AsyncConnection | None = None
        self._checkpoints: _Checkpoints | None = None
        path = make_url(url).database if self.is_sqlite else None
        if path and path != ":memory:" and not path.startswith("file:"):
            self._writer = _inline_sqlite_engine(url, path, writer=True)
            self._reader = _inline_sqlite_engine(url, path, writer=False)
            self._checkpoints = _Checkpoints(path)

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
        if self._writer is None:
            async with self._write_lock, self.engine.begin() as conn:
                yield conn
            return
        async with self._write_lock:
            conn = await self._begin_writing()
            try:
                yield conn
                await conn.commit()
            except BaseException:
                await self._roll_back_writer(conn)
                raise
        self._committed()

    async def write_statement(self, statement: Callable[[Connection], T]) -> T:
        """Run `statement` (one write statement, results read inside) and commit it, in one go: on
        PostgreSQL in autocommit (atomic by itself), on SQLite in a transaction that never gives the event
        loop away."""
        if self._lender is not None:
            return await self._lender.run(statement)
        lock = self._write_lock
        if self._writer is None or lock is None:
            async with self.write() as conn:
                return await conn.run_sync(statement)
        deadline = time.monotonic() + SQLITE_BUSY_WAIT_S
        delay_s = 0.001
        async with lock:
            while True:
                conn = await self._writer_connection()
                try:
                    result = await conn.run_sync(_in_transaction, statement)
                except _BusyAtBegin:
                    await self._drop_writer()
                    if time.monotonic() >= deadline:
                        raise
                except BaseException:
                    if conn.invalidated or conn.in_transaction():
                        await self._drop_writer()
                    raise
                else:
                    break
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 0.05)
        self._committed()
        return result

    async def _writer_connection(self) -> AsyncConnection:
        assert self._writer is not None
        if self._writer_conn is None:
            self._writer_conn = await self._writer.connect()
        return self._writer_conn

    async def _drop_writer(self) -> None:
        """Close the writer connection (rolling back anything open); the next write opens another."""
        conn, self._writer_conn = self._writer_conn, None
        if conn is not None:
            with suppress(Exception):
                await conn.close()

    async def _begin_writing(self) -> AsyncConnection:
        """The writer connection in a new transaction; waits (asynchronously) while another process
        holds the file lock."""
        deadline = time.monotonic() + SQLITE_BUSY_WAIT_S
        delay_s = 0.001
        while True:
            conn = await self._writer_connection()
            try:
                await conn.begin()  # BEGIN IMMEDIATE: the file lock now, or SQLITE_BUSY at once
            except OperationalError as exc:
                await self._drop_writer()
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise
            else:
                return conn
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.05)

    async def _roll_back_writer(self, conn: AsyncConnection) -> None:
        try:
            await conn.rollback()
        except Exception:
            await self._drop_writer()

    def _committed(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.after_commit()

    async def read_statement(self, statement: Callable[[Connection], T]) -> T:
        """Run a short read (`statement`, results read inside) in one go. On SQLite it runs on the loop's
        thread: an indexed read costs less than the hops to a reader thread, and a thread reading rows
        while the loop is busy waits for the GIL at every row. Not for reads of unbounded size."""
        if self._lender is not None:
            return await self._lender.run(statement)
        if self._reader is not None:
            if self._reader_conn is None:
                self._reader_conn = await self._reader.connect()
            conn = self._reader_conn
            try:
                return await conn.run_sync(_read_once, statement)
            except OperationalError as exc:
                # Another process is recovering the WAL (rare): wait in a reader thread instead.
                await self._drop_reader()
                if not _is_busy(exc):
                    raise
        async with self.engine.connect() as conn:
            return await conn.run_sync(statement)

    async def _drop_reader(self) -> None:
        conn, self._reader_conn = self._reader_conn, None
        if conn is not None:
            with suppress(Exception):
                await conn.close()

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
        if self._reader is not None:
            await self._drop_reader()
            await self._reader.dispose()
        if self._writer is not None:
            if self._write_lock is not None:
                async with self._write_lock:
                    await self._drop_writer()
            await self._writer.dispose()
        if self._checkpoints is not None:
            await self._checkpoints.close()
        await self.engine.dispose()


class _BusyAtBegin(Exception):
    """Another process holds the SQLite file lock: nothing was done, the transaction can be retried."""


def _read_once(conn: Connection, statement: Callable[[Connection], T]) -> T:
    try:
        return statement(conn)
    finally:
        conn.rollback()  # no snapshot is kept between reads


def _in_transaction(conn: Connection, statement: Callable[[Connection], T]) -> T:
    try:
        conn.begin()
    except OperationalError as exc:
        if _is_busy(exc):
            raise _BusyAtBegin from exc
        raise
    try:
        result = statement(conn)
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    return result


# ------------------------------------------------------------------------------ SQLite inline writer


class _InlineCursor:
    """The part of aiosqlite's cursor that SQLAlchemy's aiosqlite dialect uses, executed at once on the
    calling thread: an `await` on it never gives the event loop away."""

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    async def __aenter__(self) -> _InlineCursor:
        return self

    async def __aexit__(self, *_: object) -> None:
        self._cursor.close()

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value

    async def execute(self, sql: str, parameters: Any = ()) -> _InlineCursor:
        self._cursor.execute(sql, parameters)
        return self

    async def executemany(self, sql: str, parameters: Iterable[Any]) -> _InlineCursor:
        self._cursor.executemany(sql, parameters)
        return self

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> Sequence[Any]:
        return self._cursor.fetchmany() if size is None else self._cursor.fetchmany(size)

    async def fetchall(self) -> Sequence[Any]:
        return self._cursor.fetchall()

    async def close(self) -> None:
        self._cursor.close()


class _InlineConnection:
    """aiosqlite's connection API over a plain sqlite3 connection, without the thread."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        # The name SQLAlchemy's adapter looks at to tell whether the connection is still open.
        self._connection: sqlite3.Connection | None = conn

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._connection is None:
            raise ValueError("no active connection")
        return self._connection

    @property
    def isolation_level(self) -> str | None:
        return self._conn.isolation_level

    def cursor(self) -> _InlineCursor:
        return _InlineCursor(self._conn.cursor())

    async def commit(self) -> None:
        self._conn.commit()

    async def rollback(self) -> None:
        self._conn.rollback()

    async def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._conn.create_function(*args, **kwargs)

    async def close(self) -> None:
        self.stop()

    def stop(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _inline_sqlite_engine(url: str, path: str, *, writer: bool) -> AsyncEngine:
    async def connect() -> _InlineConnection:
        # No busy timeout: the loop never waits for a lock held by another process (the writer waits
        # for it in `_begin_writing`, asynchronously). Used by one coroutine at a time, possibly closed
        # by the pool from another thread.
        conn = sqlite3.connect(path, timeout=0, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        # Checkpoints fsync: they run in a worker thread (`_Checkpoints`), never in a commit.
        conn.execute("PRAGMA wal_autocheckpoint=0")
        if not writer:
            conn.execute("PRAGMA query_only=ON")
        return _InlineConnection(conn)

    engine = create_async_engine(url, async_creator=connect, pool_size=1, max_overflow=0)
    if writer:
        event.listen(engine.sync_engine, "begin", _begin_immediately)
    return engine


def _begin_immediately(conn: Connection) -> None:
    """Take the write lock when the transaction starts: a transaction that would have to wait for it
    later (SQLITE_BUSY in the middle, half done) cannot happen."""
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _is_busy(exc: OperationalError) -> bool:
    code = getattr(exc.orig, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class _Checkpoints:
    """Copies the WAL back into the database file in a worker thread, at most once per interval while
    writes happen (a passive checkpoint: it never waits for, nor blocks, readers and the writer)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._running: asyncio.Future[None] | None = None
        self._last = time.monotonic()

    def after_commit(self) -> None:
        if self._running is not None and not self._running.done():
            return
        now = time.monotonic()
        if now - self._last < SQLITE_CHECKPOINT_INTERVAL_S:
            return
        self._last = now
        self._running = asyncio.get_running_loop().run_in_executor(None, self._checkpoint)

    def _checkpoint(self) -> None:
        try:
            if self._conn is None:
                self._conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:  # the next one does the work
            log.warning("SQLite checkpoint failed: %s", exc)

    async def close(self) -> None:
        if self._running is not None:
            await self._running
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# ------------------------------------------------------------------------------ PostgreSQL


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
