"""SQLite single statements run on the event loop's thread, through a plain sqlite3 connection kept for them.

Through aiosqlite every step of a statement (execute, fetch, commit) is handed to the connection's thread
and its result back to the loop: two thread switches per step, and a thread that waits for the GIL while
the loop is busy. The hot statements (an indexed conditional UPDATE, a lookup by key) cost less than
those hops, so `Database.write_statement` and `Database.read_statement` run them here instead, at once,
without giving the loop away. This is safe because:

* in WAL mode with `synchronous=NORMAL` a commit appends to the WAL and does not wait for the disk; the
  step that does (the checkpoint) runs in a worker thread instead (`_Checkpoints`);
* the coordinator is the only writer of its SQLite file and serialises its writes with an asyncio lock
  (held by the caller of `write`), so the file lock is free whenever a write starts here;
* the loop never waits for a lock held by someone else (a migration, an operator's sqlite3 shell): the
  busy timeout is a few milliseconds, after which `NotDone` is raised, nothing having been done, and the
  caller runs the statement through aiosqlite, whose thread waits instead;
* nothing of a call outlives it (its transaction, its cursors), so no snapshot is kept between calls and
  a read sees every commit made before it, by aiosqlite's connections too.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import create_engine
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)
T = TypeVar("T")

# The longest the loop waits for a lock held by another connection before the statement goes through
# aiosqlite instead. SQLite's busy handler sleeps 1 ms, then 1 ms more: a lock held for a moment is
# waited for, one held for long costs the loop 2 ms once per write that finds it held.
INLINE_BUSY_TIMEOUT_S = 0.002
# Commits made here between two checkpoints: at a few pages per commit, about SQLite's default of
# 1,000 WAL pages (`wal_autocheckpoint`, turned off on the inline connection).
CHECKPOINT_EVERY_COMMITS = 256


class NotDone(Exception):
    """The statement was not run, or was rolled back (another connection holds the lock, the inline
    connection could not be opened or could not start a transaction): nothing was done and nothing is
    left open, so the caller can run it another way."""


class InlineSqlite:
    """One sqlite3 connection used on the event loop's thread, opened at first use and reopened after a
    failure left it in an unknown state. Calls never overlap: none of them awaits anything."""

    def __init__(self, path: str) -> None:
        self.path = path
        # An engine only to get a SQLAlchemy `Connection` (what statements are written against) over our
        # own sqlite3 connection; NullPool: the one connection is held from first use to `close`.
        self._engine = create_engine(
            URL.create("sqlite", database=path),
            creator=self._connect,
            poolclass=NullPool,
            hide_parameters=True,  # they hold tokens, and exception texts end in logs
        )
        # The SQLAlchemy connection and the sqlite3 connection under it, once open.
        self._pair: tuple[Connection, _TrackingConnection] | None = None
        # Why statements are no longer run here, for good (the file cannot be in WAL mode).
        self._disabled: str | None = None
        self._checkpoints = _Checkpoints(path)

    def write(self, statement: Callable[[Connection], T]) -> T:
        """Run `statement` (its results read inside) in one write transaction and commit it. The caller
        holds the coordinator's write lock. Raises `NotDone` when it could not run it here."""
        conn, driver = self._connection()
        try:
            # Straight to sqlite3: through SQLAlchemy this would cost more than the statement itself.
            # IMMEDIATE takes the lock now, so the lock held elsewhere is found before anything is done.
            # SQLAlchemy's own transaction begins with the statement's first execute (a no-op for
            # pysqlite) and its commit or rollback reaches this one.
            driver.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._end(conn, driver)
            raise self._not_done(exc) from exc
        try:
            result = statement(conn)
            driver.close_cursors()
            conn.commit()
            if driver.in_transaction:  # `statement` executed nothing through `conn`
                driver.commit()
        except BaseException as exc:
            self._end(conn, driver)
            if _is_busy(exc):  # cannot happen once BEGIN IMMEDIATE succeeded, but costs nothing
                raise self._not_done(exc) from exc
            raise
        self._checkpoints.after_commit()
        return result

    def read(self, statement: Callable[[Connection], T]) -> T:
        """Run `statement` (a short read, its results read inside) outside any transaction: each of its
        statements sees every commit made before it. Raises `NotDone` when it could not run it here
        (another process recovering the WAL, say)."""
        conn, driver = self._connection()
        try:
            result = statement(conn)
        except BaseException as exc:
            self._end(conn, driver)
            if _is_busy(exc):
                raise self._not_done(exc) from exc
            raise
        self._end(conn, driver)
        return result

    async def close(self) -> None:
        """Close the connection (the next call would open another) and wait for a checkpoint under way."""
        self._drop()
        await self._checkpoints.close()

    def _connection(self) -> tuple[Connection, _TrackingConnection]:
        if self._pair is not None:
            return self._pair
        if self._disabled is not None:
            raise NotDone(self._disabled)
        try:
            conn = self._engine.connect()
        except SQLAlchemyError as exc:
            cause = exc.orig if isinstance(exc, DBAPIError) else None
            if isinstance(cause, _NotWal):
                # Not safe here (a commit would wait for the disk), and never will be: say it once.
                self._disabled = str(cause)
                log.warning("SQLite statements go through aiosqlite only: %s", self._disabled)
                raise NotDone(self._disabled) from exc
            raise self._not_done(exc) from exc
        driver = conn.connection.driver_connection
        assert isinstance(driver, _TrackingConnection)
        self._pair = conn, driver
        return self._pair

    def _end(self, conn: Connection, driver: _TrackingConnection) -> None:
        """Close the call's cursors and roll back whatever is open: nothing of the call outlives it. A
        connection that cannot is dropped (the next call opens another)."""
        try:
            driver.close_cursors()
            conn.rollback()
            if driver.in_transaction:  # `statement` executed nothing through `conn`
                driver.rollback()
        except (sqlite3.Error, SQLAlchemyError) as exc:
            log.warning("SQLite inline connection dropped after a failed rollback: %s", exc)
            self._drop()
            return
        if conn.invalidated:
            self._drop()

    def _connect(self) -> _TrackingConnection:
        # isolation_level=None: sqlite3 starts no transaction by itself; a write starts its own (BEGIN
        # IMMEDIATE) and a read runs in none, so its snapshot ends with its statement.
        # check_same_thread=False: used on the loop's thread only, but which thread that is belongs to
        # whoever runs the loop (tests run one loop after another).
        driver = sqlite3.connect(
            self.path,
            timeout=INLINE_BUSY_TIMEOUT_S,
            isolation_level=None,
            check_same_thread=False,
            factory=_TrackingConnection,
        )
        try:
            # Per connection, as on the aiosqlite ones: FULL would fsync every commit on the loop.
            (mode,) = driver.execute("PRAGMA journal_mode=WAL").fetchone()
            if str(mode).lower() != "wal":
                raise _NotWal(f"{self.path} is in journal mode {mode}, not WAL")
            driver.execute("PRAGMA synchronous=NORMAL")
            driver.execute("PRAGMA foreign_keys=ON")
            # Checkpoints fsync: `_Checkpoints` runs them in a worker thread, never in a commit here.
            driver.execute("PRAGMA wal_autocheckpoint=0")
            driver.close_cursors()
        except BaseException:
            driver.close()
            raise
        return driver

    def _drop(self) -> None:
        pair, self._pair = self._pair, None
        if pair is None:
            return
        conn, driver = pair
        try:
            conn.close()
        except SQLAlchemyError as exc:
            log.warning("closing the SQLite inline connection failed: %s", exc)
        driver.close()  # already closed by `conn.close()` unless that failed; closing twice is fine

    def _not_done(self, exc: BaseException) -> NotDone:
        """What to raise when the statement is left to aiosqlite (the pair is dropped unless busy)."""
        if not _is_busy(exc):
            log.warning("SQLite inline connection unusable, using aiosqlite instead: %s", exc)
            self._drop()
        return NotDone(str(exc))


class _NotWal(sqlite3.OperationalError):
    """The database cannot be put in WAL mode (a file system without shared memory, say)."""


class _TrackingConnection(sqlite3.Connection):
    """A sqlite3 connection that keeps the cursors it opened until told to close them. A statement left
    active (a result not read to its end) keeps its read snapshot, even past a ROLLBACK: later reads on
    the connection would then miss new commits, and writes would fail with SQLITE_BUSY_SNAPSHOT."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._cursors: list[sqlite3.Cursor] = []

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        cursor = super().cursor(*args, **kwargs)
        self._cursors.append(cursor)
        return cursor

    def close_cursors(self) -> None:
        cursors, self._cursors = self._cursors, []
        for cursor in cursors:
            cursor.close()


def _is_busy(exc: BaseException) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED (extended codes included), raw or wrapped by SQLAlchemy."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    code = getattr(orig, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class _Checkpoints:
    """Copies the WAL back into the database file (the step that waits for the disk) in a worker thread,
    once every `CHECKPOINT_EVERY_COMMITS` commits made inline, one at a time. PASSIVE: it never waits
    for, nor blocks, readers and writers; what it cannot copy yet the next one copies."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._commits = 0
        self._conn: sqlite3.Connection | None = None
        self._running: asyncio.Future[None] | None = None

    def after_commit(self) -> None:
        self._commits += 1
        if self._commits < CHECKPOINT_EVERY_COMMITS:
            return
        if self._running is not None and not self._running.done():
            return
        self._commits = 0
        self._running = asyncio.get_running_loop().run_in_executor(None, self._checkpoint)

    def _checkpoint(self) -> None:
        try:
            if self._conn is None:
                self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:  # the next one does the work
            log.warning("SQLite checkpoint failed: %s", exc)

    async def close(self) -> None:
        running, self._running = self._running, None
        if running is not None:
            await running
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
