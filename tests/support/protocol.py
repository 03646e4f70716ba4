"""Small helpers for protocol tests against a real coordinator (`tests/support/servers.py`).

Client helpers take an `httpx.AsyncClient` whose `base_url` is the coordinator's URL, e.g.
`httpx.AsyncClient(base_url=running.url)`, send the admin token themselves where needed, and raise
`httpx.HTTPStatusError` when the coordinator does not answer as expected.

Seeding helpers bypass HTTP and create rows through the real in-process services of a
`RunningCoordinator`, the way ingest will:

    job_uuids = await seed_jobs(running)   # the 10-job graph of a 720p upload: 1 pending + 9 waiting
    job_uuids = await seed_jobs(running, functools.partial(vod_job_specs, priority=50))
"""

from __future__ import annotations

import time
import uuid as uuidlib
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
from sqlalchemy import insert

from tests.support.servers import ADMIN_TOKEN, RunningCoordinator
from tuberunner.coordinator.context import Coordinator
from tuberunner.coordinator.models import JobSpec
from tuberunner.coordinator.schema import videos
from tuberunner.coordinator.storage import StoredObject, video_key
from tuberunner.protocol.jobs import JobType

RUNNERS = "/api/v1/runners"
# PeerTube's "all resolutions" below a 720p input (the test upload of checklist C.23).
LADDER_720P = (720, 480, 360, 240, 144)
# Content of the default source file: downloads work, ffmpeg would refuse it.
FAKE_SOURCE = b"not a real video; pass real bytes to create_video() for ffmpeg"


def admin_headers(token: str = ADMIN_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def registration_token(client: httpx.AsyncClient) -> str:
    """The oldest registration token (a fresh coordinator has exactly one), read through the admin API."""
    response = await client.get(
        f"{RUNNERS}/registration-tokens", params={"sort": "createdAt", "count": 1}, headers=admin_headers()
    )
    response.raise_for_status()
    token: str = response.json()["data"][0]["registrationToken"]
    return token


async def register_runner(
    client: httpx.AsyncClient,
    name: str,
    reg_token: str | None = None,
    *,
    description: str | None = None,
    version: str | None = None,
) -> str:
    """Register a runner (with the oldest registration token by default); returns its runner token."""
    body: dict[str, str] = {
        "registrationToken": reg_token or await registration_token(client),
        "name": name,
    }
    if description is not None:
        body["description"] = description
    if version is not None:
        body["version"] = version
    response = await client.post(f"{RUNNERS}/register", json=body)
    response.raise_for_status()
    runner_token: str = response.json()["runnerToken"]
    return runner_token


def input_url(job_uuid: str, video_uuid: str) -> str:
    """An input file URL as stored in payloads (a path; runners receive it absolute)."""
    return f"{RUNNERS}/jobs/{job_uuid}/files/videos/{video_uuid}/max-quality"


def vod_job_specs(
    video_uuid: str, *, resolutions: Sequence[int] = LADDER_720P, fps: int = 30, priority: int = 100
) -> list[JobSpec]:
    """PeerTube's VOD graph for a new upload with web videos and HLS (spec §6.5): a web-video parent at
    the first (max) resolution; a chain from it of HLS at that resolution; then for each lower resolution
    a chain [web video, HLS]. With the default ladder: 10 jobs, 5 of each type."""
    specs: list[JobSpec] = []

    def add(job_type: JobType, resolution: int, parent: str | None) -> str:
        job_uuid = str(uuidlib.uuid4())
        output: dict[str, object] = {"resolution": resolution, "fps": fps}
        private: dict[str, object] = {"videoUUID": video_uuid, "isNewVideo": True}
        if job_type == JobType.VOD_HLS:
            output["separatedAudio"] = False
            private["deleteWebVideoFiles"] = False
        payload = {
            "input": {"videoFileUrl": input_url(job_uuid, video_uuid), "separatedAudioFileUrl": []},
            "output": output,
        }
        specs.append(JobSpec(job_uuid, job_type, priority, payload, private, parent_uuid=parent))
        return job_uuid

    top, *lower = resolutions
    parent = add(JobType.VOD_WEB_VIDEO, top, None)
    add(JobType.VOD_HLS, top, parent)
    for resolution in lower:
        add(JobType.VOD_HLS, resolution, add(JobType.VOD_WEB_VIDEO, resolution, parent))
    return specs


def coordinator_of(running: RunningCoordinator) -> Coordinator:
    coordinator: Coordinator = running.coordinator
    return coordinator


async def create_video(
    running: RunningCoordinator,
    *,
    name: str = "seeded video",
    source: bytes | None = FAKE_SOURCE,
    resolution: int = 720,
) -> tuple[int, str]:
    """Insert a video row and (unless `source` is None) its source file; returns (id, uuid)."""
    coordinator = coordinator_of(running)
    video_uuid = str(uuidlib.uuid4())
    now = time.time()
    async with coordinator.db.write() as conn:
        result = await conn.execute(
            insert(videos).values(
                uuid=video_uuid,
                name=name,
                state="transcoding",
                options={},
                created_at=now,
                updated_at=now,
            )
        )
        key = result.inserted_primary_key
        assert key is not None
    video_id = int(key[0])
    if source is not None:
        await store_video_file(
            coordinator, video_id, video_uuid, "source", "source.mp4", source, resolution=resolution
        )
    return video_id, video_uuid


async def seed_jobs(
    running: RunningCoordinator, specs: Callable[[str], Sequence[JobSpec]] = vod_job_specs
) -> list[str]:
    """Create a video (`create_video`) and the job graph `specs(video_uuid)` through the real JobService;
    returns the job uuids in creation order (parents before children; the default graph's first is the
    only pending job)."""
    video_id, video_uuid = await create_video(running)
    graph = list(specs(video_uuid))
    await coordinator_of(running).jobs.create(video_id, graph)
    return [spec.uuid for spec in graph]


async def store_video_file(
    coordinator: Coordinator,
    video_id: int,
    video_uuid: str,
    kind: str,
    name: str,
    data: bytes,
    *,
    resolution: int | None = None,
    fps: int | None = None,
) -> StoredObject:
    """Put `data` in the coordinator's storage as file `name` of the video, and record it."""
    stored = await coordinator.storage.put_bytes(video_key(video_uuid, name), data)
    await coordinator.videos.put_file(video_id, kind, name, stored, resolution=resolution, fps=fps)
    return stored


def video_folder(coordinator: Coordinator, video_uuid: str) -> Path:
    """Where the default local-folder storage keeps a video's files."""
    return coordinator.config.files_dir / "videos" / video_uuid


def results_folder(coordinator: Coordinator, job_uuid: str) -> Path:
    """Where the default local-folder storage keeps a job's accepted results."""
    return coordinator.config.files_dir / "results" / job_uuid
