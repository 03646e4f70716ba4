"""Test databases: SQLite in a temporary folder, or PostgreSQL.

Creating and dropping a PostgreSQL database costs about a second, so one database is created per test
process (schema included), emptied before each test with one TRUNCATE, and dropped when the process exits.
"""

from __future__ import annotations

import asyncio
import atexit
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from tuberunner.coordinator.database import Database

PG_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
_shared: str | None = None


async def postgres_available() -> str | None:
    """None when reachable, else the reason to skip."""
    try:
        conn = await asyncpg.connect(PG_DSN, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"PostgreSQL at 127.0.0.1:5432 is not reachable ({exc})"
    await conn.close()
    return None


async def _create_shared() -> str:
    name = f"tuberunner_test_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(PG_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    atexit.register(lambda: asyncio.run(_drop(name)))
    db = Database(f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}")
    try:
        await db.migrate()
    finally:
        await db.dispose()
    return name


async def _drop(name: str) -> None:
    admin = await asyncpg.connect(PG_DSN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@asynccontextmanager
async def postgres_database() -> AsyncIterator[str]:
    """Yield the SQLAlchemy URL of an empty, migrated database."""
    global _shared
    if _shared is None:
        _shared = await _create_shared()
    conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:5432/{_shared}")
    try:
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
        )
        names = ", ".join(f'"{row["tablename"]}"' for row in tables)
        await conn.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()
    yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{_shared}"
