"""API fuzz: schemathesis drives every operation of the served OpenAPI description against a real
coordinator (uvicorn on loopback, SQLite and PostgreSQL), with data that fits the description (positive)
and data that breaks it (negative). No answer may be a 5xx, every answer must match the description
(status documented, content type, body schema, headers), and negative data must be refused with a 4xx.

Generated values are mixed with real ones (runner tokens, processing jobs and their job tokens, videos,
ids; seeded afresh for each operation) so that calls get past the token checks into the state machine;
the admin token is sent most of the time, a wrong one or none otherwise.

    TUBERUNNER_FUZZ_EXAMPLES=500 .venv/bin/pytest tests/fuzz -p no:cacheprovider   # a longer run by hand
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import select

from tests.coordinator.test_runner_api import Env
from tests.fuzz.threaded import ThreadedCoordinator
from tests.support.databases import postgres_available, postgres_database
from tests.support.protocol import admin_headers
from tests.support.servers import ADMIN_TOKEN
from tuberunner.coordinator.config import CoordinatorConfig
from tuberunner.coordinator.openapi import OPENAPI_PATH, openapi_document
from tuberunner.coordinator.schema import registration_tokens
from tuberunner.protocol.jobs import JobType

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("TUBERUNNER_FUZZ_EXAMPLES", "10"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
]
_METHODS = ("get", "put", "post", "delete", "patch")
# Negative data needs something to break: operations without parameters or body get positive cases only.
CASES = sorted(
    (method.upper(), path, mode)
    for path, item in openapi_document()["paths"].items()
    for method, op in item.items()
    if method in _METHODS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode == GenerationMode.POSITIVE or op.get("parameters") or op.get("requestBody")
)


@dataclass
class Known:
    """Real values by parameter or body field name, swapped into generated cases."""

    values: dict[str, list[str]] = field(default_factory=dict)

    def add(self, name: str, *values: object) -> None:
        self.values.setdefault(name, []).extend(str(v) for v in values)


async def _seed(server: ThreadedCoordinator, result_files: dict[str, Path]) -> Known:
    """Fresh real values for one operation's fuzz: two runners, processing jobs of three types with their
    job tokens, their videos, a pending job, a registration token, and the ids of all that."""
    known = Known()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        env = Env(server.running, http, result_files)
        runner = await env.register(f"fuzzed {uuid.uuid4().hex[:8]}")
        other = await env.register(f"other {uuid.uuid4().hex[:8]}")
        known.add("runnerToken", runner, other)
        for token in (runner, other):
            auth = await env.c.runners.by_token(token)
            assert auth is not None
            known.add("runnerId", auth.runner.id)
        for job_type in (JobType.VOD_WEB_VIDEO, JobType.STUDIO, JobType.VOD_HLS):
            seeded = await env.seed(job_type, children=1)
            job_token = await env.accept(runner, seeded.parent)
            known.add("jobToken", job_token)
            known.add("jobUUID", seeded.parent, *seeded.children)
            known.add("videoId", seeded.video_uuid, seeded.video_id)
            known.add("videoUUID", seeded.video_uuid)
        pending = await env.seed(children=0)
        known.add("jobUUID", pending.parent)
        known.add("filename", "intro-1.mp4")
        registration = await env.c.runners.create_registration_token()
        known.add("registrationToken", registration)
        async with env.c.db.read() as conn:
            found = select(registration_tokens.c.id).where(registration_tokens.c.token == registration)
            known.add("id", (await conn.execute(found)).scalar_one())
    return known


async def _postgres_url() -> str:
    reason = await postgres_available()
    if reason:
        pytest.skip(reason)
    async with postgres_database() as url:  # emptied now; ours until the next test that takes it
        return url


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, result_files: dict[str, Path]
) -> Iterator[ThreadedCoordinator]:
    # PostgreSQL refuses some text SQLite stores (NUL): the fuzz runs on both.
    database_url = asyncio.run(_postgres_url()) if request.param == "postgres" else None
    config = CoordinatorConfig(
        data_dir=tmp_path_factory.mktemp("fuzz") / "coordinator",
        database_url=database_url,
        admin_token=ADMIN_TOKEN,
        max_upload_bytes=1024 * 1024,
        reaper_interval_s=0.5,
    )
    with ThreadedCoordinator(config) as running:
        yield running


@pytest.fixture
def known(server: ThreadedCoordinator, result_files: dict[str, Path]) -> Known:
    """Seeded for each operation: an earlier operation's fuzz may have deleted or finished the last ones."""
    return server.run(_seed(server, result_files))


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as http:
        yield http


@pytest.fixture(scope="module")
def schema(server: ThreadedCoordinator) -> Any:
    """The document as the coordinator serves it (not the one built in this process)."""
    return schemathesis.openapi.from_url(server.url + OPENAPI_PATH)


def _with_known_values(case: Case[Any], known: Known, data: st.DataObject) -> None:
    for name in list(case.path_parameters or {}):
        if name in known.values and data.draw(st.booleans(), label=f"real {name}"):
            case.path_parameters[name] = data.draw(st.sampled_from(known.values[name]))
    if isinstance(case.body, dict):
        for name in list(case.body):
            if name in known.values and data.draw(st.booleans(), label=f"real {name}"):
                case.body[name] = data.draw(st.sampled_from(known.values[name]))


VALID_AUTH = admin_headers()["Authorization"]
# The admin token, none, or a wrong one: a valid token most of the time, so that parameters get checked.
_AUTH = [VALID_AUTH, VALID_AUTH, None, admin_headers("tra-wrong")["Authorization"]]


def _set_auth(case: Case[Any], value: str | None) -> None:
    headers = case.headers if case.headers is not None else {}
    headers.pop("Authorization", None)
    if value is not None:
        headers["Authorization"] = value
    case.headers = headers


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_no_server_error_and_every_answer_matches_the_description(
    server: ThreadedCoordinator,
    known: Known,
    schema: Any,
    session: requests.Session,
    method: str,
    path: str,
    mode: GenerationMode,
) -> None:
    operation = schema[path][method]

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    def fuzz(case: Case[Any], data: st.DataObject) -> None:
        if mode == GenerationMode.POSITIVE:
            _with_known_values(case, known, data)
            _set_auth(case, data.draw(st.sampled_from(_AUTH), label="auth"))
        elif case.headers and "Authorization" in case.headers:
            # A negative case without the header is about that; with it, about something else: let that
            # reach the handler.
            _set_auth(case, VALID_AUTH)
        response = case.call(base_url=server.url, session=session, timeout=60, allow_redirects=False)
        case.validate_response(response, checks=CHECKS)

    fuzz()
