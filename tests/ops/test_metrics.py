"""`/metrics` of the runner daemon and of the coordinator after a known sequence of jobs and faults, parsed
with prometheus_client's parser: one job succeeds, one input ffmpeg cannot read errors five times (then
for good), one job is cancelled mid-transcode, two leftovers of a crash are swept at start."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import (
    ADMIN,
    CoordinatorCalls,
    JobChanges,
    Media,
    daemon_cache,
    daemon_env,
    job_row,
    register_daemon,
    run_cli,
    seed_transcode,
    stop_daemon,
)
from tests.ops.conftest import (
    DAEMON_SETTINGS,
    answer_of,
    metrics_of,
    parse_metrics,
    start_tuberunner,
    total,
    until,
    value,
)
from tests.support.servers import RunningCoordinator, free_port
from tuberunner.protocol.jobs import MAX_FAILURES, JobState, JobType

pytestmark = pytest.mark.slow

WEB = str(JobType.VOD_WEB_VIDEO)


async def test_metrics_count_jobs_by_outcome_bytes_and_cleanups(
    coordinator: RunningCoordinator, media: Media, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = CoordinatorCalls(coordinator, monkeypatch)
    changes = JobChanges(coordinator)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = daemon_env(tmp_path / "home", TUBERUNNER_DAEMON_HTTP_PORT=str(port), **DAEMON_SETTINGS)
    await register_daemon(env, coordinator.url, "metered")
    # What a crashed daemon left in its work folder.
    work_dir = daemon_cache(env) / "jobs"
    (work_dir / "0b5e8d1c-old-job").mkdir(parents=True)
    (work_dir / "0b5e8d1c-old-job" / "output.mp4").write_bytes(b"partial")
    (work_dir / "stray.tmp").write_bytes(b"stray")
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(media.long.read_bytes()[:100_000])
    log_path = tmp_path / "daemon.log"
    daemon = await start_tuberunner(env, log_path, "server")
    try:
        await answer_of(endpoint + "/readyz", 200)

        async def state_is(job_uuid: str, state: JobState) -> bool:
            row = await job_row(coordinator, job_uuid)
            return row is not None and row.state == state

        succeeded = await seed_transcode(coordinator, media.short, resolution=144)
        await changes.until(lambda: state_is(succeeded, JobState.COMPLETED))
        errored = await seed_transcode(coordinator, truncated, resolution=144)
        await changes.until(lambda: state_is(errored, JobState.ERRORED))
        # About 15 s at 720p: still running while `status` is read, then cancelled.
        cancelled = await seed_transcode(coordinator, media.long, resolution=720)
        await asyncio.wait_for(calls.progress(cancelled).wait(), 60)
        shown: list[dict[str, Any]] = []

        async def status_shows_its_speed() -> bool:
            status = await run_cli(env, "status", "--json")
            shown[:] = json.loads(status.stdout)["jobs"]
            return bool(shown) and (shown[0]["speed"] or 0) > 0

        await until(status_shows_its_speed, "`status` shows the running job's speed")
        (job,) = shown
        assert (job["uuid"], job["type"], job["instance_url"]) == (cancelled, WEB, coordinator.url)
        assert job["progress"] > 0
        assert job["phase"] == "running"
        table = await run_cli(env, "status")
        assert "Speed" in table.stdout
        assert re.search(r"\b\d+\.\d\dx\b", table.stdout), table.stdout
        async with httpx.AsyncClient(base_url=coordinator.url, headers=ADMIN) as http:
            (await http.post(f"/api/v1/runners/jobs/{cancelled}/cancel")).raise_for_status()

        async def all_ended() -> bool:
            samples = await metrics_of(endpoint)
            return total(samples, "tuberunner_runner_jobs_total") == 1 + MAX_FAILURES + 1

        await until(all_ended, "every run ended")
        m = await metrics_of(endpoint)
    finally:
        assert await stop_daemon(daemon) == 0, log_path.read_text()[-3000:]

    assert value(m, "tuberunner_runner_jobs_total", job_type=WEB, outcome="succeeded") == 1
    assert value(m, "tuberunner_runner_jobs_total", job_type=WEB, outcome="errored") == MAX_FAILURES
    assert value(m, "tuberunner_runner_jobs_total", job_type=WEB, outcome="gone") == 1
    for outcome, count in (("succeeded", 1), ("errored", MAX_FAILURES), ("gone", 1)):
        labels = {"job_type": WEB, "outcome": outcome}
        assert value(m, "tuberunner_runner_job_duration_seconds_count", **labels) == count
        assert (value(m, "tuberunner_runner_job_duration_seconds_sum", **labels) or 0) > 0
    # ffmpeg's speed is known for the job that succeeded.
    assert value(m, "tuberunner_runner_encode_speed_ratio_count", job_type=WEB) == 1
    assert (value(m, "tuberunner_runner_encode_speed_ratio_sum", job_type=WEB) or 0) > 0
    # Each input came down at least once whole (the cache may probe a few bytes again).
    inputs = sum(p.stat().st_size for p in (media.short, truncated, media.long))
    assert (value(m, "tuberunner_runner_downloaded_bytes_total") or 0) >= inputs
    assert (value(m, "tuberunner_runner_uploaded_bytes_total") or 0) > 0
    assert value(m, "tuberunner_runner_leftover_cleanups_total") == 2
    assert total(m, "tuberunner_runner_give_ups_total") == 0
    assert value(m, "tuberunner_runner_slots") == 2
    assert value(m, "tuberunner_runner_slots_busy") == 0
    assert value(m, "tuberunner_runner_info", version="0.1.0", runner_id="default") == 1

    async with httpx.AsyncClient(base_url=coordinator.url) as http:
        answer = await http.get("/metrics")
    assert answer.status_code == 200
    c = parse_metrics(answer.text)
    for state, count in (("completed", 1), ("errored", 1), ("cancelled", 1), ("pending", 0)):
        assert value(c, "tuberunner_coordinator_jobs", job_type=WEB, state=state) == count, state
    assert total(c, "tuberunner_coordinator_jobs") == 3
    assert value(c, "tuberunner_coordinator_runners") == 1
    assert value(c, "tuberunner_coordinator_database_up") == 1
    assert value(c, "tuberunner_coordinator_lease_expiries_total") == 0
    assert (value(c, "tuberunner_coordinator_pings_sent_total") or 0) >= 3


async def test_the_coordinator_counts_lease_expiries_and_queue_depth(coordinator: RunningCoordinator) -> None:
    """A runner accepts a job and goes silent: its lease expires and the job is pending again."""
    from tests.runner.conftest import register, seed_job
    from tuberunner.runner.client import InstanceClient

    changes = JobChanges(coordinator)
    instance = await register(coordinator, "silent")
    job_uuid = await seed_job(coordinator)
    async with httpx.AsyncClient(base_url=coordinator.url) as http:
        before = parse_metrics((await http.get("/metrics")).text)
        assert value(before, "tuberunner_coordinator_jobs", job_type=WEB, state="pending") == 1
        async with InstanceClient(coordinator.url, instance.runner_token) as client:
            await client.accept(job_uuid)

        async def expired() -> bool:
            return coordinator.coordinator.jobs.lease_expiries_total >= 1

        await changes.until(expired)
        # Counts are kept up to 2 s between scrapes: read until the re-queued job shows.

        async def pending_again() -> bool:
            samples = parse_metrics((await http.get("/metrics")).text)
            return value(samples, "tuberunner_coordinator_jobs", job_type=WEB, state="pending") == 1

        await until(pending_again, "the job is pending again in the metrics")
        after = parse_metrics((await http.get("/metrics")).text)
    assert value(after, "tuberunner_coordinator_lease_expiries_total") == 1
    assert value(after, "tuberunner_coordinator_jobs", job_type=WEB, state="processing") == 0
