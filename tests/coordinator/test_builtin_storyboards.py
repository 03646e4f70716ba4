"""Storyboards the coordinator makes itself when no runner takes them: through the state machine, so an
input ffmpeg cannot read errors the job like a runner's report would (retried, then errored for good), and
a job taken back meanwhile has its ffmpeg killed and leaves nothing behind."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from tests.coordinator.test_runner_api import payload_for
from tests.e2e.conftest import JobChanges, ffmpeg_pids
from tests.support.protocol import admin_headers, create_video
from tests.support.servers import ADMIN_TOKEN, RunningCoordinator, serve_coordinator
from tuberunner.coordinator.builtin_storyboards import OWN_RUNNER_NAME
from tuberunner.coordinator.config import CoordinatorConfig
from tuberunner.coordinator.models import JobSpec
from tuberunner.coordinator.storage import Storage
from tuberunner.protocol.jobs import MAX_FAILURES, JobState, JobType

WAIT_S = 5.0


@pytest.fixture
async def coordinator(tmp_path: Path) -> AsyncIterator[RunningCoordinator]:
    # No runner at all: a storyboard is unclaimed 0.2 s after it became pending; heartbeats every 0.1 s.
    config = CoordinatorConfig(
        data_dir=tmp_path / "c",
        admin_token=ADMIN_TOKEN,
        unclaimed_after_s=0.2,
        lease_s={JobType.STORYBOARD: 0.4},
    )
    async with serve_coordinator(config) as running:
        yield running


async def storyboard_job(running: RunningCoordinator, source: bytes) -> str:
    """A pending storyboard job of a new video whose source file holds `source`."""
    video_id, video_uuid = await create_video(running, source=source)
    job_uuid = str(uuid.uuid4())
    payload = payload_for(JobType.STORYBOARD, job_uuid, video_uuid)
    spec = JobSpec(job_uuid, JobType.STORYBOARD, 95, payload, {"videoUUID": video_uuid})
    await running.coordinator.jobs.create(video_id, [spec])
    return job_uuid


def hand_out_a_fifo(storage: Storage, fifo: Path) -> None:
    """The fault: storage hands ffmpeg an input nobody ever writes to, so it waits on it for ever (a
    stalled network mount does the same; the local folder refuses to store such a file)."""
    os.mkfifo(fifo)

    @asynccontextmanager
    async def local_file(key: str) -> AsyncIterator[Path]:
        yield fifo

    storage.local_file = local_file  # type: ignore[method-assign]


async def test_an_input_ffmpeg_cannot_read_errors_the_job_after_the_usual_retries(
    coordinator: RunningCoordinator,
) -> None:
    c = coordinator.coordinator
    job_uuid = await storyboard_job(coordinator, b"not a video at all")

    async def ended() -> bool:
        job = await c.jobs.get(job_uuid)
        return job is not None and job.state.is_final

    await JobChanges(coordinator).until(ended, timeout_s=60)
    job = await c.jobs.get(job_uuid)
    assert job is not None
    assert (job.state, job.failures) == (JobState.ERRORED, MAX_FAILURES)
    assert job.error is not None
    assert job.error.startswith("The coordinator could not make the storyboard: ")
    assert "ffmpeg" in job.error
    assert c.storyboards.made == 0
    assert ffmpeg_pids() == []
    assert not any((c.config.files_dir / "results" / job_uuid).rglob("*"))


async def test_a_storyboard_taken_back_while_made_has_its_ffmpeg_killed(
    coordinator: RunningCoordinator, tmp_path: Path
) -> None:
    c = coordinator.coordinator
    hand_out_a_fifo(c.storage, tmp_path / "never-written")
    job_uuid = await storyboard_job(coordinator, b"a source ffmpeg never reads")

    async def held() -> bool:
        job = await c.jobs.get(job_uuid)
        return job is not None and job.state == JobState.PROCESSING

    await JobChanges(coordinator).until(held, timeout_s=WAIT_S * 4)
    deadline = time.monotonic() + WAIT_S
    while not ffmpeg_pids():  # ffmpeg is started right after the accept; it then waits on the FIFO
        assert time.monotonic() < deadline, "the coordinator started no ffmpeg"
        await asyncio.sleep(0.02)
    async with httpx.AsyncClient(base_url=coordinator.url, headers=admin_headers()) as http:
        listed = (await http.get("/api/v1/runners/jobs", params={"search": job_uuid})).json()["data"]
        assert listed[0]["runner"]["name"] == OWN_RUNNER_NAME
        cancelled = await http.post(f"/api/v1/runners/jobs/{job_uuid}/cancel")
        assert cancelled.status_code == 204

    maker = c.storyboards._task
    assert maker is not None
    await asyncio.wait_for(maker, WAIT_S)  # its next heartbeat is refused: ffmpeg is killed, files go
    assert ffmpeg_pids() == []
    assert list(c.config.uploads_dir.iterdir()) == []  # its work folder is gone too
    job = await c.jobs.get(job_uuid)
    assert job is not None
    assert (job.state, job.failures) == (JobState.CANCELLED, 0)
    assert not any((c.config.files_dir / "results" / job_uuid).rglob("*"))
