"""The coordinator failing under a real job: SIGKILLed and restarted while ffmpeg runs, down for longer than
the lease, and forgetting the runner (its registration deleted by the admin)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.coordinator.test_ingest_support import upload_ok, video_json
from tests.e2e.conftest import (
    LEASE_S,
    Media,
    Runner,
    StartRunner,
    admin,
    assert_completed_once,
    coordinator_files_clean,
    daemon_env,
    e2e_coordinator_config,
    idle,
    job_row,
    new_registration_token,
    register,
    run_cli,
    seed_transcode,
    takes_the_next_job,
)
from tests.support.servers import CoordinatorProcess, RunningCoordinator, serve_coordinator
from tuberunner.coordinator.config import CoordinatorConfig
from tuberunner.coordinator.database import Database
from tuberunner.coordinator.models import Job
from tuberunner.coordinator.schema import jobs
from tuberunner.protocol.jobs import JobState
from tuberunner.runner.config import ConfigFile, InstanceConfig, RunnerConfig
from tuberunner.runner.outbox import MANIFEST
from tuberunner.runner.supervisor import CancelReason, JobPhase

pytestmark = pytest.mark.slow

# Upload options for a graph of one job, a web video at the clip's own resolution (up to 360p): about 4 s
# of ffmpeg for the 30 s 640x360 clip, a fraction of a second for the 5 s 320x180 one.
SINGLE_JOB = {"resolutions": "360", "hls": "false", "webVideo": "true", "storyboard": "false"}


StartProcess = Callable[[float], Awaitable[CoordinatorProcess]]


@pytest.fixture
async def start_process(tmp_path: Path) -> AsyncIterator[StartProcess]:
    """`await start_process(lease_s)`: `tuberunner coordinator serve` on SQLite, stopped after the test."""
    processes: list[CoordinatorProcess] = []

    async def start(lease_s: float) -> CoordinatorProcess:
        process = CoordinatorProcess(tmp_path / f"coordinator-{len(processes)}", None, lease_s=lease_s)
        processes.append(process)
        await asyncio.to_thread(process.start)
        return process

    try:
        yield start
    finally:
        for process in processes:
            await asyncio.to_thread(process.stop)


async def stored_job(process: CoordinatorProcess, job_uuid: str) -> Job:
    """The job as the process stored it (read from its SQLite file: the admin API hides lease counts)."""
    db = Database(f"sqlite+aiosqlite:///{process.data_dir / 'coordinator.sqlite3'}")
    try:
        async with db.read() as conn:
            row = (await conn.execute(jobs.select().where(jobs.c.uuid == job_uuid))).mappings().one()
    finally:
        await db.dispose()
    return Job.from_row(row)


async def upload_single_job(process: CoordinatorProcess, clip: Path) -> tuple[str, str]:
    """(video uuid, job uuid) of a new upload whose graph is one web-video job at the clip's resolution."""
    async with admin(process.url) as http:
        video_uuid = await upload_ok(http, clip, **SINGLE_JOB)
        (job,) = (await video_json(http, video_uuid))["jobs"]["list"]
    return video_uuid, job["uuid"]


async def assert_published_once(
    process: CoordinatorProcess, runner: Runner, video_uuid: str, resolution: int = 360
) -> dict[str, Any]:
    async with admin(process.url) as http:
        video = await video_json(http, video_uuid)
    assert video["state"] == "published", video["errors"]
    (job,) = video["jobs"]["list"]
    assert (job["state"]["id"], job["failures"], job["error"]) == (JobState.COMPLETED, 0, None)
    assert runner.outcomes(job["uuid"]).count("succeeded") == 1
    (web,) = video["outputs"]["webVideos"]
    assert web["resolution"] == resolution
    return video


async def takes_the_next_upload(process: CoordinatorProcess, runner: Runner, media: Media) -> None:
    """Idle and clean on both sides, the runner takes the next upload (180p, one job) and completes it."""
    runner.assert_idle_and_clean()
    coordinator_files_clean(CoordinatorConfig(data_dir=process.data_dir))
    video_uuid, job_uuid = await upload_single_job(process, media.upload)
    await runner.wait_for(runner.finished(job_uuid))
    await assert_published_once(process, runner, video_uuid, 180)
    runner.assert_idle_and_clean()


async def test_a_coordinator_sigkilled_mid_job_comes_back_and_the_job_completes_once_with_its_token(
    start_process: StartProcess, start_runner: StartRunner, media: Media
) -> None:
    process = await start_process(60.0)  # the restart must not cost the job its lease
    instance = await register(process.url, "survivor")
    runner = await start_runner([instance], lease_s=30.0)
    await idle(runner)
    video_uuid, job_uuid = await upload_single_job(process, media.upload_360p)
    run = await runner.running(job_uuid)
    ffmpeg = runner.ffmpeg()
    token = run.job.job_token
    delivered = run.heartbeat.delivered if run.heartbeat else 0
    await asyncio.to_thread(process.kill)
    assert ffmpeg.alive  # killed mid-transcode
    await asyncio.to_thread(process.start)
    # Usually back before the transcode ends (about 2 s of 4); on a slow machine ffmpeg may finish first
    # and the result wait for the coordinator instead.
    back_mid_transcode = ffmpeg.alive
    await runner.wait_for(runner.finished(job_uuid))
    # One run, the one accepted before the kill, delivered its result with the token it was given.
    assert runner.runs(job_uuid) == [run]
    assert (run.outcome, run.job.job_token) == ("succeeded", token)
    assert run.heartbeat is not None
    assert run.heartbeat.last_error is not None  # it did meet the outage...
    if back_mid_transcode:
        assert run.heartbeat.delivered > delivered  # ...and its updates got through again after it
    await assert_published_once(process, runner, video_uuid)
    stored = await stored_job(process, job_uuid)
    assert (stored.lease_expiries, stored.failures) == (0, 0)
    await takes_the_next_upload(process, runner, media)


async def test_a_job_finished_while_the_coordinator_is_down_is_transcoded_once_and_delivered_soon_after(
    start_process: StartProcess, start_runner: StartRunner, media: Media
) -> None:
    # Like PeerTube's stale-job watchdog, the coordinator takes back a job not renewed for one lease (2 s).
    process = await start_process(LEASE_S)
    instance = await register(process.url, "patient")
    runner = await start_runner([instance])
    await idle(runner)
    video_uuid, job_uuid = await upload_single_job(process, media.upload_360p)
    run = await runner.running(job_uuid)
    ffmpeg = runner.ffmpeg()
    assert run.heartbeat is not None
    await asyncio.to_thread(process.kill)
    killed_at = time.monotonic()
    delivered = run.heartbeat.delivered
    # Nobody can re-queue the job while its server is down: the work goes on and the result, finished,
    # waits in the outbox.
    await ffmpeg.ended()
    await runner.wait_for(lambda: run.phase is JobPhase.DELIVERING)
    assert run.entry is not None
    assert (run.entry.folder / MANIFEST).exists()
    # Down for two leases in all, many heartbeats (this sleep is the fault's duration, not a synchronisation).
    await asyncio.sleep(max(0.0, 2 * LEASE_S - (time.monotonic() - killed_at)))
    assert run.heartbeat.delivered == delivered
    assert job_uuid in runner.supervisor.jobs
    await asyncio.to_thread(process.start)  # returns once it answers
    back_at = time.monotonic()
    await runner.wait_for(runner.finished(job_uuid))
    delivered_s = time.monotonic() - back_at
    print(f"coordinator back → result delivered: {delivered_s:.3f} s")
    assert delivered_s <= 5.0
    # One run, one transcode, completed with the token it was accepted with; never taken back.
    assert runner.runs(job_uuid) == [run]
    assert run.outcome == "succeeded"
    await assert_published_once(process, runner, video_uuid)
    stored = await stored_job(process, job_uuid)
    assert (stored.lease_expiries, stored.failures) == (0, 0)
    assert list(runner.supervisor.outbox.root.iterdir()) == []
    await takes_the_next_upload(process, runner, media)


async def test_a_deleted_runner_loses_its_job_at_once_is_flagged_and_works_again_once_registered(
    coordinator: RunningCoordinator, start_runner: StartRunner, media: Media, tmp_path: Path
) -> None:
    other_config = e2e_coordinator_config(tmp_path / "other-coordinator")
    async with serve_coordinator(other_config) as other:
        doomed = await register(coordinator.url, "doomed")
        healthy = await register(other.url, "healthy")
        config_file = ConfigFile(tmp_path / "runner" / "config.toml")
        config_file.save_instance(doomed)
        config_file.save_instance(healthy)
        runner: Runner | None = None
        last = config_file.signature()

        def reload() -> RunnerConfig | None:
            """The daemon's reloader, keeping the test's settings: instances come from the file."""
            nonlocal last
            if config_file.signature() == last or runner is None:
                return None
            last = config_file.signature()
            return replace(runner.supervisor.config, instances=config_file.load(env={}).instances)

        def flag(instance: InstanceConfig) -> None:
            config_file.set_needs_registration(instance.url, instance.runner_name, instance.runner_token)

        runner = await start_runner([doomed, healthy], flag_instance=flag, reload_config=reload)
        await idle(runner)
        # About 4 s at 360p: cut early by the deletion, then done in full by the second run.
        job_uuid = await seed_transcode(coordinator, media.long, resolution=360)
        run = await runner.running(job_uuid)
        ffmpeg = runner.ffmpeg()
        async with admin(coordinator.url) as http:
            listed = (await http.get("/api/v1/runners")).json()["data"]
            (runner_id,) = [r["id"] for r in listed if r["name"] == "doomed"]
            deleted_at = time.monotonic()
            assert (await http.delete(f"/api/v1/runners/{runner_id}")).status_code == 204
        stop_s = await ffmpeg.ended() - deleted_at
        print(f"runner deleted → ffmpeg gone: {stop_s:.3f} s")
        assert stop_s < 1.0
        await runner.wait_for(runner.finished(job_uuid))
        assert run.cancel_reason is CancelReason.GONE
        # Flagged in the status and in the config file; the deletion gave the job back to the queue.
        workers = runner.supervisor.workers
        await runner.wait_for(
            lambda: (
                doomed.key in workers
                and workers[doomed.key].status.registration == "needs-registration"
                and workers[doomed.key].config.needs_registration
            )
        )
        flagged = config_file.load(env={}).instance(doomed.url, "doomed")
        assert flagged is not None
        assert flagged.needs_registration
        row = await job_row(coordinator, job_uuid)
        assert row is not None
        assert (row.state, row.failures) == (JobState.PENDING, 0)
        assert not runner.task.done()
        # The other instance keeps working meanwhile.
        await takes_the_next_job(other, runner, media)
        # `tuberunner register` again: the running runner picks the new token up and finishes the job.
        registration_token = await new_registration_token(coordinator.url)
        args = ["register", "--config", str(config_file.path), "--url", coordinator.url]
        registered = await run_cli(
            daemon_env(tmp_path / "home"),
            *args,
            *("--registration-token", registration_token, "--runner-name", "doomed"),
        )
        assert registered.returncode == 0, registered.stderr
        await runner.wait_for(runner.finished(job_uuid, count=2))
        gone, succeeded = runner.outcomes(job_uuid)
        assert gone.startswith(f"cancelled: {CancelReason.GONE.value}")
        assert succeeded == "succeeded"
        await assert_completed_once(coordinator, runner, job_uuid)
        assert workers[doomed.key].status.registration == "registered"
        runner.assert_idle_and_clean()
