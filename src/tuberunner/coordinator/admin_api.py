"""Admin API (spec §4): registration tokens, runners, jobs.

    POST   /api/v1/runners/registration-tokens/generate   204
    GET    /api/v1/runners/registration-tokens            200 {total, data: RunnerRegistrationToken[]}
    DELETE /api/v1/runners/registration-tokens/{id}       204; its runners go, their processing jobs
                                                          are re-queued
    GET    /api/v1/runners                                200 {total, data: Runner[]}
    DELETE /api/v1/runners/{runnerId}                     204; its processing jobs are re-queued
    GET    /api/v1/runners/jobs                           200 {total, data: RunnerJobAdmin[]}; each job also
                                                          has `unclaimedSince` (see `claims`)
    GET    /api/v1/runners/jobs/unclaimed                 200 {total, data: UnclaimedJob[]}: the pending jobs
                                                          no connected runner takes
    POST   /api/v1/runners/jobs/{jobUUID}/cancel          204; descendants become parent-cancelled
    DELETE /api/v1/runners/jobs/{jobUUID}                 204; cancelled first, descendants deleted too

Checks run in PeerTube's order: the admin bearer token (401 when missing or wrong), then the parameters
(400 `Incorrect request parameters: <names>`, naming every bad one at once), then the target (404).
PeerTube also answers 403 to a logged-in user without the `MANAGE_RUNNERS` right; the coordinator has no
users besides its admin token, so 403 is never produced here.

Query parameters are validated as PeerTube 8.x does: `stateOneOf` and `typeOneOf` with an unknown value
are rejected (6.3 ignored them). A list parameter may be repeated (`stateOneOf=1&stateOneOf=2`), use
bracket keys (`stateOneOf[]=1`, `stateOneOf[0]=1`, as qs serialises arrays) or a bracketed value
(`stateOneOf=[1,2]`); any other repeated parameter is a bad parameter.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tuberunner.coordinator import admin_queries
from tuberunner.coordinator.admin_queries import JobFilter, Page, Sort
from tuberunner.coordinator.context import Coordinator, base_url_of, coordinator_of
from tuberunner.coordinator.models import iso
from tuberunner.coordinator.problems import NotFound, invalid_params
from tuberunner.protocol.errors import Message
from tuberunner.protocol.jobs import JobState, JobType

log = logging.getLogger(__name__)

T = TypeVar("T")

_NO_CONTENT = 204
DEFAULT_COUNT = 15
MAX_COUNT = 100
# The largest OFFSET both databases take (64-bit); ids are 32-bit integers in PostgreSQL.
_MAX_START = 2**63 - 1
_MAX_ROW_ID = 2**31 - 1
# ASCII digits only: `str.isdigit()` also accepts '²', which `int()` refuses. Bounded so that `int()`
# never meets its 4300-digit limit.
_UNSIGNED = re.compile(r"[0-9]{1,30}")
_SIGNED = re.compile(r"[+-]?[0-9]{1,30}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
_CREATED_AT = frozenset({"createdAt"})


class _Query:
    """Reads query parameters and collects the names of the bad ones, so that one 400 lists them all."""

    def __init__(self, request: Request) -> None:
        self.params = request.query_params
        self.bad: list[str] = []

    def _single(self, name: str) -> str | None:
        values = self.params.getlist(name)
        if len(values) > 1:
            self.bad.append(name)
            return None
        return values[0] if values else None

    def _integer(self, name: str, default: int, maximum: int) -> int:
        raw = self._single(name)
        if raw is None:
            return default
        if not _UNSIGNED.fullmatch(raw) or int(raw) > maximum:
            self.bad.append(name)
            return default
        return int(raw)

    def page(self) -> Page:
        return Page(
            start=self._integer("start", 0, _MAX_START),
            count=self._integer("count", DEFAULT_COUNT, MAX_COUNT),
        )

    def sort(self, fields: frozenset[str], default: str) -> Sort:
        raw = self._single("sort")
        value = default if raw is None else raw
        if value.removeprefix("-") not in fields:
            self.bad.append("sort")
            value = default
        return Sort(value.removeprefix("-"), value.startswith("-"))

    def search(self) -> tuple[str | None, str | None]:
        """(exact job uuid, substring): a UUID searches that job only, any other text types and runners."""
        raw = self._single("search")
        if not raw:
            return None, None
        if "\x00" in raw:  # PostgreSQL refuses NUL in text
            self.bad.append("search")
            return None, None
        if _UUID.fullmatch(raw):
            return raw.lower(), None
        return None, raw

    def one_of(self, name: str, parse: Callable[[str], T | None]) -> frozenset[T] | None:
        indexed = re.compile(re.escape(name) + r"\[[0-9]*\]")
        items: list[str] = []
        present = False
        for key, value in self.params.multi_items():
            if key == name or indexed.fullmatch(key):
                present = True
                items.extend(_list_items(value))
        if not present:
            return None
        parsed = [parse(item) for item in items]
        chosen = frozenset(p for p in parsed if p is not None)
        if None in parsed:
            self.bad.append(name)
            return None
        return chosen

    def check(self) -> None:
        if self.bad:
            raise invalid_params(self.bad)


def _list_items(value: str) -> list[str]:
    """`5` → ['5']; `[5, 3]` → ['5', '3']; `["a"]` → ['a']; `[]` → []."""
    text = value.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return [text]
    inner = text[1:-1].strip()
    if not inner:
        return []
    return [item.strip().strip("\"'") for item in inner.split(",")]


def _state(item: str) -> JobState | None:
    if not _UNSIGNED.fullmatch(item):
        return None
    try:
        return JobState(int(item))
    except ValueError:
        return None


def _job_type(item: str) -> JobType | None:
    try:
        return JobType(item)
    except ValueError:
        return None


def _row_id(request: Request, key: str, wire_name: str, not_found: str) -> int:
    raw = request.path_params[key]
    if not _SIGNED.fullmatch(raw):
        raise invalid_params([wire_name])
    value = int(raw)
    if not 1 <= value <= _MAX_ROW_ID:
        raise NotFound(not_found)  # a valid integer, but no row can have it
    return value


def _job_uuid(request: Request) -> str:
    raw = request.path_params["job_uuid"]
    if not _UUID.fullmatch(raw):
        raise invalid_params(["jobUUID"])
    return str(raw).lower()


def _admin(request: Request) -> Coordinator:
    coordinator = coordinator_of(request)
    coordinator.admin.check(request)
    return coordinator


# ---------------------------------------------------------------- registration tokens


async def generate_registration_token(request: Request) -> Response:
    coordinator = _admin(request)
    await coordinator.runners.create_registration_token()
    return Response(status_code=_NO_CONTENT)


async def list_registration_tokens(request: Request) -> Response:
    coordinator = _admin(request)
    query = _Query(request)
    page = query.page()
    sort = query.sort(_CREATED_AT, "-createdAt")
    query.check()
    total, rows = await admin_queries.list_registration_tokens(coordinator.db, page, sort)
    return JSONResponse({"total": total, "data": [row.as_json() for row in rows]})


async def delete_registration_token(request: Request) -> Response:
    coordinator = _admin(request)
    token_id = _row_id(request, "token_id", "id", Message.REGISTRATION_TOKEN_NOT_FOUND)
    await coordinator.runners.remove_registration_token(token_id)
    return Response(status_code=_NO_CONTENT)


# ---------------------------------------------------------------- runners


async def list_runners(request: Request) -> Response:
    coordinator = _admin(request)
    query = _Query(request)
    page = query.page()
    sort = query.sort(_CREATED_AT, "-createdAt")
    query.check()
    total, rows = await admin_queries.list_runners(coordinator.db, page, sort)
    # Contacts are written in batches; the newest ones may still be in memory only.
    data = [row.with_contact(coordinator.runners.contact_of(row.id)).as_json() for row in rows]
    return JSONResponse({"total": total, "data": data})


async def delete_runner(request: Request) -> Response:
    coordinator = _admin(request)
    runner_id = _row_id(request, "runner_id", "runnerId", Message.RUNNER_NOT_FOUND)
    if not await coordinator.runners.remove([runner_id]):
        raise NotFound(Message.RUNNER_NOT_FOUND)
    return Response(status_code=_NO_CONTENT)


# ---------------------------------------------------------------- jobs


async def list_jobs(request: Request) -> Response:
    coordinator = _admin(request)
    query = _Query(request)
    page = query.page()
    sort = query.sort(admin_queries.JOB_SORT_FIELDS, "-createdAt")
    job_uuid, text = query.search()
    states = query.one_of("stateOneOf", _state)
    types = query.one_of("typeOneOf", _job_type)
    query.check()
    where = JobFilter(uuid=job_uuid, text=text, states=states, types=types)
    total, found = await admin_queries.list_jobs(coordinator.db, page, sort, where)
    base_url = base_url_of(request)
    data = []
    for job in found:
        body = job.as_json(base_url)
        body["unclaimedSince"] = iso(coordinator.claims.unclaimed_since(job.job))
        data.append(body)
    return JSONResponse({"total": total, "data": data})


async def list_unclaimed_jobs(request: Request) -> Response:
    coordinator = _admin(request)
    query = _Query(request)
    page = query.page()
    query.check()
    total, found = await coordinator.claims.page(page.start, page.count)
    return JSONResponse({"total": total, "data": [job.as_json() for job in found]})


async def cancel_job(request: Request) -> Response:
    coordinator = _admin(request)
    job = await coordinator.jobs.get(_job_uuid(request))
    if job is None:
        raise NotFound(Message.UNKNOWN_RUNNER_JOB)
    await coordinator.jobs.cancel(job)
    return Response(status_code=_NO_CONTENT)


async def delete_job(request: Request) -> Response:
    coordinator = _admin(request)
    job = await coordinator.jobs.get(_job_uuid(request))
    if job is None:
        raise NotFound(Message.UNKNOWN_RUNNER_JOB)
    await coordinator.jobs.delete(job)
    return Response(status_code=_NO_CONTENT)


# `/api/v1/runners/{runner_id}` comes last: Starlette takes the first full match, and the more specific
# paths above must win for their methods (a wrong method on them still answers 405).
routes: list[BaseRoute] = [
    Route("/api/v1/runners/registration-tokens/generate", generate_registration_token, methods=["POST"]),
    Route("/api/v1/runners/registration-tokens", list_registration_tokens, methods=["GET"]),
    Route("/api/v1/runners/registration-tokens/{token_id}", delete_registration_token, methods=["DELETE"]),
    Route("/api/v1/runners", list_runners, methods=["GET"]),
    Route("/api/v1/runners/jobs", list_jobs, methods=["GET"]),
    Route("/api/v1/runners/jobs/unclaimed", list_unclaimed_jobs, methods=["GET"]),
    Route("/api/v1/runners/jobs/{job_uuid}/cancel", cancel_job, methods=["POST"]),
    Route("/api/v1/runners/jobs/{job_uuid}", delete_job, methods=["DELETE"]),
    Route("/api/v1/runners/{runner_id}", delete_runner, methods=["DELETE"]),
]
