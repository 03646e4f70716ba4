"""Admin API (spec §4) against the real coordinator on loopback, on SQLite and PostgreSQL.

Checklist references (`shared/spec/protocol-test-cases.md`): A.1-8, B.15-19, C.22-29, F.44-46, F.49-50.
Jobs are seeded through the real JobService (`tests/support/protocol.py`), not by an upload.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import time
import uuid as uuidlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import httpx
import pytest
import socketio
from sqlalchemy import select

from tests.support.protocol import (
    RUNNERS,
    admin_headers,
    coordinator_of,
    register_runner,
    registration_token,
    seed_jobs,
    vod_job_specs,
)
from tests.support.servers import ADMIN_TOKEN, RunningCoordinator
from tuberunner.coordinator.config import CoordinatorConfig
from tuberunner.coordinator.models import iso
from tuberunner.coordinator.schema import jobs as jobs_table
from tuberunner.coordinator.schema import runners as runners_table
from tuberunner.protocol.errors import Message

PENDING = {"id": 1, "label": "Pending"}
PROCESSING = {"id": 2, "label": "Processing"}
WAITING = {"id": 5, "label": "Waiting for parent job to finish"}
CANCELLED = {"id": 6, "label": "Cancelled"}
PARENT_CANCELLED = {"id": 8, "label": "Parent job cancelled"}
HLS = "vod-hls-transcoding"
WEB = "vod-web-video-transcoding"


@pytest.fixture
def coordinator_config(coordinator_config: CoordinatorConfig) -> CoordinatorConfig:
    # No periodic lastContact flush during a test: what the admin list shows comes from the merge.
    return dataclasses.replace(coordinator_config, last_contact_flush_s=3600)


@pytest.fixture
async def client(coordinator: RunningCoordinator) -> AsyncIterator[httpx.AsyncClient]:
    """No credentials: runner calls and unauthenticated admin calls."""
    async with httpx.AsyncClient(base_url=coordinator.url, timeout=10) as c:
        yield c


@pytest.fixture
async def admin(coordinator: RunningCoordinator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=coordinator.url, headers=admin_headers(), timeout=10) as c:
        yield c


# ---------------------------------------------------------------- helpers


def problem(response: httpx.Response, status: int, detail: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    if detail is not None:
        assert body["detail"] == detail
    return body


def bad_params(response: httpx.Response, names: str) -> None:
    problem(response, 400, Message.INCORRECT_PARAMS + names)


def epoch(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def ms_floor(ts: float) -> float:
    """ISO times carry milliseconds; compare against a start time truncated the same way."""
    return math.floor(ts * 1000) / 1000


async def listing(admin: httpx.AsyncClient, path: str, query: str = "") -> dict[str, Any]:
    response = await admin.get(f"{RUNNERS}{path}" + (f"?{query}" if query else ""))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def job_list(admin: httpx.AsyncClient, query: str = "") -> dict[str, Any]:
    return await listing(admin, "/jobs", query)


async def job_of(admin: httpx.AsyncClient, job_uuid: str) -> dict[str, Any]:
    body = await job_list(admin, f"search={job_uuid}")
    assert body["total"] == 1
    job: dict[str, Any] = body["data"][0]
    return job


async def runner_id(admin: httpx.AsyncClient, name: str) -> int:
    body = await listing(admin, "", "count=100")
    return int(next(r["id"] for r in body["data"] if r["name"] == name))


async def accept(client: httpx.AsyncClient, runner_token: str, job_uuid: str) -> str:
    response = await client.post(f"{RUNNERS}/jobs/{job_uuid}/accept", json={"runnerToken": runner_token})
    assert response.status_code == 200, response.text
    job_token: str = response.json()["job"]["jobToken"]
    return job_token


async def update(
    client: httpx.AsyncClient, runner_token: str, job_uuid: str, job_token: str
) -> httpx.Response:
    return await client.post(
        f"{RUNNERS}/jobs/{job_uuid}/update",
        json={"runnerToken": runner_token, "jobToken": job_token, "progress": 53},
    )


async def available(client: httpx.AsyncClient, runner_token: str) -> list[str]:
    response = await client.post(f"{RUNNERS}/jobs/request", json={"runnerToken": runner_token})
    assert response.status_code == 200, response.text
    return [job["uuid"] for job in response.json()["availableJobs"]]


async def stored_job_token(running: RunningCoordinator, job_uuid: str) -> str | None:
    async with coordinator_of(running).db.read() as conn:
        token: str | None = (
            await conn.execute(select(jobs_table.c.processing_job_token).where(jobs_table.c.uuid == job_uuid))
        ).scalar_one()
    return token


@asynccontextmanager
async def runner_socket(url: str, runner_token: str) -> AsyncIterator[asyncio.Event]:
    """A connected `/runners` socket; yields an event set when the server closes it."""
    sio = socketio.AsyncClient(reconnection=False)
    closed = asyncio.Event()

    async def on_disconnect(*_: object) -> None:
        closed.set()

    sio.on("disconnect", on_disconnect, namespace="/runners")
    await sio.connect(
        url, namespaces=["/runners"], auth={"runnerToken": runner_token}, transports=["websocket"]
    )
    try:
        yield closed
    finally:
        await sio.disconnect()


# ---------------------------------------------------------------- authentication


def _endpoints(token_id: int, runner: int, job_uuid: str) -> dict[str, tuple[str, str]]:
    return {
        "generate": ("POST", f"{RUNNERS}/registration-tokens/generate"),
        "list-tokens": ("GET", f"{RUNNERS}/registration-tokens"),
        "delete-token": ("DELETE", f"{RUNNERS}/registration-tokens/{token_id}"),
        "list-runners": ("GET", RUNNERS),
        "delete-runner": ("DELETE", f"{RUNNERS}/{runner}"),
        "list-jobs": ("GET", f"{RUNNERS}/jobs"),
        "cancel-job": ("POST", f"{RUNNERS}/jobs/{job_uuid}/cancel"),
        "delete-job": ("DELETE", f"{RUNNERS}/jobs/{job_uuid}"),
    }


@pytest.mark.parametrize(
    "endpoint",
    [
        "generate",
        "list-tokens",
        "delete-token",
        "list-runners",
        "delete-runner",
        "list-jobs",
        "cancel-job",
        "delete-job",
    ],
)
async def test_admin_endpoint_answers_401_without_the_admin_token_and_changes_nothing(
    coordinator: RunningCoordinator, admin: httpx.AsyncClient, client: httpx.AsyncClient, endpoint: str
) -> None:
    job_uuids = await seed_jobs(coordinator)
    await register_runner(admin, "bystander")
    token_id = (await listing(admin, "/registration-tokens"))["data"][0]["id"]
    method, path = _endpoints(token_id, await runner_id(admin, "bystander"), job_uuids[0])[endpoint]
    for headers in (
        {},
        {"Authorization": "Bearer tra-wrong"},
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
        {"Authorization": ADMIN_TOKEN},
        {"Authorization": "Bearer"},
    ):
        problem(await client.request(method, path, headers=headers), 401)
    assert (await listing(admin, "/registration-tokens"))["total"] == 1
    assert (await listing(admin, ""))["total"] == 1
    listed = await job_list(admin, "count=100")
    assert listed["total"] == 10
    assert [j["state"] for j in listed["data"]].count(PENDING) == 1


async def test_authentication_is_checked_before_parameters(client: httpx.AsyncClient) -> None:
    problem(await client.delete(f"{RUNNERS}/hi"), 401)
    problem(await client.delete(f"{RUNNERS}/registration-tokens/abc"), 401)
    problem(await client.get(f"{RUNNERS}/jobs?count=1000&stateOneOf=42"), 401)
    problem(await client.post(f"{RUNNERS}/jobs/hello/cancel"), 401)


# ---------------------------------------------------------------- A. registration tokens


async def test_fresh_coordinator_lists_one_registration_token(admin: httpx.AsyncClient) -> None:
    body = await listing(admin, "/registration-tokens")
    assert body["total"] == 1
    (token,) = body["data"]
    assert set(token) == {"id", "registrationToken", "createdAt", "updatedAt", "registeredRunnersCount"}
    assert token["registrationToken"].startswith("ptrrt-")
    assert token["registeredRunnersCount"] == 0
    assert epoch(token["createdAt"]) <= time.time()


async def test_generate_answers_204_and_adds_a_token(admin: httpx.AsyncClient) -> None:
    for _ in range(2):
        response = await admin.post(f"{RUNNERS}/registration-tokens/generate")
        assert response.status_code == 204
        assert response.content == b""
    body = await listing(admin, "/registration-tokens")
    assert body["total"] == 3
    assert len({t["registrationToken"] for t in body["data"]}) == 3


async def test_registration_tokens_sort_by_creation_and_paginate(admin: httpx.AsyncClient) -> None:
    first = await registration_token(admin)
    for _ in range(2):
        assert (await admin.post(f"{RUNNERS}/registration-tokens/generate")).status_code == 204
    ascending = (await listing(admin, "/registration-tokens", "sort=createdAt"))["data"]
    assert [(t["createdAt"], t["id"]) for t in ascending] == sorted(
        (t["createdAt"], t["id"]) for t in ascending
    )
    assert ascending[0]["registrationToken"] == first
    default = (await listing(admin, "/registration-tokens"))["data"]
    assert [t["id"] for t in default] == [t["id"] for t in reversed(ascending)]
    page = await listing(admin, "/registration-tokens", "sort=-createdAt&start=2&count=1")
    assert page["total"] == 3
    assert [t["registrationToken"] for t in page["data"]] == [first]


async def test_registered_runners_are_counted_per_registration_token(admin: httpx.AsyncClient) -> None:
    assert (await admin.post(f"{RUNNERS}/registration-tokens/generate")).status_code == 204
    newest = (await listing(admin, "/registration-tokens"))["data"][0]
    await register_runner(admin, "runner 1", newest["registrationToken"])
    await register_runner(admin, "runner 2", newest["registrationToken"])
    counts = {
        t["registrationToken"]: t["registeredRunnersCount"]
        for t in (await listing(admin, "/registration-tokens"))["data"]
    }
    assert counts == {newest["registrationToken"]: 2, await registration_token(admin): 0}
    assert (await listing(admin, ""))["total"] == 2


async def test_deleting_a_registration_token_removes_its_runners_only(
    admin: httpx.AsyncClient, client: httpx.AsyncClient
) -> None:
    assert (await admin.post(f"{RUNNERS}/registration-tokens/generate")).status_code == 204
    doomed = (await listing(admin, "/registration-tokens"))["data"][0]
    gone = await register_runner(admin, "gone", doomed["registrationToken"])
    kept = await register_runner(admin, "kept")
    response = await admin.delete(f"{RUNNERS}/registration-tokens/{doomed['id']}")
    assert response.status_code == 204
    assert (await listing(admin, "/registration-tokens"))["total"] == 1
    assert [r["name"] for r in (await listing(admin, ""))["data"]] == ["kept"]
    lost = await client.post(f"{RUNNERS}/jobs/request", json={"runnerToken": gone})
    assert problem(lost, 404, Message.UNKNOWN_RUNNER_TOKEN)["code"] == "unknown_runner_token"
    assert await available(client, kept) == []


async def test_deleting_a_registration_token_requeues_jobs_and_closes_sockets_of_its_runners(
    coordinator: RunningCoordinator, admin: httpx.AsyncClient, client: httpx.AsyncClient
) -> None:
    job_uuids = await seed_jobs(coordinator)
    assert (await admin.post(f"{RUNNERS}/registration-tokens/generate")).status_code == 204
    doomed = (await listing(admin, "/registration-tokens"))["data"][0]
    runner_token = await register_runner(admin, "worker", doomed["registrationToken"])
    await accept(client, runner_token, job_uuids[0])
    async with runner_socket(coordinator.url, runner_token) as closed:
        assert (await admin.delete(f"{RUNNERS}/registration-tokens/{doomed['id']}")).status_code == 204
        await asyncio.wait_for(closed.wait(), 10)
    job = await job_of(admin, job_uuids[0])
    assert job["state"] == PENDING
    assert job["runner"] is None
    assert await stored_job_token(coordinator, job_uuids[0]) is None


async def test_deleting_an_unknown_or_malformed_registration_token_is_refused(
    admin: httpx.AsyncClient,
) -> None:
    for token_id in ("404", "0", "-3", "99999999999999999999"):
        response = await admin.delete(f"{RUNNERS}/registration-tokens/{token_id}")
        problem(response, 404, Message.REGISTRATION_TOKEN_NOT_FOUND)
    for token_id in ("abc", "1.5", "0x10"):
        bad_params(await admin.delete(f"{RUNNERS}/registration-tokens/{token_id}"), "id")
    assert (await listing(admin, "/registration-tokens"))["total"] == 1


# Query strings every listing must refuse with the names of the bad parameters, or accept.
_PAGINATION_CASES: list[tuple[str, str | None]] = [
    ("start=-1", "start"),
    ("start=abc", "start"),
    ("start=1.5", "start"),
    ("start=", "start"),
    ("start=%C2%B2", "start"),  # '²': str.isdigit() says yes, int() says no
    ("start=99999999999999999999", "start"),
    ("start=1&start=2", "start"),
    ("count=101", "count"),
    ("count=-1", "count"),
    ("count=1e2", "count"),
    ("count=abc", "count"),
    ("sort=name", "sort"),
    ("sort=--createdAt", "sort"),
    ("sort=", "sort"),
    ("sort=createdAt&sort=-createdAt", "sort"),
    ("start=-1&count=x&sort=y", "start, count, sort"),
    ("start=0&count=5&sort=-createdAt", None),
    ("start=9223372036854775807&count=100&sort=createdAt", None),
    ("count=0", None),
    ("unknown=1", None),
]


@pytest.mark.parametrize("path", ["/registration-tokens", "", "/jobs"])
async def test_listings_check_pagination_and_sort(admin: httpx.AsyncClient, path: str) -> None:
    for query, bad in _PAGINATION_CASES:
        response = await admin.get(f"{RUNNERS}{path}?{query}")
        if bad is None:
            assert response.status_code == 200, (query, response.text)
        else:
            bad_params(response, bad)


# ---------------------------------------------------------------- B. runners


async def test_runner_list_shows_registered_runners(admin: httpx.AsyncClient) -> None:
    started = ms_floor(time.time())
    await register_runner(admin, "runner 1", description="my super runner", version="1.2.3")
    await register_runner(admin, "runner 2")
    body = await listing(admin, "", "sort=createdAt")
    assert body["total"] == 2
    one, two = body["data"]
    assert set(one) == {"id", "name", "description", "ip", "lastContact", "createdAt", "updatedAt", "version"}
    assert (one["name"], one["description"], one["version"]) == ("runner 1", "my super runner", "1.2.3")
    assert (two["name"], two["description"], two["version"]) == ("runner 2", None, None)
    for runner in (one, two):
        assert runner["ip"] == "127.0.0.1"
        for field in ("createdAt", "updatedAt", "lastContact"):
            assert epoch(runner[field]) >= started


async def test_runner_list_paginates_newest_first_by_default(admin: httpx.AsyncClient) -> None:
    await register_runner(admin, "runner 1")
    await register_runner(admin, "runner 2")
    page = await listing(admin, "", "sort=-createdAt&start=1&count=1")
    assert page["total"] == 2
    assert [r["name"] for r in page["data"]] == ["runner 1"]
    assert [r["name"] for r in (await listing(admin, ""))["data"]] == ["runner 2", "runner 1"]


async def test_deleting_a_runner_removes_it_and_its_token(
    admin: httpx.AsyncClient, client: httpx.AsyncClient
) -> None:
    token = await register_runner(admin, "runner 1")
    await register_runner(admin, "runner 2")
    response = await admin.delete(f"{RUNNERS}/{await runner_id(admin, 'runner 1')}")
    assert response.status_code == 204
    assert [r["name"] for r in (await listing(admin, ""))["data"]] == ["runner 2"]
    lost = await client.post(f"{RUNNERS}/jobs/request", json={"runnerToken": token})
    assert problem(lost, 404, Message.UNKNOWN_RUNNER_TOKEN)["code"] == "unknown_runner_token"


async def test_deleting_a_runner_refuses_bad_and_unknown_ids(admin: httpx.AsyncClient) -> None:
    await register_runner(admin, "runner 1")
    bad_params(await admin.delete(f"{RUNNERS}/hi"), "runnerId")
    for unknown in ("404", "0", "-1", "4294967296"):
        problem(await admin.delete(f"{RUNNERS}/{unknown}"), 404, Message.RUNNER_NOT_FOUND)
    assert (await listing(admin, ""))["total"] == 1


async def test_deleting_a_runner_requeues_its_processing_job(
    coordinator: RunningCoordinator, admin: httpx.AsyncClient, client: httpx.AsyncClient
) -> None:
    job_uuids = await seed_jobs(coordinator)
    doomed = await register_runner(admin, "doomed")
    other = await register_runner(admin, "other")
    job_token = await accept(client, doomed, job_uuids[0])
    assert (await update(client, doomed, job_uuids[0], job_token)).status_code == 204
    assert (await admin.delete(f"{RUNNERS}/{await runner_id(admin, 'doomed')}")).status_code == 204
    job = await job_of(admin, job_uuids[0])
    assert job["state"] == PENDING
    assert job["runner"] is None
    assert job["progress"] is None
    assert "startedAt" not in job
    assert await stored_job_token(coordinator, job_uuids[0]) is None
    problem(await update(client, doomed, job_uuids[0], job_token), 404, Message.UNKNOWN_RUNNER_JOB)
    assert await available(client, other) == [job_uuids[0]]


async def test_deleting_a_runner_closes_its_socket(
    coordinator: RunningCoordinator, admin: httpx.AsyncClient
) -> None:
    token = await register_runner(admin, "connected")
    async with runner_socket(coordinator.url, token) as closed:
        assert (await admin.delete(f"{RUNNERS}/{await runner_id(admin, 'connected')}")).status_code == 204
        await asyncio.wait_for(closed.wait(), 10)
    refusals: list[object] = []
    sio = socketio.AsyncClient(reconnection=False)
    sio.on("connect_error", refusals.append, namespace="/runners")
    try:
        with pytest.raises(socketio.exceptions.ConnectionError):
            await sio.connect(
                coordinator.url,
                namespaces=["/runners"],
                auth={"runnerToken": token},
                transports=["websocket"],
            )
    finally:
        await sio.disconnect()
    assert refusals == [{"message": Message.SOCKET_TOKEN_UNKNOWN}]


async def test_runner_call_moves_last_contact_before_the_flush(
    coordinator: RunningCoordinator,
    admin: httpx.AsyncClient,
    client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token = await register_runner(admin, "runner 1")
    (registered,) = (await listing(admin, ""))["data"]
    later = epoch(registered["lastContact"]) + 60
    monkeypatch.setattr(coordinator_of(coordinator).runners, "clock", lambda: later)
    assert await available(client, token) == []
    (listed,) = (await listing(admin, ""))["data"]
    assert listed["lastContact"] == iso(later)
    assert listed["ip"] == "127.0.0.1"
    # Not written yet: the list merged the in-memory contact.
    async with coordinator_of(coordinator).db.read() as conn:
        stored = (await conn.execute(select(runners_table.c.last_contact))).scalar_one()
    assert iso(stored) == registered["lastContact"]
    await coordinator_of(coordinator).runners.flush_contacts()
    (flushed,) = (await listing(admin, ""))["data"]
    assert flushed["lastContact"] == iso(later)


async def test_runner_list_merges_only_newer_contacts(
    coordinator: RunningCoordinator, admin: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    await register_runner(admin, "runner 1")
    (registered,) = (await listing(admin, ""))["data"]
    registry = coordinator_of(coordinator).runners
    stored_at = epoch(registered["lastContact"])
    monkeypatch.setattr(registry, "clock", lambda: stored_at - 60)
    registry.touch(registered["id"], "203.0.113.9")
    (older,) = (await listing(admin, ""))["data"]
    assert (older["lastContact"], older["ip"]) == (registered["lastContact"], "127.0.0.1")
    monkeypatch.setattr(registry, "clock", lambda: stored_at + 60)
    registry.touch(registered["id"], "203.0.113.9")
    (newer,) = (await listing(admin, ""))["data"]
    assert (newer["lastContact"], newer["ip"]) == (iso(stored_at + 60), "203.0.113.9")


# ---------------------------------------------------------------- C. job listing


async def test_job_list_is_empty_without_jobs(admin: httpx.AsyncClient) -> None:
    assert await job_list(admin) == {"total": 0, "data": []}


async def test_seeded_720p_upload_lists_ten_jobs(
    coordinator: RunningCoordinator, admin: httpx.AsyncClient
) -> None:
    job_uuids = await seed_jobs(coordinator)
    body = await job_list(admin, "count=30")
    assert body["total"] == 10
    listed = {j["uuid"]: j for j in body["data"]}
    assert set(listed) == set(job_uuids)
    types = [j["type"] for j in listed.values()]
    assert (types.count(HLS), types.count(WEB)) == (5, 5)
    states = [j["state"] for j in listed.values()]
    assert (states.count(PENDING), states.count(WAITING)) == (1, 9)
    parent = listed[job_uuids[0]]
    assert parent["state"] == PENDING
    assert "parent" not in parent
    for job in listed.values():
        assert "startedAt" not in job
        assert "finishedAt" not in job
        assert "jobToken" not in job
        assert job["runner"] is None
        assert job["progress"] is None
        assert job["failures"] == 0
        assert job["privatePayload"]["videoUUID"]
        video_uuid = job["privatePayload"]["videoUUID"]
        assert job["payload"]["input"]["videoFileUrl"] == (
            f"{coordinator.url}{RUNNERS}/jobs/{job['uuid']}/files/videos/{video_uuid}/max-quality"
        )
    # Chains: HLS 720p and each lower web video hang off the parent; each lower HLS off its web video.
    for job in listed.values():
        if job is parent:
            continue
        ref = job["parent"]
        assert set(ref) == {"id", "uuid", "type", "state"}
        assert ref["state"] == listed[ref["uuid"]]["state"]
        assert ref["type"] == listed[ref["uuid"]]["type"]
        if job["type"] == WEB or job["payload"]["output"]["resolution"] == 720:
            assert ref["uuid"] == parent["uuid"]
        else:
            assert ref["type"] == WEB
            assert (
                listed[ref["uuid"]]["payload"]["output"]["resolution"]
                == job["payload"]["output"]["resolution"]
            )


async def test_job_list_orders_by_sort_then_id(
    coordinator: RunningCoordinator, admin: httpx.AsyncClient
) -> None:
    first = await seed_jobs(coordinator)
    second = await seed_jobs(coordinator, functools.partial(vod_job_specs, priority=150))
    body = await job_list(admin, "start=0&count=30")
    assert body["total"] == 20
    assert len(body["data"]) == 20
    # Default -createdAt; a graph's jobs share their creation time and follow in id order (adapted from
    # checklist C.24, where PeerTube's jobs each have their own creation time).
    assert [j["uuid"] for j in body["data"]] == second + first
    oldest_first = await job_list(admin, "sort=createdAt&start=6&count=1")
    assert oldest_first["total"] == 20
    assert [j["uuid"] for j in oldest_first["data"]] == [body["data"][16]["uuid"]] == [first[6]]
    by_priority = (await job_list(admin, "sort=-priority&count=100"))["data"]
    priorities = [j["priority"] for j in by_priority]
    assert priorities == sorted(priorities, reverse=True)
    assert priorities[0] == 150
    assert [j["uuid"] for j in by_priority] == second + first
    by_state = (await job_list(admin, "sort=state&count=100"))["data"]
    assert [j["uuid"] for j in by_state[:2]] == [first[0], second[0]]
    assert [j["state"]["id"] for j in by_state] == sorted(j["state"]["id"] for j in by_state)


async def test_job_list_sorts_by_progress_and_update_time(
    coordinator: RunningCoordinator, admin: httpx.AsyncClient, client: httpx.AsyncClient
) -> None:
    job_uuids = await seed_jobs(coordinator)
    token = await register_runner(admin, "worker")
    job_token = await accept(client, token, job_uuids[0])
    assert (await update(client, token, job_uuids[0], job_token)).status_code == 204
    by_progress = (await job_list(admin, "sort=-progress&count=100"))["data"]
    assert by_progress[0]["uuid"] == job_uuids[0]
    assert by_progress[0]["progress"] == 53
    assert all(j["progress"] is None for j in by_progress[1:])
    assert [j["uuid"] for j in by_progress[1:]] == job_uuids[1:]
    ascending = (await job_list(admin, "sort=progress&count=100"))["data"]
    assert ascending[-1]["uuid"] == job_uuids[0]
    assert (await job_list(admin, "sort=-updatedAt&count=1"))["data"][0]["uuid"] == job_uuids[0]


async def test_accepted_job_shows_its_runner_in_the_admin_list(
    coordinator: RunningCoordinator, admin: httpx.AsyncClient, client: httpx.AsyncClient
) -> None:
    job_uuids = await seed_jobs(coordinator)
    token = await register_runner(admin, "worker", description="the worker")
    accepted_at = ms_floor(time.time())
    job_token = await accept(client, token, job_uuids[0])
    assert (await update(client, token, job_uuids[0], job_token)).status_code == 204
    job = await job_of(admin, job_uuids[0])
    assert job["state"] == PROCESSING
    assert job["runner"] == {
        "id": await runner_id(admin, "worker"),
        "name": "worker",
        "description": "the worker",
    }
    assert job["progress"] == 53
    assert epoch(job["startedAt"]) >= accepted_at
    assert "jobToken" not in job
    assert job["privatePayload"]["isNewVideo"] is True
    child = await job_of(admin, job_uuids[1])
    assert child["parent"]["state"] == PROCESSING


async def test_job_search_matches_uuid_type_or_runner_name(
    coordinator: RunningCoordinator, admin: httpx.AsyncClient, client: httpx.AsyncClient
) -> None:
    job_uuids = await seed_jobs(coordinator)
    token = await register_runner(admin, "Zebra Runner")
    await accept(client, token, job_uuids[0])

    async def found(search: str) -> list[dict[str, Any]]:
        body = await job_list(admin, str(httpx.QueryParams({"search": search, "count": 100})))
        assert body["total"] == len(body["data"])
        data: list[dict[str, Any]] = body["data"]
        return data

    assert [j["uuid"] for j in await found(job_uuids[3])] == [job_uuids[3]]
    assert [j["uuid"] for j in await found(job_uuids[3].upper())] == [job_uuids[3]]
    assert await found(str(uuidlib.uuid4())) == []
    assert await found("toto") == []
    for text in ("hls", "HLS", "Hls-Trans"):
        matches = await found(text)
        assert len(matches) == 5
        assert all("hls" in j["type"] for j in matches)
    assert len(await found("vod-")) == 10
    for text in ("zebra", "ZEBRA r"):
        assert [j["uuid"] for j in await found(text)] == [job_uuids[0]]
    # LIKE wildcards are plain characters.
    assert await found("%") == []
    assert await found("_") == []
    assert await found("vod%hls") == []


async def test_job_list_filters_on_states(coordinator: RunningCoordinator, admin: httpx.AsyncClient) -> None:
    await seed_jobs(coordinator)
    expected = {
        "stateOneOf=[5]": 9,
        "stateOneOf=5": 9,
        "stateOneOf=%5B5%5D": 9,
        "stateOneOf=1&stateOneOf=5": 10,
        "stateOneOf[]=1": 1,
        "stateOneOf%5B%5D=1&stateOneOf%5B%5D=5": 10,
        "stateOneOf[0]=1&stateOneOf[1]=5": 10,
        "stateOneOf=[1, 5]": 10,
        "stateOneOf=[3]": 0,
        "stateOneOf=[]": 0,
        "start=0&count=5&sort=-createdAt&stateOneOf=[3]": 0,
    }
    for query, total in expected.items():
        body = await job_list(admin, query + "&count=100" if "count=" not in query else query)
        assert body["total"] == total, query
    waiting = (await job_list(admin, "stateOneOf=[5]&count=100"))["data"]
    assert {j["state"]["label"] for j in waiting} == {"Waiting for parent job to finish"}


async def test_job_list_refuses_unknown_states_and_types(admin: httpx.AsyncClient) -> None:
    for query in (
        "stateOneOf=42",
        "stateOneOf=[42]",
        "stateOneOf=0",
        "stateOneOf=[1,abc]",
        "stateOneOf=",
        "stateOneOf=[",
        "stateOneOf[]=x",
        "stateOneOf=-1",
    ):
        bad_params(await admin.get(f"{RUNNERS}/jobs?{query}"), "stateOneOf")
    for query in ("typeOneOf=hls", "typeOneOf=[vod-hls-transcoding,nope]", "typeOneOf="):
        bad_params(await admin.get(f"{RUNNERS}/jobs?{query}"), "typeOneOf")
    bad_params(
        await admin.get(f"{RUNNERS}/jobs?stateOneOf=42&typeOneOf=x&count=500"), "count, stateOneOf, typeOneOf"
    )


async def test_job_list_filters_on_types(coordinator: RunningCoordinator, admin: httpx.AsyncClient) -> None:
    await seed_jobs(coordinator)
    expected = {
        f"typeOneOf={HLS}": 5,
        f"typeOneOf={HLS}&typeOneOf={WEB}": 10,
        f"typeOneOf[]={WEB}": 5,
        f'typeOneOf=["{HLS}"]': 5,
        f"typeOneOf=[{HLS}, {WEB}]": 10,
        "typeOneOf=video-transcription": 0,
        f"typeOneOf={WEB}&stateOneOf=1": 1,
    }
    for query, total in expected.items():
        body = await job_list(admin, query + "&count=100")
        assert body["total"] == total, query
    hls = (await job_list(admin, f"typeOneOf={HLS}&count=100"))["data"]
    assert {j["type"] for j in hls} == {HLS}


async def test_job_list_answers_hostile_queries_without_failing(
    coordinator: RunningCoordinator, admin: httpx.AsyncClient
) -> None:
    await seed_jobs(coordinator)
    bad_params(await admin.get(f"{RUNNERS}/jobs?search=a%00b"), "search")
    bad_params(await admin.get(f"{RUNNERS}/jobs?search=a&search=b"), "search")
    for search in ("x" * 5000, "é€😀", "'; DROP TABLE jobs; --", "\\", "[5]"):
        body = await job_list(admin, str(httpx.QueryParams({"search": search})))
        assert body["total"] == 0, search
    assert (await job_list(admin, "search="))["total"] == 10
    assert (await job_list(admin))["total"] == 10


# ---------------------------------------------------------------- routing


async def test_wrong_methods_answer_405(coordinator: RunningCoordinator, admin: httpx.AsyncClient) -> None:
    job_uuid = (await seed_jobs(coordinator))[0]
    for method, path in (
        ("PUT", f"{RUNNERS}/jobs"),
        ("POST", f"{RUNNERS}/jobs"),
        ("GET", f"{RUNNERS}/jobs/request"),
        ("GET", f"{RUNNERS}/jobs/{job_uuid}"),
        ("GET", f"{RUNNERS}/jobs/{job_uuid}/cancel"),
        ("PATCH", f"{RUNNERS}/registration-tokens"),
        ("GET", f"{RUNNERS}/registration-tokens/generate"),
        ("POST", RUNNERS),
        ("GET", f"{RUNNERS}/1"),
    ):
        response = await admin.request(method, path)
        problem(response, 405)
        assert "allow" in response.headers, (method, path)
    assert (await job_list(admin))["total"] == 10


async def test_admin_paths_shadowing_runner_paths_answer_400(admin: httpx.AsyncClient) -> None:
    bad_params(await admin.delete(f"{RUNNERS}/jobs/request"), "jobUUID")
    bad_params(await admin.delete(f"{RUNNERS}/register"), "runnerId")
    bad_params(await admin.delete(f"{RUNNERS}/registration-tokens/generate"), "id")


# ---------------------------------------------------------------- F. cancel / delete


async def test_cancelling_a_pending_parent_cancels_its_descendants(
    coordinator: RunningCoordinator, admin: httpx.AsyncClient, client: httpx.AsyncClient
) -> None:
    job_uuids = await seed_jobs(coordinator)
    token = await register_runner(admin, "worker")
    assert await available(client, token) == [job_uuids[0]]
    assert (await admin.post(f"{RUNNERS}/jobs/{job_uuids[0]}/cancel")).status_code == 204
    listed = {j["uuid"]: j for j in (await job_list(admin, "count=100"))["data"]}
    assert listed[job_uuids[0]]["state"] == CANCELLED
    assert "finishedAt" in listed[job_uuids[0]]
    assert [listed[u]["state"] for u in job_uuids[1:]] == [PARENT_CANCELLED] * 9
    assert await available(client, token) == []


async def test_cancelled_job_is_gone_for_its_runner(
    coordinator: RunningCoordinator, admin: httpx.AsyncClient, client: httpx.AsyncClient
) -> None:
    job_uuids = await seed_jobs(coordinator)
    token = await register_runner(admin, "worker")
    job_token = await accept(client, token, job_uuids[0])
    assert (await admin.post(f"{RUNNERS}/jobs/{job_uuids[0]}/cancel")).status_code == 204
    aborted = await client.post(
        f"{RUNNERS}/jobs/{job_uuids[0]}/abort",
        json={"runnerToken": token, "jobToken": job_token, "reason": "bye"},
    )
    problem(aborted, 404, Message.UNKNOWN_RUNNER_JOB)
    problem(await update(client, token, job_uuids[0], job_token), 404, Message.UNKNOWN_RUNNER_JOB)
    assert await stored_job_token(coordinator, job_uuids[0]) is None


async def test_cancel_refuses_bad_unknown_and_finished_jobs(
    coordinator: RunningCoordinator, admin: httpx.AsyncClient
) -> None:
    job_uuids = await seed_jobs(coordinator)
    bad_params(await admin.post(f"{RUNNERS}/jobs/hello/cancel"), "jobUUID")
    problem(await admin.post(f"{RUNNERS}/jobs/{uuidlib.uuid4()}/cancel"), 404, Message.UNKNOWN_RUNNER_JOB)
    assert (await admin.post(f"{RUNNERS}/jobs/{job_uuids[0].upper()}/cancel")).status_code == 204
    problem(await admin.post(f"{RUNNERS}/jobs/{job_uuids[0]}/cancel"), 400, Message.CANNOT_CANCEL)
    problem(await admin.post(f"{RUNNERS}/jobs/{job_uuids[1]}/cancel"), 400, Message.CANNOT_CANCEL)


async def test_cancelling_a_waiting_job_cancels_only_its_chain(
    coordinator: RunningCoordinator, admin: httpx.AsyncClient
) -> None:
    job_uuids = await seed_jobs(coordinator)
    web_480, hls_480 = job_uuids[2], job_uuids[3]
    assert (await admin.post(f"{RUNNERS}/jobs/{web_480}/cancel")).status_code == 204
    states = {j["uuid"]: j["state"] for j in (await job_list(admin, "count=100"))["data"]}
    assert (states[web_480], states[hls_480]) == (CANCELLED, PARENT_CANCELLED)
    assert states[job_uuids[0]] == PENDING
    assert [s["id"] for s in states.values()].count(5) == 7


async def test_deleting_a_pending_parent_deletes_its_descendants(
    coordinator: RunningCoordinator, admin: httpx.AsyncClient, client: httpx.AsyncClient
) -> None:
    first = await seed_jobs(coordinator)
    second = await seed_jobs(coordinator)
    token = await register_runner(admin, "worker")
    assert (await admin.delete(f"{RUNNERS}/jobs/{first[0]}")).status_code == 204
    body = await job_list(admin, "count=100")
    assert body["total"] == 10
    assert [j["uuid"] for j in body["data"]] == second
    assert await available(client, token) == [second[0]]


async def test_deleting_a_middle_job_deletes_its_chain_only(
    coordinator: RunningCoordinator, admin: httpx.AsyncClient
) -> None:
    job_uuids = await seed_jobs(coordinator)
    assert (await admin.delete(f"{RUNNERS}/jobs/{job_uuids[2]}")).status_code == 204
    remaining = [j["uuid"] for j in (await job_list(admin, "count=100"))["data"]]
    assert remaining == [u for u in job_uuids if u not in (job_uuids[2], job_uuids[3])]


async def test_delete_refuses_bad_and_unknown_jobs(
    coordinator: RunningCoordinator, admin: httpx.AsyncClient
) -> None:
    job_uuids = await seed_jobs(coordinator)
    bad_params(await admin.delete(f"{RUNNERS}/jobs/hello"), "jobUUID")
    problem(await admin.delete(f"{RUNNERS}/jobs/{uuidlib.uuid4()}"), 404, Message.UNKNOWN_RUNNER_JOB)
    assert (await admin.delete(f"{RUNNERS}/jobs/{job_uuids[0]}")).status_code == 204
    problem(await admin.delete(f"{RUNNERS}/jobs/{job_uuids[0]}"), 404, Message.UNKNOWN_RUNNER_JOB)
    assert (await job_list(admin))["total"] == 0


async def test_deleting_a_processing_or_finished_job_works_and_releases_its_runner(
    coordinator: RunningCoordinator, admin: httpx.AsyncClient, client: httpx.AsyncClient
) -> None:
    first = await seed_jobs(coordinator)
    second = await seed_jobs(coordinator)
    token = await register_runner(admin, "worker")
    job_token = await accept(client, token, first[0])
    assert (await admin.delete(f"{RUNNERS}/jobs/{first[0]}")).status_code == 204
    problem(await update(client, token, first[0], job_token), 404, Message.UNKNOWN_RUNNER_JOB)
    assert (await admin.post(f"{RUNNERS}/jobs/{second[0]}/cancel")).status_code == 204
    assert (await admin.delete(f"{RUNNERS}/jobs/{second[0]}")).status_code == 204
    assert (await job_list(admin))["total"] == 0
