"""The supervisor against the real coordinator: jobs run, report, and are stopped when they are not ours."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from tests.runner.conftest import FakeProcessor, StartSupervisor, idle_worker, job_of, register, seed_job
from tests.support.servers import RunningCoordinator
from tuberunner.protocol.jobs import JobState, JobType
from tuberunner.runner.errors import JobFailed
from tuberunner.runner.supervisor import CancelReason, JobRun, describe_failure

WAIT_S = 10.0


def finished_with(runs: list[JobRun] | object, outcome: str) -> bool:
    return any(run.outcome.startswith(outcome) for run in runs)  # type: ignore[attr-defined]


async def test_a_job_runs_reports_success_and_leaves_nothing_behind(
    coordinator: RunningCoordinator, start_supervisor: StartSupervisor, clip: Path
) -> None:
    instance = await register(coordinator, "happy")
    processor = FakeProcessor(source=clip, wait=False)
    job_uuid = await seed_job(coordinator)
    harness = await start_supervisor([instance], processor)
    supervisor = harness.supervisor
    assert await supervisor.wait_for(lambda: finished_with(supervisor.finished, "succeeded"), WAIT_S)
    row = await job_of(coordinator, job_uuid)
    assert row is not None
    assert row.state in (JobState.COMPLETING, JobState.COMPLETED)
    assert row.result is not None
    run = supervisor.finished[-1]
    assert not run.work_dir.exists()
    assert supervisor.free_slots() == supervisor.config.concurrency
    assert processor.contexts[0].job.uuid == job_uuid


async def test_progress_reaches_the_server_through_heartbeats(
    coordinator: RunningCoordinator, start_supervisor: StartSupervisor, clip: Path
) -> None:
    instance = await register(coordinator, "progress")
    processor = FakeProcessor(source=clip, progress=42.4)
    job_uuid = await seed_job(coordinator)
    harness = await start_supervisor([instance], processor)
    supervisor = harness.supervisor
    assert await supervisor.wait_for(
        lambda: any(r.heartbeat and r.heartbeat.delivered_progress == 42 for r in supervisor.jobs.values()),
        WAIT_S,
    )
    row = await job_of(coordinator, job_uuid)
    assert row is not None
    assert row.progress == 42
    status = supervisor.snapshot().jobs[0]
    assert (status.uuid, status.progress, status.phase) == (job_uuid, 42.4, "running")
    processor.release.set()
    assert await supervisor.wait_for(lambda: finished_with(supervisor.finished, "succeeded"), WAIT_S)


async def test_a_job_deleted_on_the_server_is_cancelled_within_a_heartbeat(
    coordinator: RunningCoordinator, start_supervisor: StartSupervisor
) -> None:
    instance = await register(coordinator, "deleted")
    processor = FakeProcessor()
    job_uuid = await seed_job(coordinator)
    harness = await start_supervisor([instance], processor, update_interval_s=0.2)
    await asyncio.wait_for(processor.started.wait(), WAIT_S)
    supervisor = harness.supervisor
    run = supervisor.jobs[job_uuid]
    assert run.work_dir.is_dir()
    row = await job_of(coordinator, job_uuid)
    assert row is not None
    deleted_at = time.monotonic()
    await coordinator.coordinator.jobs.delete(row)
    # Next heartbeat within 0.2 s, then cancellation at once (the bound leaves room for a slow machine).
    await asyncio.wait_for(processor.cancelled.wait(), 0.2 + 1.0)
    assert time.monotonic() - deleted_at < 1.2
    assert await supervisor.wait_for(lambda: job_uuid not in supervisor.jobs, WAIT_S)
    assert run.cancel_reason is CancelReason.GONE
    assert not run.work_dir.exists()
    assert supervisor.free_slots() == supervisor.config.concurrency


async def test_a_failing_processor_reports_its_message_and_the_daemon_goes_on(
    coordinator: RunningCoordinator, start_supervisor: StartSupervisor
) -> None:
    instance = await register(coordinator, "failing")
    processor = FakeProcessor(wait=False, raises=JobFailed("This input file does not contain audio"))
    job_uuid = await seed_job(coordinator)
    harness = await start_supervisor([instance], processor)
    supervisor = harness.supervisor
    # The coordinator re-queues errored jobs 4 times, the 5th error is final: our runner takes it each time.
    assert await supervisor.wait_for(lambda: processor.runs >= 5 and not supervisor.jobs, WAIT_S)
    row = await job_of(coordinator, job_uuid)
    assert row is not None
    assert (row.state, row.failures, row.error) == (
        JobState.ERRORED,
        5,
        "This input file does not contain audio",
    )
    assert not list(supervisor.work_dir.iterdir())


def test_unexpected_exceptions_are_described_with_their_type_and_stderr_tail() -> None:
    class FfmpegFailed(Exception):
        def __init__(self) -> None:
            super().__init__("ffmpeg exited with code 1: Invalid argument")
            self.stderr_tail = "line 1\nconfig noise\n[libx264 @ 0x1] broken option\nInvalid argument\n"

    assert describe_failure(ValueError("bad payload")) == "ValueError: bad payload"
    # The last line is already quoted: nothing is appended.
    assert describe_failure(FfmpegFailed()) == "FfmpegFailed: ffmpeg exited with code 1: Invalid argument"
    failure = FfmpegFailed()
    failure.stderr_tail += "Conversion failed!\n"
    described = describe_failure(failure)
    assert described.startswith("FfmpegFailed: ffmpeg exited with code 1")
    assert described.endswith("[libx264 @ 0x1] broken option\nInvalid argument\nConversion failed!")


async def test_an_unexpected_exception_does_not_stop_the_next_job(
    coordinator: RunningCoordinator, start_supervisor: StartSupervisor, clip: Path
) -> None:
    instance = await register(coordinator, "isolated")
    good = FakeProcessor(source=clip, wait=False)
    bad = FakeProcessor(wait=False, raises=ZeroDivisionError("division by zero"))
    await seed_job(coordinator, JobType.VOD_HLS)  # first in the queue: taken first, 5 times
    good_uuid = await seed_job(coordinator)
    harness = await start_supervisor(
        [instance], processors={JobType.VOD_HLS: bad, JobType.VOD_WEB_VIDEO: good}, concurrency=1
    )
    supervisor = harness.supervisor
    assert await supervisor.wait_for(lambda: finished_with(supervisor.finished, "succeeded"), WAIT_S)
    assert bad.runs == 5
    assert any("ZeroDivisionError: division by zero" in run.outcome for run in supervisor.finished)
    assert (await job_of(coordinator, good_uuid)).result is not None  # type: ignore[union-attr]


async def test_unknown_or_unsupported_jobs_are_refused_with_a_log_line(
    coordinator: RunningCoordinator, start_supervisor: StartSupervisor, caplog: pytest.LogCaptureFixture
) -> None:
    instance = await register(coordinator, "picky")
    processor = FakeProcessor(wait=False)
    harness = await start_supervisor(
        [instance],
        processor,
        supports=lambda job_type, payload: (
            "resolution 240 is boring" if payload["output"]["resolution"] == 240 else None
        ),
        # The coordinator filters by the types we send; this one is enabled but not supported.
    )
    caplog.set_level(logging.WARNING, logger="tuberunner.runner.supervisor")
    supervisor = harness.supervisor
    worker = await idle_worker(supervisor)
    job_uuid = await seed_job(coordinator)
    assert await supervisor.wait_for(lambda: job_uuid in worker.refused, WAIT_S)
    checks = worker.checks
    worker.wake("test")  # asked again: refused again, but logged once
    assert await supervisor.wait_for(lambda: worker.checks > checks, WAIT_S)
    refusals = [r.getMessage() for r in caplog.records if job_uuid in r.getMessage()]
    assert len(refusals) == 1
    assert refusals[0].endswith("resolution 240 is boring")
    assert processor.runs == 0
    row = await job_of(coordinator, job_uuid)
    assert row is not None
    assert row.state == JobState.PENDING


async def test_no_job_is_accepted_while_the_disk_is_too_full(
    coordinator: RunningCoordinator, start_supervisor: StartSupervisor
) -> None:
    instance = await register(coordinator, "full-disk")
    processor = FakeProcessor(wait=False)
    harness = await start_supervisor([instance], processor, min_free_disk_bytes=2**62, socket_enabled=False)
    supervisor = harness.supervisor
    worker = await idle_worker(supervisor)
    assert any(e.where == "disk" for e in supervisor.errors)
    job_uuid = await seed_job(coordinator)
    checks = worker.checks
    worker.wake("test")
    assert await supervisor.wait_for(lambda: worker.checks > checks, WAIT_S)
    assert processor.runs == 0
    assert (await job_of(coordinator, job_uuid)).state == JobState.PENDING  # type: ignore[union-attr]


async def test_a_job_is_picked_up_through_the_socket_ping(
    coordinator: RunningCoordinator, start_supervisor: StartSupervisor, clip: Path
) -> None:
    instance = await register(coordinator, "pinged")
    processor = FakeProcessor(source=clip, wait=False)
    harness = await start_supervisor([instance], processor, poll_interval_s=3600)
    supervisor = harness.supervisor
    assert await supervisor.wait_for(
        lambda: all(w.status.socket_connected for w in supervisor.workers.values()), WAIT_S
    )
    worker = await idle_worker(supervisor)
    assert await supervisor.wait_for(lambda: worker.checks >= 2, WAIT_S)  # at start and on connect
    created = time.monotonic()
    await seed_job(coordinator)
    await asyncio.wait_for(processor.started.wait(), WAIT_S)
    # Without the ping, the next poll would come in an hour.
    assert time.monotonic() - created < 2.0


async def test_start_up_sweeps_leftovers_of_a_crash(
    coordinator: RunningCoordinator, start_supervisor: StartSupervisor, tmp_path: Path
) -> None:
    leftover = tmp_path / "work-0" / "0b6e1a5e-dead-job"
    (leftover / "sub").mkdir(parents=True)
    (leftover / "sub" / "input.part").write_bytes(b"x")
    (tmp_path / "work-0" / "stray-file").write_bytes(b"y")
    instance = await register(coordinator, "sweeper")
    harness = await start_supervisor([instance])
    supervisor = harness.supervisor
    assert await supervisor.wait_for(lambda: bool(supervisor.workers), WAIT_S)
    assert list((tmp_path / "work-0").iterdir()) == []


async def test_offers_of_a_video_whose_files_the_runner_holds_are_taken_first(
    coordinator: RunningCoordinator, start_supervisor: StartSupervisor
) -> None:
    instance = await register(coordinator, "prefers")
    jobs = [await seed_job(coordinator) for _ in range(3)]
    held = await job_of(coordinator, jobs[2])
    assert held is not None
    held_video = held.private_payload["videoUUID"]
    asked: list[tuple[str, str]] = []

    def holds_video(instance_url: str, video_uuid: str) -> bool:
        asked.append((instance_url, video_uuid))
        return video_uuid == held_video

    processor = FakeProcessor()
    await start_supervisor([instance], processor, concurrency=1, holds_video=holds_video)
    await asyncio.wait_for(processor.started.wait(), WAIT_S)
    assert processor.contexts[0].job.uuid == jobs[2]
    assert (instance.url, held_video) in asked
    processor.release.set()
