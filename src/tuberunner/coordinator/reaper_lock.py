"""One reaper at a time among the coordinator processes of one PostgreSQL database.

The reaper's work is safe to race (every take-back is a conditional update), but N processes reaping
the same rows every few seconds is N times the load, and a completion lost by a dead process would be
restarted by each of them. So a PostgreSQL session-level advisory lock elects one: the process that holds
it reaps; the others only check, at each tick, whether it is free. The lock lives as long as the holder's
connection: when that process dies (or its connection is killed, `pg_terminate_backend`), PostgreSQL
releases it and the next process to tick takes it over, within one reaper interval.

On SQLite a database has one process: the lock is always held.
"""

from __future__ import annotations

import logging
from typing import Final

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from tuberunner.coordinator.database import Database

log = logging.getLogger(__name__)

# Any constant shared by every process of the deployment: "tuberunner reaper" in ASCII, folded to 63 bits.
REAPER_LOCK_KEY: Final = int.from_bytes(b"tbr-reap", "big") & (2**63 - 1)


class ReaperLock:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._conn: AsyncConnection | None = None

    @property
    def is_held(self) -> bool:
        return self.db.is_sqlite or self._conn is not None

    async def hold(self) -> bool:
        """True when this process is the reaper (now): keep the lock, or try to take it."""
        if self.db.is_sqlite:
            return True
        if self._conn is not None:
            try:
                await self._conn.execute(text("SELECT 1"))
                return True
            except Exception as exc:  # the connection is gone, and the lock with it
                log.warning("lost the reaper lock with its database connection: %s", exc)
                await self._drop()
        try:
            conn = await self.db.engine.connect()
        except Exception as exc:
            log.warning("cannot try the reaper lock: %s", exc)
            return False
        try:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            got = (
                await conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": REAPER_LOCK_KEY})
            ).scalar_one()
        except Exception as exc:
            log.warning("cannot try the reaper lock: %s", exc)
            await _close(conn)
            return False
        if not got:
            await _close(conn)
            return False
        log.info("this process is now the lease reaper")
        self._conn = conn
        return True

    async def release(self) -> None:
        if self._conn is not None:
            try:
                await self._conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": REAPER_LOCK_KEY})
            except Exception as exc:  # closing the connection releases it anyway
                log.debug("reaper lock release: %s", exc)
            await self._drop()

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await _close(conn)


async def _close(conn: AsyncConnection) -> None:
    try:
        await conn.invalidate()
        await conn.close()
    except Exception as exc:
        log.debug("closing the reaper lock's connection: %s", exc)
