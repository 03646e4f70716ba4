"""Conformance of the runner-facing endpoints (spec §2–§3, §6) against the real coordinator on loopback.

Checklist numbers (#n) refer to shared/spec/protocol-test-cases.md.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.protocol import store_video_file
from tests.support.results import result_parts
from tests.support.servers import RunningCoordinator
from tuberunner.coordinator.models import JobSpec
from tuberunner.coordinator.problems import Forbidden, NotFound
from tuberunner.coordinator.runner_api import runner_input
from tuberunner.protocol.jobs import JOBS_TAKEN_BACK_EVENT, PUSHES_HEADER, JobState, JobType
from tuberunner.runner.client import InstanceClient
from tuberunner.runner.job import AcceptedJob

pytestmark = pytest.mark.asyncio

FILES = "/api/v1/runners/jobs/{job}/files/videos/{video}"


@dataclass
class Seeded:
    video_uuid: str
    video_id: int
    parent: str
    children: list[str]
    source_bytes: bytes


class Env:
    """A registered runner (or two) and a way to seed jobs, over the real HTTP API."""

    def __init__(
        self,
        running: RunningCoordinator,
        http: httpx.AsyncClient,
        result_files: dict[str, Path] | None = None,
    ) -> None:
        self.running = running
        self.http = http
        self.c = running.coordinator
        self.result_files = result_files or {}

    def results(self, job_type: JobType) -> dict[str, Any]:
        """Valid result parts of `job_type` (real tiny media made once per session)."""
        return result_parts(job_type, self.result_files)

    async def register(self, name: str) -> str:
        reg = await self.c.runners.create_registration_token()
        r = await self.http.post("/api/v1/runners/register", json={"registrationToken": reg, "name": name})
        assert r.status_code == 200, r.text
        return str(r.json()["runnerToken"])

    async def seed(
        self, job_type: JobType = JobType.VOD_WEB_VIDEO, *, children: int = 1, priority: int = 100
    ) -> Seeded:
        """A video with a source file and a parent job with a chain of `children` waiting jobs."""
        from sqlalchemy import insert

        from tuberunner.coordinator.schema import videos

        video_uuid = str(uuid.uuid4())
        async with self.c.db.write() as conn:
            result = await conn.execute(
                insert(videos).values(
                    uuid=video_uuid, name="v", state="processing", options={}, created_at=0.0, updated_at=0.0
                )
            )
            video_id = int(result.inserted_primary_key[0])  # type: ignore[index]
        data = bytes(range(256)) * 400
        await store_video_file(
            self.c, video_id, video_uuid, "source", "source.mp4", data, resolution=720, fps=25
        )
        parent = str(uuid.uuid4())
        specs = [
            JobSpec(
                parent, job_type, priority, payload_for(job_type, parent, video_uuid), private(video_uuid)
            )
        ]
        previous = parent
        child_uuids = []
        for _ in range(children):
            child = str(uuid.uuid4())
            specs.append(
                JobSpec(
                    child,
                    JobType.VOD_HLS,
                    priority,
                    payload_for(JobType.VOD_HLS, child, video_uuid),
                    private(video_uuid),
                    parent_uuid=previous,
                )
            )
            child_uuids.append(child)
            previous = child
        await self.c.jobs.create(video_id, specs)
        return Seeded(video_uuid, video_id, parent, child_uuids, data)

    async def accept(self, runner_token: str, job_uuid: str) -> str:
        r = await self.http.post(
            f"/api/v1/runners/jobs/{job_uuid}/accept", json={"runnerToken": runner_token}
        )
        assert r.status_code == 200, r.text
        return str(r.json()["job"]["jobToken"])

    async def state(self, job_uuid: str) -> JobState:
        job = await self.c.jobs.get(job_uuid)
        assert job is not None
        return job.state

    async def success(
        self, runner_token: str, job_uuid: str, job_token: str, files: dict[str, Any]
    ) -> httpx.Response:
        return await self.http.post(
            f"/api/v1/runners/jobs/{job_uuid}/success",
            data={"runnerToken": runner_token, "jobToken": job_token},
            files=files,
        )


def private(video_uuid: str) -> dict[str, Any]:
    return {"videoUUID": video_uuid, "isNewVideo": True}


def payload_for(job_type: JobType, job_uuid: str, video_uuid: str) -> dict[str, Any]:
    base = FILES.format(job=job_uuid, video=video_uuid)
    video_input = {"videoFileUrl": base + "/max-quality", "separatedAudioFileUrl": []}
    if job_type == JobType.VOD_WEB_VIDEO:
        return {"input": video_input, "output": {"resolution": 720, "fps": 25}}
    if job_type == JobType.VOD_HLS:
        return {"input": video_input, "output": {"resolution": 720, "fps": 25, "separatedAudio": False}}
    if job_type == JobType.VOD_AUDIO_MERGE:
        return {
            "input": {
                "audioFileUrl": base + "/max-quality",
                "previewFileUrl": base + "/previews/max-quality",
            },
            "output": {"resolution": 480, "fps": 25},
        }
    if job_type == JobType.STUDIO:
        return {
            "input": video_input,
            "tasks": [
                {"name": "cut", "options": {"start": 1, "end": 2}},
                {"name": "add-intro", "options": {"file": base + "/studio/task-files/intro-1.mp4"}},
            ],
            "output": {},
        }
    if job_type == JobType.TRANSCRIPTION:
        return {"input": {"videoFileUrl": base + "/max-quality/audio"}, "output": {}}
    if job_type == JobType.STORYBOARD:
        return {
            "input": {"videoFileUrl": base + "/max-quality"},
            "sprites": {
                "size": {"width": 192, "height": 108},
                "count": {"width": 2, "height": 2},
                "duration": 1,
            },
            "output": {},
        }
    raise AssertionError(job_type)


ALL_TYPES = [
    JobType.VOD_WEB_VIDEO,
    JobType.VOD_HLS,
    JobType.VOD_AUDIO_MERGE,
    JobType.STUDIO,
    JobType.TRANSCRIPTION,
    JobType.STORYBOARD,
]


@pytest.fixture
async def env(coordinator: RunningCoordinator, result_files: dict[str, Path]) -> Any:
    async with httpx.AsyncClient(base_url=coordinator.url, timeout=30) as http:
        yield Env(coordinator, http, result_files)


# ------------------------------------------------------------------ register / unregister (#9–#14, #20–#21)


@pytest.mark.parametrize(
    ("body", "bad"),
    [
        ({"registrationToken": "a" * 4000, "name": "n"}, "registrationToken"),
        ({"registrationToken": None, "name": "n"}, "registrationToken"),
        ({"registrationToken": "TOKEN", "name": ""}, "name"),
        ({"registrationToken": "TOKEN", "name": "n" * 200}, "name"),
        ({"registrationToken": "TOKEN", "name": "n", "description": ""}, "description"),
        ({"registrationToken": "TOKEN", "name": "n", "description": "d" * 5000}, "description"),
        ({"registrationToken": "TOKEN", "name": "n", "version": "not a version"}, "version"),
    ],
)
async def test_register_rejects_bad_fields_with_their_names(env: Env, body: dict[str, Any], bad: str) -> None:
    token = await env.c.runners.create_registration_token()
    body = {k: (token if v == "TOKEN" else v) for k, v in body.items()}
    r = await env.http.post("/api/v1/runners/register", json=body)
    assert r.status_code == 400
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["detail"] == f"Incorrect request parameters: {bad}"
    assert bad in r.json()["invalid-params"]


async def test_register_with_unknown_token_is_404(env: Env) -> None:
    r = await env.http.post("/api/v1/runners/register", json={"registrationToken": "aaa", "name": "n"})
    assert r.status_code == 404
    assert r.json()["detail"] == "Registration token is invalid"


async def test_register_answers_id_and_token_and_refuses_a_taken_name(env: Env) -> None:
    reg = await env.c.runners.create_registration_token()
    body = {"registrationToken": reg, "name": "runner 1", "description": "d", "version": "8.1.0"}
    r = await env.http.post("/api/v1/runners/register", json=body)
    assert r.status_code == 200
    assert isinstance(r.json()["id"], int)
    assert r.json()["runnerToken"].startswith("ptrt-")
    again = await env.http.post("/api/v1/runners/register", json=body)
    assert again.status_code == 400
    assert again.json()["detail"] == "This runner name already exists on this instance"


async def test_register_accepts_urlencoded_bodies(env: Env) -> None:
    reg = await env.c.runners.create_registration_token()
    r = await env.http.post(
        "/api/v1/runners/register", data={"registrationToken": reg, "name": "form runner"}
    )
    assert r.status_code == 200


async def test_unregister(env: Env) -> None:
    token = await env.register("gone")
    assert (await env.http.post("/api/v1/runners/unregister", json={"runnerToken": token})).status_code == 204
    r = await env.http.post("/api/v1/runners/jobs/request", json={"runnerToken": token})
    assert r.status_code == 404
    assert r.json()["code"] == "unknown_runner_token"
    for bad, status in ((None, 400), ("", 400), (str(uuid.uuid4()), 404)):
        r = await env.http.post("/api/v1/runners/unregister", json={"runnerToken": bad})
        assert r.status_code == status


async def test_unregister_requeues_the_runners_processing_jobs(env: Env) -> None:
    token = await env.register("leaving")
    seeded = await env.seed(children=0)
    await env.accept(token, seeded.parent)
    await env.http.post("/api/v1/runners/unregister", json={"runnerToken": token})
    job = await env.c.jobs.get(seeded.parent)
    assert job is not None
    assert job.state == JobState.PENDING
    assert job.processing_job_token is None


# ------------------------------------------------------------------ request (#30, #31, #61)


async def test_request_lists_pending_jobs_by_priority_without_private_payload(env: Env) -> None:
    token = await env.register("r")
    low = await env.seed(priority=200)
    high = await env.seed(priority=50)
    r = await env.http.post("/api/v1/runners/jobs/request", json={"runnerToken": token})
    assert r.status_code == 200
    jobs = r.json()["availableJobs"]
    assert [j["uuid"] for j in jobs] == [high.parent, low.parent]
    for job in jobs:
        assert set(job) == {"uuid", "type", "payload"}
        assert job["payload"]["input"]["videoFileUrl"].startswith(env.running.url + "/api/v1/runners/jobs/")


async def test_request_offers_at_most_ten_jobs(env: Env) -> None:
    token = await env.register("r")
    for _ in range(12):
        await env.seed(children=0)
    r = await env.http.post("/api/v1/runners/jobs/request", json={"runnerToken": token})
    assert len(r.json()["availableJobs"]) == 10


async def test_request_honours_job_types_beyond_the_first_ten(env: Env) -> None:
    token = await env.register("r")
    for _ in range(11):
        await env.seed(children=0, priority=10)
    wanted = await env.seed(JobType.TRANSCRIPTION, children=0, priority=500)
    r = await env.http.post(
        "/api/v1/runners/jobs/request", json={"runnerToken": token, "jobTypes": ["video-transcription"]}
    )
    assert [j["uuid"] for j in r.json()["availableJobs"]] == [wanted.parent]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"runnerToken": None}, 400),
        ({"runnerToken": ""}, 400),
        ({"runnerToken": 12}, 400),
        ({"runnerToken": "ptrt-unknown"}, 404),
        ({"runnerToken": "TOKEN", "jobTypes": "vod-hls-transcoding"}, 400),
        ({"runnerToken": "TOKEN", "jobTypes": [1, 2]}, 400),
    ],
)
async def test_request_rejects_bad_bodies(env: Env, body: dict[str, Any], status: int) -> None:
    token = await env.register("r")
    body = {k: (token if v == "TOKEN" else v) for k, v in body.items()}
    r = await env.http.post("/api/v1/runners/jobs/request", json=body)
    assert r.status_code == status
    if status == 404:
        assert r.json()["code"] == "unknown_runner_token"


async def test_request_stores_the_runner_version(env: Env) -> None:
    token = await env.register("r")
    await env.http.post("/api/v1/runners/jobs/request", json={"runnerToken": token, "version": "8.2.0"})
    auth = await env.c.runners.by_token(token)
    assert auth is not None
    assert auth.version == "8.2.0"


async def test_every_call_records_last_contact(env: Env) -> None:
    token = await env.register("r")
    auth = await env.c.runners.by_token(token)
    assert auth is not None
    env.c.runners._contacts.clear()
    await env.http.post("/api/v1/runners/jobs/request", json={"runnerToken": token})
    assert env.c.runners.contact_of(auth.runner.id) is not None


# ------------------------------------------------------------------ accept (#33, #62, races)


async def test_accept_answers_the_job_with_a_token(env: Env) -> None:
    token = await env.register("runner 1")
    seeded = await env.seed()
    r = await env.http.post(f"/api/v1/runners/jobs/{seeded.parent}/accept", json={"runnerToken": token})
    assert r.status_code == 200
    job = r.json()["job"]
    assert job["uuid"] == seeded.parent
    assert job["type"] == "vod-web-video-transcoding"
    assert job["state"] == {"id": 2, "label": "Processing"}
    assert job["runner"]["name"] == "runner 1"
    assert job["progress"] is None
    assert job["failures"] == 0
    assert "startedAt" in job
    assert "finishedAt" not in job
    assert "privatePayload" not in job
    assert job["jobToken"].startswith("ptrjt-")
    assert await env.state(seeded.children[0]) == JobState.WAITING_FOR_PARENT_JOB


async def test_accept_errors_in_peertube_order(env: Env) -> None:
    token = await env.register("r")
    seeded = await env.seed()
    cases = [
        ("not-a-uuid", {"runnerToken": token}, 400, None),
        (str(uuid.uuid4()), {"runnerToken": token}, 404, None),
        (seeded.children[0], {"runnerToken": token}, 400, "runner_job_not_in_pending_state"),
        (seeded.parent, {"runnerToken": None}, 400, None),
        (seeded.parent, {"runnerToken": ""}, 400, None),
        (seeded.parent, {"runnerToken": "ptrt-unknown"}, 404, "unknown_runner_token"),
    ]
    for job_uuid, body, status, code in cases:
        r = await env.http.post(f"/api/v1/runners/jobs/{job_uuid}/accept", json=body)
        assert (r.status_code, r.json().get("code")) == (status, code), (job_uuid, body, r.text)


async def test_accepting_a_cancelled_job_is_400(env: Env) -> None:
    token = await env.register("r")
    seeded = await env.seed(children=0)
    job = await env.c.jobs.get(seeded.parent)
    assert job is not None
    await env.c.jobs.cancel(job)
    r = await env.http.post(f"/api/v1/runners/jobs/{seeded.parent}/accept", json={"runnerToken": token})
    assert r.status_code == 400


async def test_fifty_concurrent_accepts_have_exactly_one_winner(env: Env) -> None:
    tokens = [await env.register(f"racer {i}") for i in range(10)]
    seeded = await env.seed(children=0)

    async def attempt(i: int) -> httpx.Response:
        return await env.http.post(
            f"/api/v1/runners/jobs/{seeded.parent}/accept", json={"runnerToken": tokens[i % len(tokens)]}
        )

    answers = await asyncio.gather(*(attempt(i) for i in range(50)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses.count(200) == 1
    losers = [a for a in answers if a.status_code != 200]
    assert all(a.status_code == 409 for a in losers)
    assert all(a.json()["code"] == "runner_job_not_in_pending_state" for a in losers)


# ------------------------------------------------------------------ update (#34, #64)


async def test_update_stores_progress_and_renews_the_lease(env: Env) -> None:
    token = await env.register("r")
    seeded = await env.seed()
    jt = await env.accept(token, seeded.parent)
    before = await env.c.jobs.get(seeded.parent)
    r = await env.http.post(
        f"/api/v1/runners/jobs/{seeded.parent}/update",
        data={"runnerToken": token, "jobToken": jt, "progress": "53"},
    )
    assert r.status_code == 204
    after = await env.c.jobs.get(seeded.parent)
    assert after is not None
    assert before is not None
    assert after.progress == 53
    assert after.lease_expires_at is not None
    assert before.lease_expires_at is not None
    assert after.lease_expires_at >= before.lease_expires_at


@pytest.mark.parametrize("job_type", ALL_TYPES)
async def test_the_multipart_update_of_our_runner_lands_for_every_job_type(
    env: Env, job_type: JobType
) -> None:
    token = await env.register("r")
    seeded = await env.seed(job_type, children=0)
    jt = await env.accept(token, seeded.parent)
    job = AcceptedJob(seeded.parent, job_type, {}, jt, env.running.url)
    async with InstanceClient(env.running.url, token) as client:
        await client.update(job, 61)  # multipart text fields, no payload part: 204 or it raises
        await client.update(job)
    stored = await env.c.jobs.get(seeded.parent)
    assert stored is not None
    assert (stored.state, stored.progress) == (JobState.PROCESSING, 61)


async def test_request_and_accept_answers_say_that_taken_back_jobs_are_pushed_unless_they_are_not(
    env: Env,
) -> None:
    token = await env.register("r")
    seeded = await env.seed(children=0)
    request = await env.http.post("/api/v1/runners/jobs/request", json={"runnerToken": token})
    assert request.headers[PUSHES_HEADER] == JOBS_TAKEN_BACK_EVENT
    accept = await env.http.post(f"/api/v1/runners/jobs/{seeded.parent}/accept", json={"runnerToken": token})
    assert accept.headers[PUSHES_HEADER] == JOBS_TAKEN_BACK_EVENT
    env.c.jobs.on_taken_back = None  # nothing sends the event any more: nothing says it would
    request = await env.http.post("/api/v1/runners/jobs/request", json={"runnerToken": token})
    assert PUSHES_HEADER not in request.headers


@pytest.mark.parametrize("progress", [101, -1, "53.5", 53.5, None, "abc", True])
async def test_update_rejects_bad_progress(env: Env, progress: Any) -> None:
    token = await env.register("r")
    seeded = await env.seed()
    jt = await env.accept(token, seeded.parent)
    r = await env.http.post(
        f"/api/v1/runners/jobs/{seeded.parent}/update",
        json={"runnerToken": token, "jobToken": jt, "progress": progress},
    )
    assert r.status_code == 400
    assert r.json()["detail"] == "Incorrect request parameters: progress"


async def test_update_with_a_payload_for_a_vod_job_is_400_in_json_and_multipart(env: Env) -> None:
    token = await env.register("r")
    seeded = await env.seed()
    jt = await env.accept(token, seeded.parent)
    url = f"/api/v1/runners/jobs/{seeded.parent}/update"
    as_json = await env.http.post(url, json={"runnerToken": token, "jobToken": jt, "payload": {"type": "x"}})
    assert as_json.status_code == 400
    assert as_json.json()["detail"] == "Payload is invalid"
    with_file = await env.http.post(
        url,
        data={"runnerToken": token, "jobToken": jt},
        files={"payload[videoChunkFile]": ("a.ts", b"x", "video/mp2t")},
    )
    assert with_file.status_code == 400


async def test_an_unexpected_file_part_is_400_and_leaves_no_file(env: Env) -> None:
    token = await env.register("r")
    seeded = await env.seed()
    jt = await env.accept(token, seeded.parent)
    r = await env.success(token, seeded.parent, jt, {"payload[hello]": ("a.mp4", b"x" * 1000, "video/mp4")})
    assert r.status_code == 400
    assert await env.state(seeded.parent) == JobState.PROCESSING
    assert list(env.running.config.uploads_dir.iterdir()) == []


async def test_update_of_a_completed_job_is_a_no_op(env: Env) -> None:
    token = await env.register("r")
    seeded = await env.seed()
    jt = await env.accept(token, seeded.parent)
    assert (
        await env.success(token, seeded.parent, jt, env.results(JobType.VOD_WEB_VIDEO))
    ).status_code == 204
    r = await env.http.post(
        f"/api/v1/runners/jobs/{seeded.parent}/update",
        json={"runnerToken": token, "jobToken": jt, "progress": 5},
    )
    assert r.status_code == 204
    job = await env.c.jobs.get(seeded.parent)
    assert job is not None
    assert job.state == JobState.COMPLETED
    assert job.progress is None


# ------------------------------------------------------------------ abort (#35, #63)


async def test_abort_requeues_without_counting_a_failure(env: Env) -> None:
    token = await env.register("r")
    seeded = await env.seed()
    jt = await env.accept(token, seeded.parent)
    r = await env.http.post(
        f"/api/v1/runners/jobs/{seeded.parent}/abort",
        json={"runnerToken": token, "jobToken": jt, "reason": "stop"},
    )
    assert r.status_code == 204
    job = await env.c.jobs.get(seeded.parent)
    assert job is not None
    assert (job.state, job.failures, job.processing_job_token, job.progress) == (
        JobState.PENDING,
        0,
        None,
        None,
    )
    again = await env.http.post(
        f"/api/v1/runners/jobs/{seeded.parent}/abort",
        json={"runnerToken": token, "jobToken": jt, "reason": "x"},
    )
    assert again.status_code == 404


@pytest.mark.parametrize("reason", [None, "", "r" * 30000])
async def test_abort_needs_a_reason(env: Env, reason: Any) -> None:
    token = await env.register("r")
    seeded = await env.seed()
    jt = await env.accept(token, seeded.parent)
    r = await env.http.post(
        f"/api/v1/runners/jobs/{seeded.parent}/abort",
        json={"runnerToken": token, "jobToken": jt, "reason": reason},
    )
    assert r.status_code == 400
    assert r.json()["detail"] == "Incorrect request parameters: reason"
    assert await env.state(seeded.parent) == JobState.PROCESSING


# ------------------------------------------------------------------ error (#38–#40, #66)


async def test_five_errors_make_the_job_errored_with_the_last_message(env: Env) -> None:
    token = await env.register("r")
    seeded = await env.seed(children=2)
    for i in range(5):
        jt = await env.accept(token, seeded.parent)
        r = await env.http.post(
            f"/api/v1/runners/jobs/{seeded.parent}/error",
            json={"runnerToken": token, "jobToken": jt, "message": f"Error {i}"},
        )
        assert r.status_code == 204
        job = await env.c.jobs.get(seeded.parent)
        assert job is not None
        assert job.failures == i + 1
        if i < 4:
            assert (job.state, job.error, job.finished_at) == (JobState.PENDING, None, None)
    assert job.state == JobState.ERRORED
    assert job.error == "Error 4"
    assert job.finished_at is not None
    for child in seeded.children:
        assert await env.state(child) == JobState.PARENT_ERRORED


@pytest.mark.parametrize("message", [None, "", "m" * 6000])
async def test_error_needs_a_message(env: Env, message: Any) -> None:
    token = await env.register("r")
    seeded = await env.seed()
    jt = await env.accept(token, seeded.parent)
    r = await env.http.post(
        f"/api/v1/runners/jobs/{seeded.parent}/error",
        json={"runnerToken": token, "jobToken": jt, "message": message},
    )
    assert r.status_code == 400


# ------------------------------------------------------------------ success (#36, #37, #67, #68)


@pytest.mark.parametrize("job_type", ALL_TYPES)
async def test_success_completes_each_type_and_releases_children(env: Env, job_type: JobType) -> None:
    token = await env.register("r")
    seeded = await env.seed(job_type)
    jt = await env.accept(token, seeded.parent)
    r = await env.success(token, seeded.parent, jt, env.results(job_type))
    assert r.status_code == 204
    job = await env.c.jobs.get(seeded.parent)
    assert job is not None
    assert job.state == JobState.COMPLETED
    assert job.finished_at is not None
    assert await env.state(seeded.children[0]) == JobState.PENDING
    listed = await env.http.post("/api/v1/runners/jobs/request", json={"runnerToken": token})
    assert [j["uuid"] for j in listed.json()["availableJobs"]] == [seeded.children[0]]


async def test_a_retried_success_is_answered_204_and_completes_once(env: Env) -> None:
    token = await env.register("r")
    seeded = await env.seed(children=1)
    jt = await env.accept(token, seeded.parent)
    files = env.results(JobType.VOD_WEB_VIDEO)
    first, second = await asyncio.gather(
        env.success(token, seeded.parent, jt, files), env.success(token, seeded.parent, jt, files)
    )
    assert (first.status_code, second.status_code) == (204, 204)
    third = await env.success(token, seeded.parent, jt, files)
    assert third.status_code == 204
    job = await env.c.jobs.get(seeded.parent)
    assert job is not None
    assert job.state == JobState.COMPLETED
    # The child was released once: it is pending, not re-created or touched twice.
    assert await env.state(seeded.children[0]) == JobState.PENDING
    # Error and abort after completion are refused with the code.
    r = await env.http.post(
        f"/api/v1/runners/jobs/{seeded.parent}/error",
        json={"runnerToken": token, "jobToken": jt, "message": "late"},
    )
    assert (r.status_code, r.json()["code"]) == (400, "runner_job_not_in_processing_state")


@pytest.mark.parametrize(
    ("job_type", "files"),
    [
        (JobType.VOD_WEB_VIDEO, {}),
        (JobType.VOD_HLS, {"payload[videoFile]": ("a.mp4", b"x", "video/mp4")}),
        (JobType.VOD_AUDIO_MERGE, {"payload[vttFile]": ("a.vtt", b"x", "text/vtt")}),
        (JobType.STUDIO, {}),
    ],
)
async def test_success_with_the_wrong_files_is_payload_invalid(
    env: Env, job_type: JobType, files: dict[str, Any]
) -> None:
    token = await env.register("r")
    seeded = await env.seed(job_type)
    jt = await env.accept(token, seeded.parent)
    data = {"runnerToken": token, "jobToken": jt, "payload[hello]": "world"}
    r = await env.http.post(f"/api/v1/runners/jobs/{seeded.parent}/success", data=data, files=files or None)
    assert r.status_code == 400
    assert r.json()["detail"] == "Payload is invalid"
    assert await env.state(seeded.parent) == JobState.PROCESSING
    assert list(env.running.config.uploads_dir.iterdir()) == []


async def test_transcription_success_keeps_the_language(env: Env) -> None:
    token = await env.register("r")
    seeded = await env.seed(JobType.TRANSCRIPTION, children=0)
    jt = await env.accept(token, seeded.parent)
    r = await env.http.post(
        f"/api/v1/runners/jobs/{seeded.parent}/success",
        data={"runnerToken": token, "jobToken": jt, "payload[inputLanguage]": "ar"},
        files=env.results(JobType.TRANSCRIPTION),
    )
    assert r.status_code == 204
    job = await env.c.jobs.get(seeded.parent)
    assert job is not None
    assert job.result is not None
    assert job.result["fields"] == {"inputLanguage": "ar"}


# ------------------------------------------------------------------ common token checks (#53–#60)

ENDPOINTS = ["abort", "update", "error", "success", "files/max-quality", "files/previews/max-quality"]


def _call(endpoint: str, job_uuid: str, video_uuid: str) -> str:
    if endpoint.startswith("files/"):
        return FILES.format(job=job_uuid, video=video_uuid) + endpoint[len("files") :]
    return f"/api/v1/runners/jobs/{job_uuid}/{endpoint}"


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_job_of_runner_checks(env: Env, endpoint: str) -> None:
    mine = await env.register("mine")
    other = await env.register("other")
    a = await env.seed(children=0)
    b = await env.seed(children=0)
    jt_a = await env.accept(mine, a.parent)
    jt_b = await env.accept(other, b.parent)
    extra = {"reason": "r", "message": "m", "progress": 1}
    cases = [
        ("a", mine, jt_a, 400),
        (str(uuid.uuid4()), mine, jt_a, 404),
        (a.parent, "", jt_a, 400),
        (a.parent, "ptrt-" + str(uuid.uuid4()), jt_a, 404),
        (a.parent, mine, "", 400),
        (a.parent, mine, "ptrjt-" + str(uuid.uuid4()), 404),
        (a.parent, other, jt_a, 404),
        (b.parent, mine, jt_b, 404),
        (a.parent, mine, jt_b, 404),
    ]
    for job_uuid, runner_token, job_token, status in cases:
        r = await env.http.post(
            _call(endpoint, job_uuid, a.video_uuid),
            json={"runnerToken": runner_token, "jobToken": job_token, **extra},
        )
        assert r.status_code == status, (endpoint, job_uuid, runner_token, job_token, r.text)
        if status == 404:
            assert r.json()["detail"] == "Unknown runner job"


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_calls_with_the_token_of_a_cancelled_job_are_404(env: Env, endpoint: str) -> None:
    token = await env.register("r")
    seeded = await env.seed(children=0)
    jt = await env.accept(token, seeded.parent)
    job = await env.c.jobs.get(seeded.parent)
    assert job is not None
    await env.c.jobs.cancel(job)
    r = await env.http.post(
        _call(endpoint, seeded.parent, seeded.video_uuid),
        json={"runnerToken": token, "jobToken": jt, "reason": "r", "message": "m"},
    )
    assert r.status_code == 404


# ------------------------------------------------------------------ input files (#69–#71, §3.9)


async def test_input_download_returns_the_source_bytes_and_honours_range(env: Env) -> None:
    token = await env.register("r")
    seeded = await env.seed()
    jt = await env.accept(token, seeded.parent)
    url = FILES.format(job=seeded.parent, video=seeded.video_uuid) + "/max-quality"
    full = await env.http.post(url, json={"runnerToken": token, "jobToken": jt})
    assert full.status_code == 200
    assert full.content == seeded.source_bytes
    assert full.headers["accept-ranges"] == "bytes"
    part = await env.http.post(
        url, json={"runnerToken": token, "jobToken": jt}, headers={"Range": "bytes=1000-"}
    )
    assert part.status_code == 206
    assert part.content == seeded.source_bytes[1000:]
    assert (
        part.headers["content-range"]
        == f"bytes 1000-{len(seeded.source_bytes) - 1}/{len(seeded.source_bytes)}"
    )
    beyond = await env.http.post(
        url,
        json={"runnerToken": token, "jobToken": jt},
        headers={"Range": f"bytes={len(seeded.source_bytes)}-"},
    )
    assert beyond.status_code == 416


async def test_a_runner_of_this_process_gets_an_input_file_after_the_download_checks(env: Env) -> None:
    # The one-shot mode's runners read inputs where they lie (`runner_input`), with the same answers
    # as the download endpoint: the job's tokens first, then the video, then the file.
    token = await env.register("r")
    seeded = await env.seed()
    other = await env.seed()
    jt = await env.accept(token, seeded.parent)
    url = env.running.url + FILES.format(job=seeded.parent, video=seeded.video_uuid) + "/max-quality"

    file = await runner_input(env.c, url, token, jt)

    async with env.c.storage.local_file(file.path) as path:
        assert path.read_bytes() == seeded.source_bytes
    with pytest.raises(NotFound, match="Unknown runner job"):
        await runner_input(env.c, url, token, "ptrjt-not-this-one")
    with pytest.raises(NotFound, match="Unknown runner job"):
        await runner_input(env.c, url, await env.register("another"), jt)
    with pytest.raises(Forbidden):
        await runner_input(env.c, url.replace(seeded.video_uuid, other.video_uuid), token, jt)
    with pytest.raises(NotFound, match="Video not found"):
        await runner_input(env.c, url.replace("/files/videos/", "/not-files/"), token, jt)
    waiting = FILES.format(job=seeded.children[0], video=seeded.video_uuid) + "/max-quality"
    with pytest.raises(NotFound, match="Unknown runner job"):
        await runner_input(env.c, waiting, token, jt)


def short_uuid(value: str) -> str:
    """The 22-character short UUID PeerTube accepts for a video (`short-uuid`'s flickr base 58)."""
    alphabet = "123456789abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ"
    number, digits = uuid.UUID(value).int, ""
    while number:
        number, digit = divmod(number, len(alphabet))
        digits = alphabet[digit] + digits
    return digits.rjust(22, alphabet[0])


async def test_input_download_video_checks(env: Env) -> None:
    token = await env.register("r")
    seeded = await env.seed()
    other = await env.seed()
    jt = await env.accept(token, seeded.parent)
    body = {"runnerToken": token, "jobToken": jt}
    base = f"/api/v1/runners/jobs/{seeded.parent}/files/videos"
    # PeerTube's `isValidVideoIdParam`: an integer id, a UUID v4, or a short UUID; anything else is 400.
    for malformed in ("a", "a%20b", "1.5", str(uuid.uuid1()), "0" * 22, seeded.video_uuid[:-1]):
        bad = await env.http.post(f"{base}/{malformed}/max-quality", json=body)
        assert bad.status_code == 400, malformed
        assert bad.json()["detail"] == "Incorrect request parameters: videoId"
    for same_video in (str(seeded.video_id), seeded.video_uuid.upper(), short_uuid(seeded.video_uuid)):
        found = await env.http.post(f"{base}/{same_video}/max-quality", json=body)
        assert (found.status_code, found.content) == (200, seeded.source_bytes), same_video
    for unknown in (str(uuid.uuid4()), "999999", "-3", short_uuid(str(uuid.uuid4()))):
        missing = await env.http.post(f"{base}/{unknown}/max-quality", json=body)
        assert (missing.status_code, missing.json()["detail"]) == (404, "Video not found"), unknown
    assert (await env.http.post(f"{base}/{other.video_uuid}/max-quality", json=body)).status_code == 403
    get = await env.http.get(f"{base}/{seeded.video_uuid}/max-quality")
    assert 400 <= get.status_code < 500


async def test_input_download_checks_the_job_before_the_video_id(env: Env) -> None:
    """Spec §3.9: the job-of-runner checks come first, then the `videoId` parameter."""
    token = await env.register("r")
    seeded = await env.seed()
    jt = await env.accept(token, seeded.parent)
    base = f"/api/v1/runners/jobs/{seeded.parent}/files/videos/a/max-quality"
    wrong_token = await env.http.post(base, json={"runnerToken": token, "jobToken": "ptrjt-not-this-one"})
    assert (wrong_token.status_code, wrong_token.json()["detail"]) == (404, "Unknown runner job")
    no_token = await env.http.post(base, json={"runnerToken": token})
    assert (no_token.status_code, no_token.json()["detail"]) == (
        400,
        "Incorrect request parameters: jobToken",
    )
    right = await env.http.post(base, json={"runnerToken": token, "jobToken": jt})
    assert (right.status_code, right.json()["detail"]) == (400, "Incorrect request parameters: videoId")


async def test_studio_task_files_are_checked_by_name(env: Env) -> None:
    token = await env.register("r")
    seeded = await env.seed(JobType.STUDIO, children=0)
    await store_video_file(
        env.c, seeded.video_id, seeded.video_uuid, "task-file", "intro-1.mp4", b"intro bytes"
    )
    jt = await env.accept(token, seeded.parent)
    body = {"runnerToken": token, "jobToken": jt}
    base = FILES.format(job=seeded.parent, video=seeded.video_uuid) + "/studio/task-files/"
    ok = await env.http.post(base + "intro-1.mp4", json=body)
    assert (ok.status_code, ok.content) == (200, b"intro bytes")
    assert (await env.http.post(base + "toto", json=body)).status_code == 400
    assert (await env.http.post(base + "other-2.mp4", json=body)).status_code == 400
    assert (await env.http.post(base + "..%2F..%2Fcoordinator.sqlite3", json=body)).status_code in (400, 404)


# ------------------------------------------------------------------ bad bodies never crash


@pytest.mark.parametrize(
    ("content", "content_type", "status"),
    [
        (b"{not json", "application/json", 400),
        (b"[1, 2]", "application/json", 400),
        (b'"text"', "application/json", 400),
        (b"x" * (600 * 1024), "application/json", 413),
        (b"\x00\x01", "application/octet-stream", 415),
        (
            b'--b\r\nContent-Disposition: form-data; name="runnerToken"\r\n\r\nx',
            "multipart/form-data; boundary=b",
            400,
        ),
        (b"garbage", "multipart/form-data", 400),
    ],
)
async def test_malformed_bodies_get_a_problem_document(
    env: Env, content: bytes, content_type: str, status: int
) -> None:
    r = await env.http.post(
        "/api/v1/runners/jobs/request", content=content, headers={"content-type": content_type}
    )
    assert r.status_code == status
    assert r.headers["content-type"].startswith("application/problem+json")
    # And the coordinator still answers.
    ok = await env.http.post("/api/v1/runners/jobs/request", json={"runnerToken": "nobody"})
    assert ok.status_code == 404


async def test_an_oversized_upload_is_413_and_leaves_nothing(tmp_path: Any, database_url: str | None) -> None:
    from tests.support.servers import ADMIN_TOKEN, serve_coordinator
    from tuberunner.coordinator.config import CoordinatorConfig

    config = CoordinatorConfig(
        data_dir=tmp_path / "c", database_url=database_url, admin_token=ADMIN_TOKEN, max_upload_bytes=10_000
    )
    async with serve_coordinator(config) as running, httpx.AsyncClient(base_url=running.url) as http:
        env = Env(running, http)
        token = await env.register("r")
        seeded = await env.seed()
        jt = await env.accept(token, seeded.parent)
        r = await env.success(
            token, seeded.parent, jt, {"payload[videoFile]": ("a.mp4", b"x" * 50_000, "video/mp4")}
        )
        assert r.status_code == 413
        assert list(config.uploads_dir.iterdir()) == []
        assert await env.state(seeded.parent) == JobState.PROCESSING
