"""The network between runner and coordinator failing under a real job: connections reset during the input
download and during the result upload, a black hole longer than the lease, one of two instances
unreachable. A real TCP proxy sits in between; the runner is the daemon's supervisor with the real ffmpeg."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import (
    LEASE_S,
    WAIT_S,
    JobChanges,
    Media,
    StartRunner,
    assert_completed_once,
    coordinator_files_clean,
    e2e_coordinator_config,
    idle,
    job_row,
    proxy_to,
    register,
    seed_transcode,
    takes_the_next_job,
)
from tests.support.servers import RunningCoordinator, serve_coordinator
from tests.support.tcp_proxy import Action, Direction, Plan
from tuberunner.protocol.jobs import JobState
from tuberunner.runner.supervisor import CancelReason, JobPhase


async def test_a_connection_reset_during_the_input_download_is_resumed_where_it_was_cut(
    coordinator: RunningCoordinator, start_runner: StartRunner, media: Media
) -> None:
    size = media.long.stat().st_size
    cut_after = size // 3
    async with proxy_to(coordinator.url) as proxy:
        instance = await register(coordinator.url, "download-reset", via=proxy.url)
        # API answers are a few hundred bytes: only the input's body reaches the cut.
        proxy.once(Plan.reset_after(cut_after, Direction.DOWN))
        runner = await start_runner([instance])
        job_uuid = await seed_transcode(coordinator, media.long, resolution=144)
        await asyncio.wait_for(proxy.faulted.wait(), WAIT_S)
        await runner.wait_for(runner.finished(job_uuid))
        assert proxy.stats.actions == [Action.RESET]
        # Resumed from the bytes on disk: what was received before the cut is not fetched again.
        assert size <= proxy.stats.bytes_down < size + cut_after // 2
        await assert_completed_once(coordinator, runner, job_uuid)
        await takes_the_next_job(coordinator, runner, media)


async def test_a_connection_reset_during_the_result_upload_is_retried_and_completes_once(
    coordinator: RunningCoordinator, start_runner: StartRunner, media: Media
) -> None:
    cut_after = 200_000
    async with proxy_to(coordinator.url) as proxy:
        instance = await register(coordinator.url, "upload-reset", via=proxy.url)
        # Requests and heartbeats are a few hundred bytes: only the result's upload reaches the cut.
        proxy.once(Plan.reset_after(cut_after, Direction.UP))
        runner = await start_runner([instance])
        # About 1.2 MB of result at 144p.
        job_uuid = await seed_transcode(coordinator, media.long, resolution=144)
        await asyncio.wait_for(proxy.faulted.wait(), WAIT_S)
        await runner.wait_for(runner.finished(job_uuid))
        assert proxy.stats.actions == [Action.RESET]
        row = await assert_completed_once(coordinator, runner, job_uuid)
        assert row.video_id is not None
        files = await coordinator.coordinator.videos.files(row.video_id)
        (result,) = [f for f in files if f.kind == "web-video"]
        # The whole result went up once more after the cut part.
        assert proxy.stats.bytes_up > result.size_bytes + cut_after
        # The cut request left no half-written body behind on the coordinator.
        coordinator_files_clean(coordinator.config)
        await takes_the_next_job(coordinator, runner, media)


@pytest.mark.slow
async def test_a_job_black_holed_for_three_leases_goes_on_and_its_result_is_dropped_unsent_on_the_404(
    coordinator: RunningCoordinator, start_runner: StartRunner, media: Media
) -> None:
    changes = JobChanges(coordinator)
    async with proxy_to(coordinator.url) as proxy:
        instance = await register(coordinator.url, "black-holed", via=proxy.url)
        runner = await start_runner([instance])
        # About 4 s at 360p.
        job_uuid = await seed_transcode(coordinator, media.long, resolution=360)
        first = await runner.running(job_uuid)
        ffmpeg = runner.ffmpeg()
        proxy.blackhole()
        cut_at = time.monotonic()
        # The runner cannot tell a cut from a server that is down (nobody re-queues then): the work goes on
        # and its result waits in the outbox.
        await ffmpeg.ended()
        await runner.wait_for(lambda: first.phase is JobPhase.DELIVERING)

        # The coordinator, up all along, takes the job back after its lease, on its own.
        async def requeued() -> bool:
            row = await job_row(coordinator, job_uuid)
            return row is not None and (row.state, row.lease_expiries) == (JobState.PENDING, 1)

        await changes.until(requeued)
        # The cut lasts three leases in all (this sleep is the fault's duration, not a synchronisation).
        await asyncio.sleep(max(0.0, 3 * LEASE_S - (time.monotonic() - cut_at)))
        assert first.delivery is not None
        attempts = first.delivery.attempts
        assert attempts == 1  # the first upload went into the hole; none since
        sent_before_heal = proxy.stats.bytes_up
        proxy.heal()
        # The first answer after the cut is a 404 to an update: the result is dropped without being sent
        # again, and the job, pending, is taken again and completed by a second run.
        await runner.wait_for(runner.finished(job_uuid, count=2))
        dropped, succeeded = runner.outcomes(job_uuid)
        assert dropped.startswith(f"cancelled: {CancelReason.GONE.value}")
        assert succeeded == "succeeded"
        assert first.delivery.attempts == attempts
        row = await assert_completed_once(coordinator, runner, job_uuid)
        assert row.lease_expiries == 1
        assert row.video_id is not None
        files = await coordinator.coordinator.videos.files(row.video_id)
        (result,) = [f for f in files if f.kind == "web-video"]
        # After the cut, one result went up: the second run's.
        assert proxy.stats.bytes_up - sent_before_heal < 1.5 * result.size_bytes
        await takes_the_next_job(coordinator, runner, media)


async def test_an_unreachable_instance_does_not_delay_the_jobs_of_another(
    coordinator: RunningCoordinator, start_runner: StartRunner, media: Media, tmp_path: Path
) -> None:
    other_config = e2e_coordinator_config(tmp_path / "far-coordinator")
    async with serve_coordinator(other_config) as far_coordinator, proxy_to(far_coordinator.url) as proxy:
        proxy.blackhole()  # from the start: accepted, never answered
        far = await register(far_coordinator.url, "far", via=proxy.url)
        near = await register(coordinator.url, "near")
        far_job = await seed_transcode(far_coordinator, media.short, resolution=144)
        # Calls to the far instance hang for 20 s before their deadline.
        runner = await start_runner([far, near], call_timeout_s=20.0, read_timeout_s=20.0)
        workers = runner.supervisor.workers
        await runner.wait_for(lambda: near.key in workers and far.key in workers)
        near_worker, far_worker = workers[near.key], workers[far.key]
        await runner.wait_for(lambda: near_worker.status.socket_connected and near_worker.checks >= 2)
        created_at = time.monotonic()
        near_job = await seed_transcode(coordinator, media.short, resolution=144)
        await runner.wait_for(lambda: bool(runner.runs(near_job)))
        accepted_s = time.monotonic() - created_at
        await runner.wait_for(runner.finished(near_job))
        done_s = time.monotonic() - created_at
        print(f"near job accepted after {accepted_s:.3f} s, done after {done_s:.3f} s")
        assert accepted_s < 1.0
        assert done_s < 5.0
        await assert_completed_once(coordinator, runner, near_job)
        # Meanwhile the far instance's first check is still waiting for its answer.
        assert far_worker.checks == 0
        assert not far_worker.status.socket_connected
        proxy.heal()
        await runner.wait_for(runner.finished(far_job))
        await assert_completed_once(far_coordinator, runner, far_job)
        await idle(runner)
        runner.assert_idle_and_clean()
