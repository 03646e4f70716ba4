"""A file recorded in the database but missing from storage (the default local folder): a 404 problem
that names it, and a log line; never an unhandled 500."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.coordinator.test_runner_api import FILES, Env
from tests.support.protocol import store_video_file, video_folder
from tests.support.servers import RunningCoordinator
from tuberunner.protocol.jobs import JobType


@pytest.fixture
async def env(coordinator: RunningCoordinator) -> AsyncIterator[Env]:
    async with httpx.AsyncClient(base_url=coordinator.url, timeout=30) as http:
        yield Env(coordinator, http)


def assert_missing(answer: httpx.Response, key: str) -> None:
    assert answer.status_code == 404, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["detail"] == f"File missing from storage: {key} is missing from storage"


async def test_a_missing_input_and_a_missing_output_answer_a_404_problem_and_are_logged(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    token = await env.register("r")
    seeded = await env.seed(JobType.VOD_WEB_VIDEO, children=0)
    job_token = await env.accept(token, seeded.parent)
    source = video_folder(env.c, seeded.video_uuid) / "source.mp4"
    source.unlink()
    url = FILES.format(job=seeded.parent, video=seeded.video_uuid) + "/max-quality"
    with caplog.at_level(logging.ERROR, logger="tuberunner.coordinator.problems"):
        answer = await env.http.post(url, json={"runnerToken": token, "jobToken": job_token})
    assert_missing(answer, f"videos/{seeded.video_uuid}/source.mp4")
    assert f"file missing from storage on POST {url}" in caplog.text

    name = f"{seeded.video_uuid}-240.mp4"
    await store_video_file(
        env.c, seeded.video_id, seeded.video_uuid, "web-video", name, b"mp4", resolution=240
    )
    (video_folder(env.c, seeded.video_uuid) / name).unlink()
    assert_missing(await env.http.get(f"/static/web-videos/{name}"), f"videos/{seeded.video_uuid}/{name}")
