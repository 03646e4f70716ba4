"""Admin and ingest endpoints (every operation the OpenAPI description secures with the admin bearer token)
refuse a missing or wrong token with 401 and do nothing; the token is checked by comparing SHA-256 digests
with `hmac.compare_digest`, and only the digest is stored. Client tokens (runner, registration, job) match
exactly or not at all."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from tests.coordinator.test_runner_api import Env
from tests.security.marks import SQLITE_ONLY
from tests.security.multipart import Part, multipart, text
from tests.support.protocol import admin_headers
from tests.support.servers import ADMIN_TOKEN
from tuberunner.coordinator.openapi import openapi_document
from tuberunner.coordinator.schema import registration_tokens, runners, settings, videos
from tuberunner.protocol.jobs import JobState

DIGEST = hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()
WRONG_AUTHORIZATIONS: dict[str, str | None] = {
    "none": None,
    "empty bearer": "Bearer",
    "other token": "Bearer tra-not-the-admin-token",
    "prefix": "Bearer " + ADMIN_TOKEN[:-1],
    "suffix": "Bearer " + ADMIN_TOKEN + "x",
    "other case": "Bearer " + ADMIN_TOKEN.upper(),
    "stored digest": "Bearer " + DIGEST,
    "no scheme": ADMIN_TOKEN,
    "basic": "Basic " + base64.b64encode(f"admin:{ADMIN_TOKEN}".encode()).decode(),
    "other scheme": "Token " + ADMIN_TOKEN,
}
ADMIN_OPERATIONS = sorted(
    (method.upper(), path)
    for path, item in openapi_document()["paths"].items()
    for method, op in item.items()
    if op.get("security") == [{"adminBearer": []}]
)


@dataclass
class Target:
    """One admin operation made concrete on real rows, and how to tell whether it acted."""

    method: str
    url: str
    kwargs: dict[str, Any]
    observe: Callable[[], Awaitable[object]]


async def _target(env: Env, method: str, path: str, result_files: dict[str, Path]) -> Target:
    runner_token = await env.register("victim")
    seeded = await env.seed(children=1)
    auth = await env.c.runners.by_token(runner_token)
    assert auth is not None
    async with env.c.db.read() as conn:
        reg_id = (await conn.execute(select(registration_tokens.c.id))).scalars().first()

    async def count(table: Any) -> int:
        async with env.c.db.read() as conn:
            return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())

    async def states() -> list[JobState | None]:
        found = [await env.c.jobs.get(uuid) for uuid in (seeded.parent, *seeded.children)]
        return [job.state if job else None for job in found]

    async def nothing() -> None:
        return None

    values = {
        "{id}": str(reg_id),
        "{runnerId}": str(auth.runner.id),
        "{jobUUID}": seeded.parent,
        "{videoId}": seeded.video_uuid,
    }
    if path.startswith("/api/v1/videos/live/"):
        values["{videoId}"] = (
            await env.c.live.create("a live", None, save_replay=False, permanent=False)
        ).video_uuid
    url = path
    for key, value in values.items():
        url = url.replace(key, value)
    kwargs: dict[str, Any] = {}
    observe: Callable[[], Awaitable[object]] = nothing
    if path == "/api/v1/runners/registration-tokens/generate" or "{id}" in path:
        observe = lambda: count(registration_tokens)  # noqa: E731
    elif "{runnerId}" in path:
        observe = lambda: count(runners)  # noqa: E731
    elif "{jobUUID}" in path:
        observe = states
    elif path.startswith("/api/v1/videos"):
        observe = lambda: count(videos)  # noqa: E731
    if (method, path) == ("POST", "/api/v1/videos"):
        body, headers = multipart(
            [
                Part(b"videofile", result_files["mp4"].read_bytes(), b"clip.mp4", b"video/mp4"),
                text("resolutions", "144"),
            ]
        )
        kwargs = {"content": body, "headers": headers}
    if (method, path) == ("POST", "/api/v1/videos/live"):
        kwargs = {"json": {"name": "a live"}}
    return Target(method, url, kwargs, observe)


def _headers(target: Target, authorization: str | None) -> dict[str, str]:
    headers = dict(target.kwargs.get("headers", {}))
    if authorization is not None:
        headers["Authorization"] = authorization
    return headers


@SQLITE_ONLY
@pytest.mark.parametrize(("method", "path"), ADMIN_OPERATIONS)
async def test_admin_operations_refuse_missing_and_wrong_tokens_and_do_nothing(
    env: Env, result_files: dict[str, Path], method: str, path: str
) -> None:
    target = await _target(env, method, path, result_files)
    before = await target.observe()
    for name, authorization in WRONG_AUTHORIZATIONS.items():
        r = await env.http.request(
            method,
            target.url,
            **{**target.kwargs, "headers": _headers(target, authorization)},
            params={"token": ADMIN_TOKEN, "access_token": ADMIN_TOKEN},
        )
        assert r.status_code == 401, (name, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert set(r.json()) >= {"status", "detail", "error"}
        assert "data" not in r.json()
        assert await target.observe() == before, name
    assert list(env.c.config.uploads_dir.iterdir()) == []
    # The same request with the token does act: the refusals above were the token's doing.
    r = await env.http.request(
        method, target.url, **{**target.kwargs, "headers": _headers(target, admin_headers()["Authorization"])}
    )
    assert 200 <= r.status_code < 300, r.text
    if method != "GET":
        assert await target.observe() != before


@SQLITE_ONLY
async def test_the_admin_token_is_checked_by_comparing_digests_in_constant_time(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[object, object]] = []
    real = hmac.compare_digest

    def recording(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    # `admin_auth` calls `hmac.compare_digest` through the module: the recording wrapper sees every call.
    monkeypatch.setattr(hmac, "compare_digest", recording)
    presented = ["tra-wrong", "x", "tra-" + "a" * 500, ADMIN_TOKEN[:-1], ADMIN_TOKEN]
    for token in presented:
        r = await env.http.get("/api/v1/runners", headers=admin_headers(token))
        assert r.status_code == (200 if token == ADMIN_TOKEN else 401)
    # One comparison per request, of two digests of the same length whatever the token's length: neither
    # the length nor a common prefix of the token can show in the time taken.
    assert calls == [(hashlib.sha256(t.encode()).hexdigest(), DIGEST) for t in presented]
    async with env.c.db.read() as conn:
        stored = [row.value for row in await conn.execute(select(settings.c.value))]
    assert DIGEST in stored
    assert ADMIN_TOKEN not in stored


async def test_client_tokens_match_exactly_or_not_at_all(env: Env) -> None:
    runner = await env.register("r")
    seeded = await env.seed(children=0)
    job_token = await env.accept(runner, seeded.parent)
    reg = await env.c.runners.create_registration_token()

    def variants(token: str) -> list[str]:
        return [token.upper(), token[:-1], token + "0", " " + token, token + " ", token.replace("-", "_")]

    for bad in variants(runner):
        r = await env.http.post("/api/v1/runners/jobs/request", json={"runnerToken": bad})
        assert (r.status_code, r.json().get("code")) == (404, "unknown_runner_token"), bad
    for bad in variants(job_token):
        r = await env.http.post(
            f"/api/v1/runners/jobs/{seeded.parent}/update", json={"runnerToken": runner, "jobToken": bad}
        )
        assert r.status_code == 404, bad
    for n, bad in enumerate(variants(reg)):
        r = await env.http.post("/api/v1/runners/register", json={"registrationToken": bad, "name": f"n{n}"})
        assert (r.status_code, r.json()["detail"]) == (404, "Registration token is invalid"), bad
    ok = await env.http.post(
        f"/api/v1/runners/jobs/{seeded.parent}/update", json={"runnerToken": runner, "jobToken": job_token}
    )
    assert ok.status_code == 204


@SQLITE_ONLY
async def test_admin_listings_never_show_runner_or_job_tokens(env: Env) -> None:
    runner = await env.register("r")
    seeded = await env.seed(children=0)
    job_token = await env.accept(runner, seeded.parent)
    for path in ("/api/v1/runners", "/api/v1/runners/jobs", f"/api/v1/videos/{seeded.video_uuid}"):
        r = await env.http.get(path, headers=admin_headers())
        assert r.status_code == 200
        assert runner not in r.text
        assert job_token not in r.text
        assert ADMIN_TOKEN not in r.text
