"""Leases and recovery (spec §13 gaps): every type re-queued after its lease, completions redone."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from tests.coordinator.test_runner_api import ALL_TYPES, Env
from tests.support.servers import ADMIN_TOKEN, serve_coordinator
from tuberunner.coordinator.config import CoordinatorConfig
from tuberunner.coordinator.schema import jobs
from tuberunner.protocol.jobs import JobState, JobType

LEASE_S = 0.6


def _config(tmp_path: Path, database_url: str | None, **overrides: Any) -> CoordinatorConfig:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "c",
        "database_url": database_url,
        "admin_token": ADMIN_TOKEN,
        "default_lease_s": LEASE_S,
        "reaper_interval_s": 0.1,
    }
    values.update(overrides)
    return CoordinatorConfig(**values)


async def _wait_for_state(env: Env, job_uuid: str, state: JobState, timeout_s: float = 10) -> None:
    """Poll the real database until the reaper has acted (bounded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await env.state(job_uuid) == state:
            return
        await env.c.jobs.reap_expired()
    raise AssertionError(f"job {job_uuid} never reached {state!r}; it is {await env.state(job_uuid)!r}")


@pytest.mark.parametrize("job_type", ALL_TYPES)
async def test_a_silent_processing_job_of_every_type_is_requeued_after_its_lease(
    tmp_path: Path, database_url: str | None, result_files: dict[str, Path], job_type: JobType
) -> None:
    async with (
        serve_coordinator(_config(tmp_path, database_url)) as running,
        httpx.AsyncClient(base_url=running.url) as http,
    ):
        env = Env(running, http, result_files)
        token = await env.register("silent")
        seeded = await env.seed(job_type, children=0)
        jt = await env.accept(token, seeded.parent)
        accepted_at = time.monotonic()
        await _wait_for_state(env, seeded.parent, JobState.PENDING)
        assert time.monotonic() - accepted_at >= LEASE_S * 0.9
        job = await env.c.jobs.get(seeded.parent)
        assert job is not None
        assert (job.processing_job_token, job.lease_expiries, job.failures) == (None, 1, 0)
        r = await http.post(
            f"/api/v1/runners/jobs/{seeded.parent}/update", json={"runnerToken": token, "jobToken": jt}
        )
        assert r.status_code == 404
        offered = await http.post("/api/v1/runners/jobs/request", json={"runnerToken": token})
        assert [j["uuid"] for j in offered.json()["availableJobs"]] == [seeded.parent]


async def test_heartbeats_keep_a_job_alive_past_many_leases(
    tmp_path: Path, database_url: str | None, result_files: dict[str, Path]
) -> None:
    async with (
        serve_coordinator(_config(tmp_path, database_url)) as running,
        httpx.AsyncClient(base_url=running.url) as http,
    ):
        env = Env(running, http, result_files)
        token = await env.register("busy")
        seeded = await env.seed(children=0)
        jt = await env.accept(token, seeded.parent)
        started = time.monotonic()
        while time.monotonic() - started < LEASE_S * 4:
            r = await http.post(
                f"/api/v1/runners/jobs/{seeded.parent}/update", json={"runnerToken": token, "jobToken": jt}
            )
            assert r.status_code == 204
            await env.c.jobs.reap_expired()
            assert await env.state(seeded.parent) == JobState.PROCESSING


async def test_after_a_restart_a_held_job_gets_a_grace_window_then_its_lease_again(
    tmp_path: Path, database_url: str | None, result_files: dict[str, Path]
) -> None:
    grace_s = 5.0
    config = _config(tmp_path, database_url, restart_grace_s=grace_s)
    async with serve_coordinator(config) as running, httpx.AsyncClient(base_url=running.url) as http:
        env = Env(running, http, result_files)
        token = await env.register("away")
        seeded = await env.seed(children=0)
        jt = await env.accept(token, seeded.parent)
    # Down, then back: the runner could not renew the job meanwhile.
    async with serve_coordinator(config) as running, httpx.AsyncClient(base_url=running.url) as http:
        env = Env(running, http, result_files)
        started_at = time.time()
        job = await env.c.jobs.get(seeded.parent)
        assert job is not None
        assert job.lease_expires_at is not None
        assert job.lease_expires_at >= started_at + grace_s - 1.0  # not the 0.6 s lease
        jobs_service = env.c.jobs
        real = jobs_service.clock
        # Later than the lease, earlier than the grace: the runner's first heartbeat is still in time.
        jobs_service.clock = lambda: real() + grace_s / 2
        try:
            assert await jobs_service.reap_expired() == 0
        finally:
            jobs_service.clock = real
        assert await env.state(seeded.parent) == JobState.PROCESSING
        r = await http.post(
            f"/api/v1/runners/jobs/{seeded.parent}/update", json={"runnerToken": token, "jobToken": jt}
        )
        assert r.status_code == 204
        # Renewed: from now on the usual lease counts, and a silent runner loses the job after it.
        await _wait_for_state(env, seeded.parent, JobState.PENDING)


async def test_a_job_whose_lease_keeps_expiring_is_errored_not_requeued_forever(
    tmp_path: Path, database_url: str | None, result_files: dict[str, Path]
) -> None:
    config = _config(tmp_path, database_url, max_lease_expiries=2)
    async with serve_coordinator(config) as running, httpx.AsyncClient(base_url=running.url) as http:
        env = Env(running, http, result_files)
        token = await env.register("crashy")
        seeded = await env.seed(children=1)
        await env.accept(token, seeded.parent)
        await _wait_for_state(env, seeded.parent, JobState.PENDING)
        await env.accept(token, seeded.parent)
        await _wait_for_state(env, seeded.parent, JobState.ERRORED)
        job = await env.c.jobs.get(seeded.parent)
        assert job is not None
        assert job.error is not None
        assert "lease expired 2 times" in job.error
        assert await env.state(seeded.children[0]) == JobState.PARENT_ERRORED


async def test_a_completion_interrupted_by_a_crash_is_redone_at_start(
    tmp_path: Path, database_url: str | None, result_files: dict[str, Path]
) -> None:
    config = _config(tmp_path, database_url, default_lease_s=120.0)
    async with serve_coordinator(config) as running, httpx.AsyncClient(base_url=running.url) as http:
        env = Env(running, http, result_files)
        token = await env.register("r")
        seeded = await env.seed(children=1)
        jt = await env.accept(token, seeded.parent)
    # The state a crash between `success` and the end of completion leaves behind: COMPLETING with the
    # stored result (written exactly as the success handler writes it).
    result_dir = config.files_dir / "results" / seeded.parent / "crash"
    result_dir.mkdir(parents=True)
    (result_dir / "videoFile.mp4").write_bytes(result_files["mp4"].read_bytes())
    async with running.coordinator.db.write() as conn:
        await conn.execute(
            update(jobs)
            .where(jobs.c.uuid == seeded.parent)
            .values(
                state=JobState.COMPLETING,
                result={"files": {"videoFile": f"results/{seeded.parent}/crash/videoFile.mp4"}, "fields": {}},
            )
        )
    await running.coordinator.db.dispose()
    async with serve_coordinator(config) as running, httpx.AsyncClient(base_url=running.url) as http:
        env = Env(running, http, result_files)
        await running.coordinator.jobs.wait_completions()
        assert await env.state(seeded.parent) == JobState.COMPLETED
        assert await env.state(seeded.children[0]) == JobState.PENDING
        # The runner's retried success (its first answer was lost in the crash) is answered 204.
        r = await env.success(token, seeded.parent, jt, env.results(JobType.VOD_WEB_VIDEO))
        assert r.status_code == 204


async def test_a_failed_completion_errors_the_job_and_its_children(
    tmp_path: Path, database_url: str | None, result_files: dict[str, Path]
) -> None:
    async with (
        serve_coordinator(_config(tmp_path, database_url)) as running,
        httpx.AsyncClient(base_url=running.url) as http,
    ):
        env = Env(running, http, result_files)

        async def broken(job: Any, result: Any) -> None:
            raise ValueError("unreadable video")

        running.coordinator.jobs.completer = broken
        token = await env.register("r")
        seeded = await env.seed(children=2)
        jt = await env.accept(token, seeded.parent)
        r = await env.success(token, seeded.parent, jt, env.results(JobType.VOD_WEB_VIDEO))
        assert r.status_code == 204
        job = await env.c.jobs.get(seeded.parent)
        assert job is not None
        assert job.state == JobState.ERRORED
        assert job.error == "Completion failed: unreadable video"
        assert [await env.state(c) for c in seeded.children] == [JobState.PARENT_ERRORED] * 2
        # A retry of that success is still recognised and not processed again.
        again = await env.success(token, seeded.parent, jt, env.results(JobType.VOD_WEB_VIDEO))
        assert again.status_code == 204
