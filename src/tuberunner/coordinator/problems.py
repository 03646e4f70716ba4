"""Every error the coordinator answers with, and the one place that turns them into problem documents.

    Problem                         any answer with a status >= 400 (spec §2.3)
    ├── BadRequest (400)            `Incorrect request parameters: <fields>` with `invalid-params`
    ├── NotFound (404)
    ├── Conflict (409)
    ├── Unauthorized (401) / Forbidden (403)   admin endpoints only
    ├── PayloadTooLarge (413)
    └── ServiceUnavailable (503)    a part we depend on (database, object storage) cannot be reached

Storage errors become problems here too (`storage_problem`): a file missing from storage is a 404 naming
the file, an unreachable store a 503 with Retry-After; both are logged with their cause. So do database
errors that say the database is unreachable or the connection died (`database_problem`: a PostgreSQL
restart, a killed backend): 503, the call may be sent again. Any other database error is our bug (500).

Handlers raise these; `problem_response` renders them. Anything else that escapes a handler is our bug:
it is logged and answered with a 500 problem document by the outermost middleware, never a crash.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from asyncpg import exceptions as asyncpg_exc  # type: ignore[import-untyped]
from sqlalchemy import exc as sa_exc
from starlette.requests import Request
from starlette.responses import JSONResponse

from tuberunner.coordinator.storage import StorageError, StorageMissing
from tuberunner.protocol.errors import PROBLEM_TYPE_BASE, ErrorCode, Message

log = logging.getLogger(__name__)


class Problem(Exception):
    status = 500

    def __init__(
        self,
        detail: str,
        *,
        code: ErrorCode | None = None,
        invalid_params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code
        self.invalid_params = invalid_params
        self.headers = headers


class BadRequest(Problem):
    status = 400


class Unauthorized(Problem):
    status = 401


class Forbidden(Problem):
    status = 403


class NotFound(Problem):
    status = 404


class Conflict(Problem):
    status = 409


class PayloadTooLarge(Problem):
    status = 413


class UnsupportedMediaType(Problem):
    status = 415


class ServiceUnavailable(Problem):
    status = 503


# What a client is told to wait before trying again while storage or the database is unreachable.
STORAGE_RETRY_AFTER_S = 5


# SQLSTATE classes of a broken connection (08) and of a server stopping or killing backends (57).
_OUTAGE_SQLSTATE_CLASSES = ("08", "57")


def _is_outage(exc: sa_exc.DBAPIError) -> bool:
    """The connection died or the server went away: SQLAlchemy saw a disconnect, or the driver's error is
    a connection failure, a server shutting the session down (`pg_terminate_backend`), or a client-side
    state error of a connection left broken by one. A missing table or a constraint is not one."""
    if exc.connection_invalidated or isinstance(exc, sa_exc.InterfaceError):
        return True
    cause = exc.orig.__cause__ if exc.orig is not None else None
    sqlstate = getattr(cause, "sqlstate", None) or getattr(exc.orig, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate[:2] in _OUTAGE_SQLSTATE_CLASSES:
        return True
    return isinstance(cause, asyncpg_exc.InterfaceError | asyncpg_exc.InternalClientError)


def database_problem(request: Request | None, exc: sa_exc.DBAPIError) -> Problem | None:
    """A 503 for a database that is unreachable or whose connection died mid-call; None otherwise."""
    if not _is_outage(exc):
        return None
    where = f" on {request.method} {request.url.path}" if request is not None else ""
    log.error("database unavailable%s: %s", where, str(exc.orig or exc).splitlines()[0][:300])
    return ServiceUnavailable(
        "Database is unavailable, try again later", headers={"retry-after": str(STORAGE_RETRY_AFTER_S)}
    )


def storage_problem(request: Request | None, exc: StorageError) -> Problem:
    """StorageMissing → 404, anything else (unreachable, refused) → 503; logged with the cause."""
    where = f" on {request.method} {request.url.path}" if request is not None else ""
    if isinstance(exc, StorageMissing):
        log.error("file missing from storage%s: %s", where, exc)
        return NotFound(f"File missing from storage: {exc}")
    log.error("storage unavailable%s: %s", where, exc)
    return ServiceUnavailable(
        f"Storage is unavailable, try again later: {exc}",
        headers={"retry-after": str(STORAGE_RETRY_AFTER_S)},
    )


def invalid_params(fields: Iterable[str], reasons: dict[str, str] | None = None) -> BadRequest:
    """PeerTube's generic validation failure: the names of the bad fields, comma separated."""
    names = list(dict.fromkeys(fields))
    reasons = reasons or {}
    return BadRequest(
        Message.INCORRECT_PARAMS + ", ".join(names),
        invalid_params={name: reasons.get(name, "Invalid value") for name in names},
    )


def problem_response(request: Request | None, problem: Problem) -> JSONResponse:
    body: dict[str, Any] = {
        "status": problem.status,
        "detail": problem.detail,
        "error": problem.detail,
    }
    if problem.code is not None:
        body["code"] = str(problem.code)
        body["type"] = PROBLEM_TYPE_BASE + str(problem.code)
    else:
        body["type"] = "about:blank"
    if problem.invalid_params is not None:
        body["invalid-params"] = {
            name: {"msg": reason, "path": name, "location": "body"}
            for name, reason in problem.invalid_params.items()
        }
        if request is not None:
            body["instance"] = str(request.url.path)
    return JSONResponse(
        body, status_code=problem.status, media_type="application/problem+json", headers=problem.headers
    )
