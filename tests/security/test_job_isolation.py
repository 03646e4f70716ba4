"""A runner reaches only the jobs it holds, and only with the job token of the current acceptance:
another runner's job cannot be read (its input files), updated, aborted, errored or finished, and a job
token stops opening anything once the job left `processing` for that acceptance (spec §3.9, §3.11)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import pytest

from tests.coordinator.test_runner_api import FILES, Env
from tests.support.protocol import admin_headers, store_video_file
from tuberunner.protocol.jobs import JobState, JobType

JOBS = "/api/v1/runners/jobs"
INTRO = b"intro file of the studio task"
PREVIEW = b"preview image of the video"


@dataclass
class Held:
    """A studio job (its payload names every kind of input file) accepted by runner A."""

    runner_a: str
    runner_b: str
    job: str
    token: str
    video: str
    source: bytes

    def body(self, runner: str | None = None, token: str | None = None) -> dict[str, str]:
        return {"runnerToken": runner or self.runner_a, "jobToken": token or self.token}

    def downloads(self) -> dict[str, str]:
        base = FILES.format(job=self.job, video=self.video)
        return {
            "max-quality": base + "/max-quality",
            "max-quality/audio": base + "/max-quality/audio",
            "preview": base + "/previews/max-quality",
            "task file": base + "/studio/task-files/intro-1.mp4",
        }


async def _held_studio_job(env: Env) -> Held:
    a, b = await env.register("runner A"), await env.register("runner B")
    seeded = await env.seed(JobType.STUDIO, children=0)
    await store_video_file(env.c, seeded.video_id, seeded.video_uuid, "task-file", "intro-1.mp4", INTRO)
    await store_video_file(env.c, seeded.video_id, seeded.video_uuid, "preview", "preview.jpg", PREVIEW)
    token = await env.accept(a, seeded.parent)
    return Held(a, b, seeded.parent, token, seeded.video_uuid, seeded.source_bytes)


async def _expect_untouched(env: Env, held: Held) -> None:
    """Still processing, for A, with the same token, no failure counted; A can go on."""
    job = await env.c.jobs.get(held.job)
    assert job is not None
    assert (job.state, job.processing_job_token, job.failures, job.progress) == (
        JobState.PROCESSING,
        held.token,
        0,
        None,
    )
    r = await env.http.post(f"{JOBS}/{held.job}/update", json={**held.body(), "progress": 1})
    assert r.status_code == 204


def _unknown_job(r: httpx.Response) -> None:
    assert r.status_code == 404, r.text
    assert r.json()["detail"] == "Unknown runner job"
    assert "code" not in r.json()


async def test_the_holder_reads_every_input_file_of_its_job(env: Env) -> None:
    held = await _held_studio_job(env)
    expected = {"max-quality": held.source, "max-quality/audio": held.source, "preview": PREVIEW}
    expected["task file"] = INTRO
    for name, url in held.downloads().items():
        r = await env.http.post(url, json=held.body())
        assert (r.status_code, r.content) == (200, expected[name]), name


async def test_another_runner_cannot_read_the_input_files_of_a_job_it_does_not_hold(env: Env) -> None:
    held = await _held_studio_job(env)
    own = await env.seed(children=0)
    own_token = await env.accept(held.runner_b, own.parent)
    for url in held.downloads().values():
        for body in (
            held.body(runner=held.runner_b),  # B with A's job token
            held.body(runner=held.runner_b, token=own_token),  # B with its own job token
            {"runnerToken": held.runner_b, "jobToken": "ptrjt-00000000-0000-4000-8000-000000000000"},
        ):
            r = await env.http.post(url, json=body)
            _unknown_job(r)
            assert held.source not in r.content
    await _expect_untouched(env, held)


@pytest.mark.parametrize("call", ["update", "abort", "error", "success"])
async def test_another_runner_cannot_update_abort_error_or_finish_a_job_it_does_not_hold(
    env: Env, call: str
) -> None:
    held = await _held_studio_job(env)
    own = await env.seed(children=0)
    own_token = await env.accept(held.runner_b, own.parent)
    extra: dict[str, dict[str, object]] = {
        "update": {"progress": 50},
        "abort": {"reason": "r"},
        "error": {"message": "m"},
        "success": {},
    }
    for body in (held.body(runner=held.runner_b), held.body(runner=held.runner_b, token=own_token)):
        if call == "success":
            r = await env.success(
                body["runnerToken"], held.job, body["jobToken"], env.results(JobType.STUDIO)
            )
        else:
            r = await env.http.post(f"{JOBS}/{held.job}/{call}", json={**body, **extra[call]})
        _unknown_job(r)
    # Nor can B's job token serve A: tokens open one job only.
    r = await env.http.post(f"{JOBS}/{held.job}/{call}", json={**held.body(token=own_token), **extra[call]})
    _unknown_job(r)
    await _expect_untouched(env, held)
    accepted_by_b = await env.http.post(f"{JOBS}/{held.job}/accept", json={"runnerToken": held.runner_b})
    assert accepted_by_b.status_code == 409


async def _abort(env: Env, held: Held) -> None:
    r = await env.http.post(f"{JOBS}/{held.job}/abort", json={**held.body(), "reason": "stop"})
    assert r.status_code == 204


async def _error(env: Env, held: Held) -> None:
    r = await env.http.post(f"{JOBS}/{held.job}/error", json={**held.body(), "message": "broken"})
    assert r.status_code == 204


async def _lease_expiry(env: Env, held: Held) -> None:
    """The real reaper, with its clock past the lease."""
    jobs = env.c.jobs
    real = jobs.clock
    jobs.clock = lambda: real() + env.c.config.default_lease_s + 1
    try:
        assert await jobs.reap_expired() == 1
    finally:
        jobs.clock = real


async def _cancel(env: Env, held: Held) -> None:
    r = await env.http.post(f"{JOBS}/{held.job}/cancel", headers=admin_headers())
    assert r.status_code == 204


async def _runner_deleted(env: Env, held: Held) -> None:
    r = await env.http.post("/api/v1/runners/unregister", json={"runnerToken": held.runner_a})
    assert r.status_code == 204


async def _accepted_again(env: Env, held: Held) -> None:
    """Back to pending, then accepted again by the same runner: the old token is not the new one."""
    await _abort(env, held)
    new_token = await env.accept(held.runner_a, held.job)
    assert new_token != held.token
    r = await env.http.post(held.downloads()["max-quality"], json=held.body(token=new_token))
    assert r.status_code == 200


LOSSES: dict[str, Callable[[Env, Held], Awaitable[None]]] = {
    "abort": _abort,
    "error (re-queued)": _error,
    "lease expiry": _lease_expiry,
    "admin cancel": _cancel,
    "runner unregistered": _runner_deleted,
    "accepted again": _accepted_again,
}


@pytest.mark.parametrize("loss", list(LOSSES))
async def test_a_job_token_opens_no_file_once_its_acceptance_ended(env: Env, loss: str) -> None:
    held = await _held_studio_job(env)
    await LOSSES[loss](env, held)
    for url in held.downloads().values():
        r = await env.http.post(url, json=held.body())
        _unknown_job(r)
        assert held.source not in r.content


async def test_a_completed_job_keeps_its_token_but_its_files_are_not_served(env: Env) -> None:
    held = await _held_studio_job(env)
    done = await env.success(held.runner_a, held.job, held.token, env.results(JobType.STUDIO))
    assert done.status_code == 204
    for url in held.downloads().values():
        r = await env.http.post(url, json=held.body())
        assert r.status_code == 400, r.text
        assert r.json()["code"] == "runner_job_not_in_processing_state"


async def test_a_job_token_opens_only_its_own_video(env: Env) -> None:
    held = await _held_studio_job(env)
    other = await env.seed(children=0)
    url = FILES.format(job=held.job, video=other.video_uuid) + "/max-quality"
    r = await env.http.post(url, json=held.body())
    assert r.status_code == 403
    assert r.json()["detail"] == "Job is not associated to this video"
    assert other.source_bytes not in r.content


async def test_a_pending_job_opens_nothing_even_with_a_guessed_token(env: Env) -> None:
    a = await env.register("runner A")
    seeded = await env.seed(children=0)
    for token in ("ptrjt-00000000-0000-4000-8000-000000000000", "", "x" * 1000):
        r = await env.http.post(
            FILES.format(job=seeded.parent, video=seeded.video_uuid) + "/max-quality",
            json={"runnerToken": a, "jobToken": token},
        )
        assert r.status_code in (400, 404)
        assert seeded.source_bytes not in r.content
