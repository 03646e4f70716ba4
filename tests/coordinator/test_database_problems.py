"""A database whose connection died mid-call (a PostgreSQL restart, a killed backend) answers 503 (send it
again); any other database error stays our bug (500)."""

from __future__ import annotations

import asyncpg.exceptions as asyncpg_exc
from sqlalchemy import exc as sa_exc

from tuberunner.coordinator.problems import ServiceUnavailable, database_problem


def _wrapped(kind: type[sa_exc.DBAPIError], driver_error: Exception) -> sa_exc.DBAPIError:
    """As SQLAlchemy's asyncpg dialect raises it: its adapter error, caused by asyncpg's."""
    adapted = Exception(str(driver_error))
    adapted.__cause__ = driver_error
    return kind("SELECT 1", {}, adapted)


def test_a_lost_connection_is_a_503_with_retry_after() -> None:
    for error in (
        _wrapped(sa_exc.OperationalError, asyncpg_exc.AdminShutdownError("terminating connection")),
        _wrapped(sa_exc.OperationalError, asyncpg_exc.ConnectionDoesNotExistError("connection lost")),
        _wrapped(sa_exc.InternalError, asyncpg_exc.InternalClientError("cannot switch to state 12")),
        sa_exc.InterfaceError("SELECT 1", {}, Exception("connection is closed")),
        sa_exc.DBAPIError("SELECT 1", {}, Exception("gone"), connection_invalidated=True),
    ):
        problem = database_problem(None, error)
        assert isinstance(problem, ServiceUnavailable), error
        assert problem.headers is not None
        assert problem.headers["retry-after"]


def test_a_broken_schema_a_constraint_or_bad_data_is_not_an_outage() -> None:
    assert database_problem(None, sa_exc.OperationalError("SELECT", {}, Exception("no such table"))) is None
    assert database_problem(None, sa_exc.IntegrityError("INSERT", {}, Exception("duplicate key"))) is None
    assert database_problem(None, sa_exc.DataError("INSERT", {}, Exception("value too long"))) is None
