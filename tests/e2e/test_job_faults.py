"""A job taken back by the server or whose ffmpeg hangs while the real ffmpeg runs, and an input ffmpeg
cannot read: the process is gone at once (or when the watchdog says so), the job ends once, completed or
errored with its reason, and the runner takes the next one."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import fields
from pathlib import Path

import pytest

from tests.e2e.conftest import (
    Media,
    StartRunner,
    admin,
    assert_completed_once,
    job_row,
    process_state,
    register,
    seed_transcode,
    takes_the_next_job,
)
from tests.support.servers import RunningCoordinator
from tuberunner.coordinator.config import DEFAULT_LEASE_S
from tuberunner.protocol.jobs import MAX_FAILURES, JobState
from tuberunner.runner.config import RunnerConfig
from tuberunner.runner.supervisor import CancelReason

# The upscale to 720p keeps ffmpeg busy for about 15 s: it is always cut, never finished.
LONG_RESOLUTION = 720
# What the issue claims: "Ours stops it within 1 s."
CLAIMED_STOP_S = 1.0


async def test_a_job_cancelled_mid_transcode_stops_its_ffmpeg_at_once_and_the_runner_goes_on(
    coordinator: RunningCoordinator,
    start_runner: StartRunner,
    media: Media,
    record_property: pytest.RecordProperty,
) -> None:
    instance = await register(coordinator.url, "cancelled")
    runner = await start_runner([instance])
    job_uuid = await seed_transcode(coordinator, media.long, resolution=LONG_RESOLUTION)
    run = await runner.running(job_uuid)
    ffmpeg = runner.ffmpeg()
    row = await job_row(coordinator, job_uuid)
    assert row is not None
    assert row.state == JobState.PROCESSING
    assert (row.progress or 0) > 0
    async with admin(coordinator.url) as http:
        cancelled_at = time.monotonic()
        answer = await http.post(f"/api/v1/runners/jobs/{job_uuid}/cancel")
    assert answer.status_code == 204
    stop_s = await ffmpeg.ended() - cancelled_at
    record_property("cancel_to_ffmpeg_gone_s", round(stop_s, 3))
    print(f"cancel → ffmpeg gone: {stop_s:.3f} s (update interval {runner.config.update_interval_s:g} s)")
    assert stop_s < CLAIMED_STOP_S
    await runner.wait_for(runner.finished(job_uuid))
    assert run.cancel_reason is CancelReason.GONE
    (outcome,) = runner.outcomes(job_uuid)
    assert outcome.startswith(f"cancelled: {CancelReason.GONE.value}")
    row = await job_row(coordinator, job_uuid)
    assert row is not None
    assert (row.state, row.failures) == (JobState.CANCELLED, 0)  # nothing was reported on top of it
    await takes_the_next_job(coordinator, runner, media)


async def test_a_job_deleted_mid_transcode_stops_its_ffmpeg_within_a_second(
    coordinator: RunningCoordinator,
    start_runner: StartRunner,
    media: Media,
    record_property: pytest.RecordProperty,
) -> None:
    instance = await register(coordinator.url, "deleted")
    runner = await start_runner([instance])
    job_uuid = await seed_transcode(coordinator, media.long, resolution=LONG_RESOLUTION)
    run = await runner.running(job_uuid)
    ffmpeg = runner.ffmpeg()
    async with admin(coordinator.url) as http:
        deleted_at = time.monotonic()
        answer = await http.delete(f"/api/v1/runners/jobs/{job_uuid}")
    assert answer.status_code == 204
    stop_s = await ffmpeg.ended() - deleted_at
    record_property("delete_to_ffmpeg_gone_s", round(stop_s, 3))
    print(f"delete → ffmpeg gone: {stop_s:.3f} s (update interval {runner.config.update_interval_s:g} s)")
    assert stop_s < CLAIMED_STOP_S
    await runner.wait_for(runner.finished(job_uuid))
    assert run.cancel_reason is CancelReason.GONE
    assert await job_row(coordinator, job_uuid) is None
    await takes_the_next_job(coordinator, runner, media)


DEFAULTS = RunnerConfig()
# The production defaults for everything that decides how fast a deletion is noticed; only ffmpeg's
# threads and niceness stay pinned, so that the job lasts long enough on any machine.
PRODUCTION = {
    f.name: getattr(DEFAULTS, f.name)
    for f in fields(RunnerConfig)
    if f.name not in ("instances", "ffmpeg_threads", "ffmpeg_nice", "min_free_disk_bytes")
}


@pytest.mark.slow
# The coordinator's production lease too: the e2e one (2 s) would take the job back long before the
# deletion, with the production heartbeat interval (15 s).
@pytest.mark.parametrize("coordinator_config", [{"default_lease_s": DEFAULT_LEASE_S}], indirect=True)
async def test_with_the_default_config_a_deleted_job_stops_its_ffmpeg_within_a_second(
    coordinator: RunningCoordinator,
    start_runner: StartRunner,
    media: Media,
    record_property: pytest.RecordProperty,
) -> None:
    instance = await register(coordinator.url, "production")
    runner = await start_runner([instance], **PRODUCTION)
    assert runner.config.update_interval_s == 15.0
    # About 40 s of work at 1080p: longer than one update interval.
    job_uuid = await seed_transcode(coordinator, media.long, resolution=1080)
    # Deleted once ffmpeg runs, right after the heartbeat that follows the accept (the next one is one
    # interval later: without the coordinator's jobs-taken-back event, the deletion would be noticed
    # only then).
    await runner.wait_for(
        lambda: bool(
            (run := runner.supervisor.jobs.get(job_uuid))
            and (run.progress or 0) > 0
            and run.heartbeat is not None
            and run.heartbeat.delivered >= 1
            and all(w.status.socket_connected for w in runner.supervisor.workers.values())
        )
    )
    ffmpeg = runner.ffmpeg()
    run = runner.supervisor.jobs[job_uuid]
    assert run.heartbeat is not None
    assert run.heartbeat.interval_s == 15.0  # the coordinator pushes take-backs: no need to check often
    async with admin(coordinator.url) as http:
        deleted_at = time.monotonic()
        assert (await http.delete(f"/api/v1/runners/jobs/{job_uuid}")).status_code == 204
    bound_s = runner.config.update_interval_s + 2.0
    stop_s = await ffmpeg.ended(timeout_s=bound_s) - deleted_at
    record_property("delete_to_ffmpeg_gone_default_config_s", round(stop_s, 3))
    print(f"delete → ffmpeg gone with the default config: {stop_s:.3f} s")
    await runner.wait_for(runner.finished(job_uuid))
    assert runner.supervisor.finished[-1].cancel_reason is CancelReason.GONE
    runner.assert_idle_and_clean()
    assert stop_s < CLAIMED_STOP_S


# PeerTube notices nothing to its runners when a job is deleted: only their own checks can see it.
SILENT_CLAIMED_STOP_S = 3.0


@pytest.mark.slow
@pytest.mark.parametrize("coordinator_config", [{"default_lease_s": DEFAULT_LEASE_S}], indirect=True)
async def test_with_the_default_config_a_job_deleted_silently_stops_its_ffmpeg_within_three_seconds(
    coordinator: RunningCoordinator,
    start_runner: StartRunner,
    media: Media,
    record_property: pytest.RecordProperty,
) -> None:
    # Like PeerTube: no `tuberunner-jobs-taken-back` event, and no header saying there would be one.
    coordinator.coordinator.jobs.on_taken_back = None
    instance = await register(coordinator.url, "silent")
    runner = await start_runner([instance], **PRODUCTION)
    # About 15 s of work at 720p.
    job_uuid = await seed_transcode(coordinator, media.long, resolution=720)
    # Deleted right after a heartbeat got through: the worst moment, a whole interval before the next.
    await runner.wait_for(
        lambda: bool(
            (run := runner.supervisor.jobs.get(job_uuid))
            and (run.progress or 0) > 0
            and run.heartbeat is not None
            and run.heartbeat.delivered >= 2
        )
    )
    ffmpeg = runner.ffmpeg()
    run = runner.supervisor.jobs[job_uuid]
    assert run.heartbeat is not None
    assert not run.client.pushes_taken_back
    assert run.heartbeat.interval_s == DEFAULTS.check_interval_s
    async with admin(coordinator.url) as http:
        deleted_at = time.monotonic()
        assert (await http.delete(f"/api/v1/runners/jobs/{job_uuid}")).status_code == 204
    stop_s = await ffmpeg.ended(timeout_s=SILENT_CLAIMED_STOP_S + 2.0) - deleted_at
    record_property("delete_to_ffmpeg_gone_silent_server_s", round(stop_s, 3))
    print(f"delete → ffmpeg gone, server sending nothing, default config: {stop_s:.3f} s")
    await runner.wait_for(runner.finished(job_uuid))
    assert runner.supervisor.finished[-1].cancel_reason is CancelReason.GONE
    runner.assert_idle_and_clean()
    assert stop_s <= SILENT_CLAIMED_STOP_S


@pytest.mark.slow
async def test_a_stopped_ffmpeg_is_killed_by_the_watchdog_reported_and_the_retry_completes(
    coordinator: RunningCoordinator,
    start_runner: StartRunner,
    media: Media,
    record_property: pytest.RecordProperty,
) -> None:
    stall_timeout_s = 2.0
    instance = await register(coordinator.url, "stalled")
    runner = await start_runner([instance], stall_timeout_s=stall_timeout_s)
    # About 4 s at 360p: long enough to be stopped mid-way, short enough to be run again.
    job_uuid = await seed_transcode(coordinator, media.long, resolution=360)
    await runner.running(job_uuid)
    ffmpeg = runner.ffmpeg()
    os.kill(ffmpeg.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    killed_s = await ffmpeg.ended() - stopped_at
    record_property("sigstop_to_ffmpeg_killed_s", round(killed_s, 3))
    print(f"SIGSTOP → ffmpeg killed by the watchdog: {killed_s:.3f} s (stall timeout {stall_timeout_s:g} s)")
    # The last sign of progress came at most one progress period (0.5 s) before the stop.
    assert stall_timeout_s - 0.6 <= killed_s <= stall_timeout_s + 1.5
    # Reaped (no zombie, stopped or not) by the time its run ended.
    await runner.wait_for(lambda: len(runner.outcomes(job_uuid)) >= 1)
    assert process_state(ffmpeg.pid) is None
    await runner.wait_for(runner.finished(job_uuid, count=2))
    errored, succeeded = runner.outcomes(job_uuid)
    assert errored.startswith("errored: ")
    assert "ffmpeg made no progress for 2 s and was killed" in errored
    assert succeeded == "succeeded"
    # One error counted by the coordinator, then completed by the second run.
    await assert_completed_once(coordinator, runner, job_uuid, failures=1)
    await takes_the_next_job(coordinator, runner, media)


async def test_an_input_ffmpeg_cannot_read_ends_errored_with_the_reason_and_the_runner_goes_on(
    coordinator: RunningCoordinator, start_runner: StartRunner, media: Media, tmp_path: Path
) -> None:
    instance = await register(coordinator.url, "picky-eater")
    runner = await start_runner([instance])
    # The upload cut after its first 100 kB: the index (moov) at the end of the file is missing.
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(media.long.read_bytes()[:100_000])
    job_uuid = await seed_transcode(coordinator, truncated, resolution=144)
    # Errors 1-4 send the job back to the queue, the 5th one is final (PeerTube's rule).
    await runner.wait_for(runner.finished(job_uuid, count=MAX_FAILURES))
    outcomes = runner.outcomes(job_uuid)
    assert len(outcomes) == MAX_FAILURES
    assert all(o.startswith("errored: Cannot read the video input") for o in outcomes), outcomes
    row = await job_row(coordinator, job_uuid)
    assert row is not None
    assert (row.state, row.failures) == (JobState.ERRORED, MAX_FAILURES)
    assert row.error is not None
    # What the administrator reads: which input, and ffmpeg's reason.
    assert row.error.startswith("Cannot read the video input")
    assert row.error.endswith("Invalid data found when processing input (moov atom not found)")
    await takes_the_next_job(coordinator, runner, media)
