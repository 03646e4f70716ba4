"""How the coordinator tells that no connected runner takes a job (`claims`): declared job types, types a
runner without `jobTypes` passes over, presence, and the wait. A ClaimWatch of its own, on a clock the test
moves, reads a real coordinator's database (runners registered and jobs accepted over HTTP)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from tests.coordinator.test_runner_api import Env, payload_for, private
from tests.support.protocol import create_video
from tests.support.servers import RunningCoordinator, serve_coordinator
from tuberunner.coordinator.claims import ClaimWatch
from tuberunner.coordinator.config import CoordinatorConfig
from tuberunner.coordinator.models import JobSpec
from tuberunner.protocol.jobs import JobType

WAIT_S = 100.0
STORYBOARD = str(JobType.STORYBOARD)
WEB = str(JobType.VOD_WEB_VIDEO)
HLS = str(JobType.VOD_HLS)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    # The coordinator's own watch waits for hours: only the test's watch below judges anything.
    config = CoordinatorConfig(data_dir=tmp_path / "c", admin_token="tra-x", unclaimed_after_s=36_000)
    async with serve_coordinator(config) as running, httpx.AsyncClient(base_url=running.url) as http:
        yield Env(running, http)


def watch_of(running: RunningCoordinator, clock: Clock) -> ClaimWatch:
    c = running.coordinator
    config = replace(c.config, unclaimed_after_s=WAIT_S)
    return ClaimWatch(c.db, config, contact_of=c.runners.contact_of, connected=lambda: (), clock=clock)


async def runner_id(env: Env, token: str) -> int:
    auth = await env.c.runners.by_token(token)
    assert auth is not None
    return auth.runner.id


async def pending(env: Env, job_type: JobType) -> str:
    """A pending job of `job_type` on a new video."""
    video_id, video_uuid = await create_video(env.running)
    job_uuid = str(uuid.uuid4())
    payload = payload_for(job_type, job_uuid, video_uuid)
    await env.c.jobs.create(video_id, [JobSpec(job_uuid, job_type, 100, payload, private(video_uuid))])
    return job_uuid


async def test_a_type_no_present_runner_takes_makes_its_jobs_unclaimed_after_the_wait(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    watch = watch_of(env.running, clock)
    web_only = await runner_id(env, await env.register("web-only"))
    watch.asked(web_only, frozenset({WEB}), ())
    storyboard, web = await pending(env, JobType.STORYBOARD), await pending(env, JobType.VOD_WEB_VIDEO)

    clock.now += (
        WAIT_S - 1
    )  # the runner called a moment ago: it covers web videos, nothing covers storyboards
    assert await watch.sweep() == []
    clock.now += 2  # the wait is over for storyboards; web videos were covered a second ago
    with caplog.at_level(logging.WARNING, logger="tuberunner.coordinator.claims"):
        (found,) = await watch.sweep()
        assert await watch.sweep() == [found]
    assert (found.uuid, found.type, found.fallback) == (storyboard, STORYBOARD, "coordinator")
    assert watch.counts == {STORYBOARD: 1}
    (warning,) = [r.getMessage() for r in caplog.records if storyboard in r.getMessage()]
    assert "no connected runner has taken generate-video-storyboard jobs" in warning
    assert "the coordinator makes this storyboard itself" in warning
    job = await env.c.jobs.get(web)
    assert job is not None
    assert watch.unclaimed_since(job) is None

    clock.now += WAIT_S  # now nobody has called for longer than the wait: web videos are unclaimed too
    assert {u.uuid for u in await watch.sweep()} == {storyboard, web}
    assert watch.unclaimed_since(job) is not None


def test_a_runner_without_job_types_passes_over_what_it_skips_to_take_a_later_job() -> None:
    """The 6.x official runner takes the first job it supports in the offer (notes §2.2)."""
    watch = ClaimWatch(
        None,  # type: ignore[arg-type]  # no database read here
        CoordinatorConfig(data_dir=Path("unused"), unclaimed_after_s=WAIT_S),
        contact_of=lambda _: None,
        connected=lambda: (),
    )
    assert watch.may_take(1, STORYBOARD)  # never seen choosing: it may take anything

    watch.asked(1, None, [("s", STORYBOARD), ("h", HLS), ("w", WEB)])
    watch.tried(1, "w", WEB, accepted=True)
    assert not watch.may_take(1, STORYBOARD)
    assert not watch.may_take(1, HLS)
    assert watch.may_take(1, WEB)
    # Still offered everything but storyboards, which the coordinator makes (a wrong judgement of another
    # type must never hide jobs from it).
    assert watch.offer_types(1) == frozenset(str(t) for t in JobType) - {STORYBOARD}

    # A job it tried and lost to another runner is no job it skipped.
    watch.asked(2, None, [("s", STORYBOARD), ("w", WEB)])
    watch.tried(2, "s", STORYBOARD, accepted=False)
    watch.tried(2, "w", WEB, accepted=True)
    assert watch.may_take(2, STORYBOARD)

    # Trying a job of a type takes the type back; another version of the runner starts afresh.
    watch.tried(1, "h2", HLS, accepted=False)
    assert watch.may_take(1, HLS)
    watch.forget([1])
    assert watch.may_take(1, STORYBOARD)

    # A runner that says what it takes is taken at its word.
    watch.asked(3, frozenset({WEB}), [("w", WEB)])
    assert not watch.may_take(3, STORYBOARD)


async def test_a_runner_holding_nothing_that_stays_silent_after_an_offer_passes_it_over(env: Env) -> None:
    clock = Clock()
    watch = watch_of(env.running, clock)
    idle_token, busy_token = await env.register("idle"), await env.register("busy")
    idle, busy = await runner_id(env, idle_token), await runner_id(env, busy_token)
    await env.accept(busy_token, (await env.seed(children=0)).parent)  # busy holds a job
    clock.now = time.time() + 1  # after every call above
    offer = [("s", STORYBOARD)]
    watch.asked(idle, None, offer)
    watch.asked(busy, None, offer)

    clock.now += watch.idle_grace_s - 0.5
    await watch.sweep()
    assert watch.may_take(idle, STORYBOARD)
    clock.now += 1
    await watch.sweep()
    assert not watch.may_take(idle, STORYBOARD)  # nothing in hand, offered a storyboard, took none
    assert watch.may_take(busy, STORYBOARD)  # it had no room for it


async def test_a_busy_runner_that_takes_the_type_keeps_its_jobs_claimed(env: Env) -> None:
    clock = Clock()
    watch = watch_of(env.running, clock)
    token = await env.register("busy")
    holder = await runner_id(env, token)
    await env.accept(token, (await env.seed(children=0)).parent)
    watch.asked(holder, frozenset({WEB, STORYBOARD}), ())
    storyboard = await pending(env, JobType.STORYBOARD)

    clock.now += 3 * WAIT_S  # long past its last call, but it holds a job: present
    assert await watch.sweep() == []
    job = await env.c.jobs.get(storyboard)
    assert job is not None
    assert watch.unclaimed_since(job) is None


async def test_a_runner_sending_no_job_types_is_no_longer_offered_what_it_passes_over(env: Env) -> None:
    """Ten storyboards at the head of the queue would otherwise hide every transcoding job from it."""
    token = await env.register("official-0.0.21")
    storyboard, web = await pending(env, JobType.STORYBOARD), await pending(env, JobType.VOD_WEB_VIDEO)

    async def offered() -> list[str]:
        answer = await env.http.post("/api/v1/runners/jobs/request", json={"runnerToken": token})
        return [job["uuid"] for job in answer.json()["availableJobs"]]

    assert await offered() == [storyboard, web]  # the storyboard is listed first
    await env.accept(token, web)
    other_web = await pending(env, JobType.VOD_WEB_VIDEO)
    assert await offered() == [other_web]
    # A runner that says what it takes gets exactly that, whatever this one passes over.
    declared = await env.register("declared")
    answer = await env.http.post(
        "/api/v1/runners/jobs/request", json={"runnerToken": declared, "jobTypes": [STORYBOARD, WEB]}
    )
    assert [job["uuid"] for job in answer.json()["availableJobs"]] == [storyboard, other_web]
