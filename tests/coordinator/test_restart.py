"""A coordinator SIGKILLed mid-job loses nothing: job, token, runner and files keep working after restart."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from tests.support.results import result_parts
from tests.support.servers import CoordinatorProcess
from tuberunner.coordinator.config import CoordinatorConfig
from tuberunner.coordinator.database import Database
from tuberunner.coordinator.jobs import JobService
from tuberunner.coordinator.models import JobSpec
from tuberunner.coordinator.schema import jobs, registration_tokens
from tuberunner.coordinator.storage import video_key
from tuberunner.coordinator.storage.local import LocalStorage
from tuberunner.coordinator.videos import VideoStore
from tuberunner.protocol.jobs import JobState, JobType

pytestmark = pytest.mark.slow


async def _seed_video_job(config: CoordinatorConfig, source: Path) -> tuple[str, str, str]:
    """Create a video and a web-video job with a hanging HLS child, as another process would."""
    from sqlalchemy import insert

    from tuberunner.coordinator.schema import videos

    db = Database(config.sqlalchemy_url)
    storage = LocalStorage(config.files_dir)
    try:
        video_uuid, parent, child = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
        async with db.write() as conn:
            result = await conn.execute(
                insert(videos).values(
                    uuid=video_uuid, name="v", state="processing", options={}, created_at=0.0, updated_at=0.0
                )
            )
            video_id = int(result.inserted_primary_key[0])  # type: ignore[index]
        stored = await storage.put_bytes(video_key(video_uuid, "source.mp4"), source.read_bytes())
        await VideoStore(db).put_file(video_id, "source", "source.mp4", stored, resolution=90, fps=25)
        files = f"/api/v1/runners/jobs/{{}}/files/videos/{video_uuid}/max-quality"
        service = JobService(db, config, storage, notify_pending=lambda: None, completer=None)  # type: ignore[arg-type]
        await service.create(
            video_id,
            [
                JobSpec(
                    parent,
                    JobType.VOD_WEB_VIDEO,
                    100,
                    {
                        "input": {"videoFileUrl": files.format(parent), "separatedAudioFileUrl": []},
                        "output": {"resolution": 90, "fps": 25},
                    },
                    {"videoUUID": video_uuid, "isNewVideo": True},
                ),
                JobSpec(
                    child,
                    JobType.VOD_HLS,
                    100,
                    {
                        "input": {"videoFileUrl": files.format(child), "separatedAudioFileUrl": []},
                        "output": {"resolution": 90, "fps": 25, "separatedAudio": False},
                    },
                    {"videoUUID": video_uuid, "isNewVideo": True},
                    parent_uuid=parent,
                ),
            ],
        )
        async with db.read() as conn:
            reg = (await conn.execute(select(registration_tokens.c.token))).scalars().first()
        assert reg is not None
        return parent, child, reg
    finally:
        await db.dispose()


async def test_sigkill_and_restart_mid_job_keeps_the_job_and_its_token(
    tmp_path: Path, database_url: str | None, result_files: dict[str, Path]
) -> None:
    process = CoordinatorProcess(tmp_path / "data", database_url)
    config = CoordinatorConfig(data_dir=process.data_dir, database_url=database_url)
    process.start()
    try:
        parent, child, reg = await _seed_video_job(config, result_files["mp4"])
        async with httpx.AsyncClient(base_url=process.url, timeout=30) as http:
            r = await http.post(
                "/api/v1/runners/register", json={"registrationToken": reg, "name": "survivor"}
            )
            runner_token = r.json()["runnerToken"]
            r = await http.post(f"/api/v1/runners/jobs/{parent}/accept", json={"runnerToken": runner_token})
            assert r.status_code == 200
            job = r.json()["job"]
            job_token = job["jobToken"]
            body = {"runnerToken": runner_token, "jobToken": job_token}
            assert (
                await http.post(f"/api/v1/runners/jobs/{parent}/update", json={**body, "progress": 10})
            ).status_code == 204

        process.kill()
        process.start()

        async with httpx.AsyncClient(base_url=process.url, timeout=30) as http:
            update = await http.post(f"/api/v1/runners/jobs/{parent}/update", json={**body, "progress": 50})
            assert update.status_code == 204
            download = await http.post(job["payload"]["input"]["videoFileUrl"], json=body)
            assert download.content == result_files["mp4"].read_bytes()
            success = await http.post(
                f"/api/v1/runners/jobs/{parent}/success",
                data=body,
                files=result_parts(JobType.VOD_WEB_VIDEO, result_files),
            )
            assert success.status_code == 204
            offered = await http.post("/api/v1/runners/jobs/request", json={"runnerToken": runner_token})
            assert [j["uuid"] for j in offered.json()["availableJobs"]] == [child]
    finally:
        process.stop()
    db = Database(config.sqlalchemy_url)
    try:
        async with db.read() as conn:
            states = {row.uuid: row.state for row in await conn.execute(select(jobs.c.uuid, jobs.c.state))}
    finally:
        await db.dispose()
    assert states == {parent: JobState.COMPLETED, child: JobState.PENDING}
