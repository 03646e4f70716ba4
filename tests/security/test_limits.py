"""Body and field limits hold: an oversized JSON body, text field or upload gets a 413 problem document and
leaves nothing behind (uploads/, results/, rows); too-long and unstorable text fields (NUL, lone surrogates,
NaN) get a 400 naming them, on SQLite and PostgreSQL; the job they were about does not move."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from tests.coordinator.test_runner_api import Env
from tests.security.multipart import Part, multipart, text
from tests.support.protocol import admin_headers
from tests.support.servers import ADMIN_TOKEN, serve_coordinator
from tuberunner.coordinator.config import CoordinatorConfig
from tuberunner.coordinator.schema import videos
from tuberunner.protocol.jobs import JobState, JobType

JOBS = "/api/v1/runners/jobs"


def _problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["status"] == status
    return body


async def _chunks(data: bytes, size: int = 16 * 1024) -> AsyncIterator[bytes]:
    """A body without Content-Length (chunked): the limit must hold while reading, not only up front."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.fixture
async def small(tmp_path: Path, result_files: dict[str, Path]) -> AsyncIterator[Env]:
    """A coordinator whose upload limit is exactly the size of the test's result video."""
    config = CoordinatorConfig(
        data_dir=tmp_path / "coordinator",
        admin_token=ADMIN_TOKEN,
        max_upload_bytes=result_files["mp4"].stat().st_size,
        max_json_body_bytes=64 * 1024,
    )
    async with (
        serve_coordinator(config) as running,
        httpx.AsyncClient(base_url=running.url, timeout=30) as http,
    ):
        yield Env(running, http, result_files)


def _leftovers(env: Env) -> list[Path]:
    uploads = list(env.c.config.uploads_dir.iterdir())
    results = env.c.storage.root / "results"
    kept = [p for p in results.rglob("*") if p.is_file()] if results.exists() else []
    return uploads + kept


# ---------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_json_body_over_the_limit_is_413(small: Env, chunked: bool) -> None:
    token = await small.register("r")
    raw = b'{"runnerToken": "' + token.encode() + b'", "pad": "' + b"x" * (64 * 1024) + b'"}'
    content: Any = _chunks(raw) if chunked else raw
    r = await small.http.post(
        f"{JOBS}/request", content=content, headers={"content-type": "application/json"}
    )
    assert "larger than 65536 bytes" in _problem(r, 413)["detail"]
    fits = await small.http.post(f"{JOBS}/request", json={"runnerToken": token, "pad": "x" * 60_000})
    assert fits.status_code == 200


async def test_an_urlencoded_body_over_the_limit_is_413(small: Env) -> None:
    r = await small.http.post(
        "/api/v1/runners/register", data={"registrationToken": "x" * (70 * 1024), "name": "n"}
    )
    _problem(r, 413)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_an_upload_over_the_limit_is_413_and_leaves_nothing(small: Env, chunked: bool) -> None:
    token = await small.register("r")
    seeded = await small.seed(children=0)
    job_token = await small.accept(token, seeded.parent)
    video = small.result_files["mp4"].read_bytes()
    parts = [text("runnerToken", token), text("jobToken", job_token)]
    body, headers = multipart([*parts, Part(b"payload[videoFile]", video + b"\0", b"out.mp4", b"video/mp4")])
    r = await small.http.post(
        f"{JOBS}/{seeded.parent}/success", content=_chunks(body) if chunked else body, headers=headers
    )
    assert "Upload is larger than" in _problem(r, 413)["detail"]
    assert _leftovers(small) == []
    assert await small.state(seeded.parent) == JobState.PROCESSING
    # Exactly the limit is fine: the limit is the limit, not one byte less.
    body, headers = multipart([*parts, Part(b"payload[videoFile]", video, b"out.mp4", b"video/mp4")])
    r = await small.http.post(f"{JOBS}/{seeded.parent}/success", content=body, headers=headers)
    assert r.status_code == 204, r.text
    assert await small.state(seeded.parent) == JobState.COMPLETED


async def test_the_upload_limit_counts_every_file_of_a_request(small: Env) -> None:
    token = await small.register("r")
    seeded = await small.seed(JobType.VOD_HLS, children=0)
    job_token = await small.accept(token, seeded.parent)
    half = small.result_files["mp4"].stat().st_size // 2 + 1
    body, headers = multipart(
        [
            text("runnerToken", token),
            text("jobToken", job_token),
            Part(b"payload[videoFile]", b"v" * half, b"a.mp4", b"video/mp4"),
            Part(
                b"payload[resolutionPlaylistFile]", b"p" * half, b"a.m3u8", b"application/vnd.apple.mpegurl"
            ),
        ]
    )
    r = await small.http.post(f"{JOBS}/{seeded.parent}/success", content=body, headers=headers)
    _problem(r, 413)
    assert _leftovers(small) == []


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_an_ingest_upload_over_the_limit_is_413_and_leaves_nothing(small: Env, chunked: bool) -> None:
    video = small.result_files["mp4"].read_bytes()
    body, headers = multipart([Part(b"videofile", video + b"\0" * 1024, b"clip.mp4", b"video/mp4")])
    r = await small.http.post(
        "/api/v1/videos", content=_chunks(body) if chunked else body, headers={**headers, **admin_headers()}
    )
    _problem(r, 413)
    assert _leftovers(small) == []
    async with small.c.db.read() as conn:
        assert (await conn.execute(select(func.count()).select_from(videos))).scalar_one() == 0
    folder = small.c.storage.root / "videos"
    assert not folder.exists() or list(folder.iterdir()) == []


async def test_a_declared_ingest_size_far_over_the_limit_is_refused_before_reading(small: Env) -> None:
    """A Content-Length of 10 GB is answered 413 from the headers alone: not one body byte is sent."""
    host, port = small.running.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"POST /api/v1/videos HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
            b"Authorization: " + admin_headers()["Authorization"].encode() + b"\r\n"
            b"Content-Type: multipart/form-data; boundary=x\r\n"
            b"Content-Length: " + str(10 * 1024**3).encode() + b"\r\n\r\n"
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    finally:
        writer.close()
        await writer.wait_closed()
    assert head.startswith(b"HTTP/1.1 413 "), head
    assert b"application/problem+json" in head
    assert _leftovers(small) == []


async def test_a_multipart_text_field_over_64_kb_is_413(small: Env) -> None:
    token = await small.register("r")
    seeded = await small.seed(children=0)
    job_token = await small.accept(token, seeded.parent)
    body, headers = multipart(
        [
            text("runnerToken", token),
            text("jobToken", job_token),
            text("payload[inputLanguage]", "x" * 70_000),
        ]
    )
    r = await small.http.post(f"{JOBS}/{seeded.parent}/success", content=body, headers=headers)
    assert "payload[inputLanguage]" in _problem(r, 413)["detail"]
    assert await small.state(seeded.parent) == JobState.PROCESSING


async def test_too_many_multipart_parts_are_refused(small: Env) -> None:
    body, headers = multipart([text(f"f{n}", "v") for n in range(300)])
    r = await small.http.post(f"{JOBS}/request", content=body, headers=headers)
    assert _problem(r, 400)["detail"] == "Too many multipart parts"


async def test_a_deeply_nested_json_body_is_400_not_a_crash(small: Env) -> None:
    raw = b'{"runnerToken": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    r = await small.http.post(f"{JOBS}/request", content=raw, headers={"content-type": "application/json"})
    _problem(r, 400)
    assert (await small.http.get("/api/v1/openapi.json")).status_code == 200


# ---------------------------------------------------------------------------------------------- fields


FIELD_LIMITS = [
    ("register", "registrationToken", 1000),
    ("register", "name", 100),
    ("register", "description", 1000),
    ("request", "runnerToken", 1000),
    ("abort", "reason", 5000),
    ("error", "message", 5000),
    ("update", "jobToken", 1000),
]


_PLACEHOLDER = "@@value@@"


async def _call(env: Env, endpoint: str, field: str, value: Any = None, *, raw: str | None = None) -> Any:
    """The endpoint called with valid fields but `field` = value (or the raw JSON text `raw`); returns
    the answer and the job it was about (None for register and request)."""
    token = await env.register(f"r-{uuid.uuid4().hex[:12]}")
    job: str | None = None
    if endpoint == "register":
        reg = await env.c.runners.create_registration_token()
        body: dict[str, Any] = {
            "registrationToken": reg,
            "name": f"n-{uuid.uuid4().hex[:12]}",
            "description": "d",
        }
        path = "/api/v1/runners/register"
    elif endpoint == "request":
        body, path = {"runnerToken": token}, f"{JOBS}/request"
    else:
        seeded = await env.seed(children=0)
        job = seeded.parent
        body = {"runnerToken": token, "jobToken": await env.accept(token, job), "reason": "r", "message": "m"}
        path = f"{JOBS}/{job}/{endpoint}"
    body[field] = _PLACEHOLDER if raw is not None else value
    content = json.dumps(body)
    if raw is not None:
        content = content.replace(f'"{_PLACEHOLDER}"', raw)
    r = await env.http.post(path, content=content.encode(), headers={"content-type": "application/json"})
    return r, job


@pytest.mark.parametrize(("endpoint", "field", "limit"), FIELD_LIMITS)
async def test_string_fields_longer_than_their_limit_are_400_and_the_limit_itself_is_fine(
    env: Env, endpoint: str, field: str, limit: int
) -> None:
    r, job = await _call(env, endpoint, field, "x" * (limit + 1))
    assert _problem(r, 400)["detail"] == f"Incorrect request parameters: {field}"
    if job is not None:
        assert await env.state(job) == JobState.PROCESSING
    if field not in ("registrationToken", "runnerToken", "jobToken"):  # those must also exist
        r, _ = await _call(env, endpoint, field, "x" * limit)
        assert r.status_code in (200, 204), r.text


UNSTORABLE = {
    "NUL": '"a\\u0000b"',
    "lone surrogate": '"a\\ud800b"',
    "NUL in a list": '["a\\u0000"]',
    "NUL in a key": '{"a\\u0000": "b"}',
}


# NUL in every field (one check in `bodies` covers them all; PostgreSQL is the one that refused it), the
# other kinds in two fields.
UNSTORABLE_CASES = [(e, f, "NUL") for e, f, _ in FIELD_LIMITS] + [
    (endpoint, field, value)
    for endpoint, field in (("register", "name"), ("request", "jobTypes"))
    for value in UNSTORABLE
    if value != "NUL"
]


@pytest.mark.parametrize(("endpoint", "field", "value"), UNSTORABLE_CASES)
async def test_text_no_database_can_store_is_400_naming_the_field(
    env: Env, endpoint: str, field: str, value: str
) -> None:
    """PostgreSQL refuses NUL and no UTF-8 holds a lone surrogate: these were 500s before."""
    r, job = await _call(env, endpoint, field, raw=UNSTORABLE[value])
    assert _problem(r, 400)["detail"] == f"Incorrect request parameters: {field}"
    if job is not None:
        assert await env.state(job) == JobState.PROCESSING


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
async def test_json_constants_that_are_not_json_are_400(env: Env, constant: str) -> None:
    token = await env.register("r")
    raw = '{"runnerToken": "%s", "version": %s}' % (token, constant)  # noqa: UP031
    r = await env.http.post(
        f"{JOBS}/request", content=raw.encode(), headers={"content-type": "application/json"}
    )
    assert "Malformed JSON body" in _problem(r, 400)["detail"]


@pytest.mark.parametrize(
    "value",
    ["bytes=" + "9" * 5000 + "-", "bytes=0-" + "9" * 5000, "bytes=-", "bytes=5-2", "bytes=99999999-"],
    ids=["huge start", "huge end", "empty", "reversed", "past the end"],
)
async def test_a_range_header_that_cannot_be_served_is_a_416_problem(env: Env, value: str) -> None:
    """A Range header is client-supplied text too: numbers past `int()`'s digit limit were a 500."""
    token = await env.register("r")
    seeded = await env.seed(children=0)
    job_token = await env.accept(token, seeded.parent)
    url = f"{JOBS}/{seeded.parent}/files/videos/{seeded.video_uuid}/max-quality"
    body = {"runnerToken": token, "jobToken": job_token}
    r = await env.http.post(url, json=body, headers={"Range": value})
    _problem(r, 416)
    assert r.headers["content-range"] == f"bytes */{len(seeded.source_bytes)}"
    served = await env.http.post(url, json=body, headers={"Range": "bytes=2-5"})
    assert (served.status_code, served.content) == (206, seeded.source_bytes[2:6])
