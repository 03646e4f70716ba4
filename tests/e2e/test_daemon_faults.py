"""`tuberunner server` itself dying: a SIGKILL (or an OOM kill, or a crash) mid-job must not leave its ffmpeg
running, the job must still end completed once, and a finished result not delivered yet is delivered by the
next start."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from pathlib import Path

import pytest

from tests.e2e.conftest import (
    WAIT_S,
    CoordinatorCalls,
    JobChanges,
    Media,
    ProcessWatch,
    daemon_cache,
    daemon_env,
    ffmpeg_pids_in,
    job_row,
    proxy_to,
    register_daemon,
    seed_transcode,
    start_daemon,
    stop_daemon,
)
from tests.support.servers import RunningCoordinator
from tuberunner.protocol.jobs import JobState
from tuberunner.runner.outbox import MANIFEST

pytestmark = pytest.mark.slow

# Fast heartbeats and leases, one ffmpeg thread, no niceness (job costs as in conftest), short drain.
SETTINGS = {
    "TUBERUNNER_JOBS_UPDATE_INTERVAL_S": "0.3",
    "TUBERUNNER_JOBS_LEASE_S": "2",
    "TUBERUNNER_JOBS_SHUTDOWN_GRACE_S": "1",
    "TUBERUNNER_FFMPEG_THREADS": "1",
    "TUBERUNNER_FFMPEG_NICE": "0",
}
# How long the old ffmpeg may survive the restarted daemon's first request for jobs (which comes after its
# start-up sweep). The kernel kills it with its parent (PR_SET_PDEATHSIG): it is gone long before.
ORPHAN_GRACE_S = 1.0


async def test_a_daemon_killed_mid_job_leaves_no_ffmpeg_running_and_the_job_completes_once(
    coordinator: RunningCoordinator, media: Media, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = CoordinatorCalls(coordinator, monkeypatch)
    changes = JobChanges(coordinator)
    env = daemon_env(tmp_path / "home", **SETTINGS)
    await register_daemon(env, coordinator.url, "crashing")
    # About 8 s at 480p: the old ffmpeg would still run long after the restart.
    job_uuid = await seed_transcode(coordinator, media.long, resolution=480)
    log_path = tmp_path / "daemon.log"
    daemons: list[asyncio.subprocess.Process] = []
    survivors: list[int] = []
    try:
        daemons.append(await start_daemon(env, log_path))
        await asyncio.wait_for(calls.progress(job_uuid).wait(), WAIT_S)
        (pid,) = ffmpeg_pids_in(daemon_cache(env))
        ffmpeg = ProcessWatch(pid)
        daemons[0].send_signal(signal.SIGKILL)
        assert await daemons[0].wait() == -signal.SIGKILL
        calls.requested.clear()
        daemons.append(await start_daemon(env, log_path))
        # The new daemon is up (signal handlers set, work folder swept) once it asks for jobs.
        await asyncio.wait_for(calls.requested.wait(), WAIT_S)
        try:
            await ffmpeg.ended(timeout_s=ORPHAN_GRACE_S)
        except TimeoutError:
            survivors.append(pid)
            pytest.fail(f"ffmpeg {pid} of the killed daemon still runs")
        finally:
            ffmpeg.close()

        # The coordinator takes the job back after its lease; the restarted daemon completes it.
        async def completed() -> bool:
            row = await job_row(coordinator, job_uuid)
            return row is not None and row.state == JobState.COMPLETED

        await changes.until(completed)
        row = await job_row(coordinator, job_uuid)
        assert row is not None
        assert (row.failures, row.lease_expiries) == (0, 1)
        assert await stop_daemon(daemons[1]) == 0, log_path.read_text()[-3000:]
        assert ffmpeg_pids_in(tmp_path) == []
        assert list((daemon_cache(env) / "jobs").iterdir()) == []
    finally:
        for daemon in daemons:
            if daemon.returncode is None:
                daemon.kill()
                await daemon.wait()
        for survivor in survivors:
            with contextlib.suppress(ProcessLookupError):
                os.kill(survivor, signal.SIGKILL)


# Leases as long as PeerTube's: the coordinator takes back nothing during the test's outage.
@pytest.mark.parametrize("coordinator_config", [{"default_lease_s": 120.0}], indirect=True)
async def test_a_daemon_killed_with_an_undelivered_result_delivers_it_after_its_restart(
    coordinator: RunningCoordinator, media: Media, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = CoordinatorCalls(coordinator, monkeypatch)
    changes = JobChanges(coordinator)
    env = daemon_env(tmp_path / "home", **SETTINGS)
    log_path = tmp_path / "daemon.log"
    outbox = daemon_cache(env) / "outbox"
    daemons: list[asyncio.subprocess.Process] = []
    async with proxy_to(coordinator.url) as proxy:
        try:
            await register_daemon(env, coordinator.url, "restarted", via=proxy.url)
            # About 4 s at 360p: still running when the network goes.
            job_uuid = await seed_transcode(coordinator, media.long, resolution=360)
            daemons.append(await start_daemon(env, log_path))
            await asyncio.wait_for(calls.progress(job_uuid).wait(), WAIT_S)
            (pid,) = ffmpeg_pids_in(daemon_cache(env))
            ffmpeg = ProcessWatch(pid)
            # The server cannot be reached (its lease is long: nobody re-queues the job, as when it is down).
            proxy.blackhole()
            await ffmpeg.ended()
            ffmpeg.close()
            # The result moves to the outbox once ffmpeg is done: a file of the other process, polled.
            async with asyncio.timeout(WAIT_S):
                while not any(outbox.glob(f"*/{MANIFEST}")):
                    await asyncio.sleep(0.05)
            daemons[0].send_signal(signal.SIGKILL)
            assert await daemons[0].wait() == -signal.SIGKILL
            (manifest,) = outbox.glob(f"*/{MANIFEST}")
            assert json.loads(manifest.read_text())["job"]["uuid"] == job_uuid
            row = await job_row(coordinator, job_uuid)
            assert row is not None
            assert row.state == JobState.PROCESSING

            proxy.heal()
            daemons.append(await start_daemon(env, log_path))

            async def completed() -> bool:
                row = await job_row(coordinator, job_uuid)
                return row is not None and row.state == JobState.COMPLETED

            await changes.until(completed)
            row = await job_row(coordinator, job_uuid)
            assert row is not None
            assert (row.failures, row.lease_expiries) == (0, 0)
            assert await stop_daemon(daemons[1]) == 0, log_path.read_text()[-3000:]
            assert list(outbox.iterdir()) == []
            log_text = log_path.read_text()
            # One transcode: accepted once (by the first daemon), delivered by the second.
            assert log_text.count(f"job {job_uuid} (vod-web-video-transcoding) accepted from") == 1
            assert f"job {job_uuid} (vod-web-video-transcoding): delivering its result" in log_text
            assert ffmpeg_pids_in(tmp_path) == []
        finally:
            for daemon in daemons:
                if daemon.returncode is None:
                    daemon.kill()
                    await daemon.wait()
