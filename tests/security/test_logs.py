"""Tokens never reach the logs: every record the coordinator (and the libraries under it) produce while a
video is ingested and its jobs are worked through — refusals, a socket, an error, an abort, a lease expiry
and a success included — is searched for every admin, registration, runner and job token, the right ones
and the wrong ones presented."""

from __future__ import annotations

import io
import logging
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import socketio

from tests.coordinator.test_runner_api import Env
from tests.coordinator.test_socket import Listener
from tests.security.multipart import Part, multipart, text
from tests.support.protocol import admin_headers
from tests.support.results import result_parts
from tests.support.servers import ADMIN_TOKEN, serve_coordinator
from tuberunner.coordinator.config import CoordinatorConfig
from tuberunner.ops.logs import configure_logging
from tuberunner.protocol.jobs import JobType

JOBS = "/api/v1/runners/jobs"


class Capture(logging.Handler):
    """Every record as logging would print it with a plain formatter: message, arguments, traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


async def _work_through_a_video(env: Env, result_files: dict[str, Path]) -> list[str]:
    """Everything a deployment does with tokens; returns every token that was presented or issued."""
    secrets = [ADMIN_TOKEN, "tra-wrong-admin-token", "ptrrt-wrong-registration", "ptrt-wrong-runner"]
    http = env.http
    assert (
        await http.post("/api/v1/runners/registration-tokens/generate", headers=admin_headers())
    ).status_code == 204
    listed = await http.get("/api/v1/runners/registration-tokens", headers=admin_headers())
    registration = [row["registrationToken"] for row in listed.json()["data"]]
    secrets += registration
    assert (
        await http.get("/api/v1/runners", headers=admin_headers("tra-wrong-admin-token"))
    ).status_code == 401
    bad = await http.post(
        "/api/v1/runners/register", json={"registrationToken": "ptrrt-wrong-registration", "name": "x"}
    )
    assert bad.status_code == 404
    r = await http.post(
        "/api/v1/runners/register", json={"registrationToken": registration[0], "name": "worker"}
    )
    runner = r.json()["runnerToken"]
    secrets.append(runner)

    listener = Listener()
    await listener.connect(env.running.url, {"runnerToken": runner})
    await listener.client.disconnect()
    with pytest.raises(socketio.exceptions.ConnectionError):
        await Listener().connect(env.running.url, {"runnerToken": "ptrt-wrong-runner"})

    body, headers = multipart(
        [
            Part(b"videofile", result_files["mp4"].read_bytes(), b"clip.mp4", b"video/mp4"),
            text("resolutions", "144"),
            text("hls", "false"),
            text("storyboard", "false"),
        ]
    )
    r = await http.post("/api/v1/videos", content=body, headers={**headers, **admin_headers()})
    assert r.status_code == 200, r.text

    async def offered() -> dict[str, str]:
        answer = await http.post(f"{JOBS}/request", json={"runnerToken": runner})
        return {job["uuid"]: job["type"] for job in answer.json()["availableJobs"]}

    async def accept(job_uuid: str) -> tuple[str, dict[str, str]]:
        answer = await http.post(f"{JOBS}/{job_uuid}/accept", json={"runnerToken": runner})
        assert answer.status_code == 200, answer.text
        token = answer.json()["job"]["jobToken"]
        secrets.append(token)
        return answer.json()["job"]["payload"]["input"]["videoFileUrl"], {
            "runnerToken": runner,
            "jobToken": token,
        }

    (job_uuid, job_type), *_ = (await offered()).items()
    url, tokens = await accept(job_uuid)
    assert (await http.post(url, json=tokens)).status_code == 200
    assert (
        await http.post(f"{JOBS}/{job_uuid}/error", json={**tokens, "message": "broken"})
    ).status_code == 204
    url, tokens = await accept(job_uuid)
    assert (await http.post(f"{JOBS}/{job_uuid}/abort", json={**tokens, "reason": "stop"})).status_code == 204
    stale = await http.post(f"{JOBS}/{job_uuid}/update", json={**tokens, "progress": 5})
    assert stale.status_code == 404
    url, tokens = await accept(job_uuid)
    jobs = env.c.jobs
    real = jobs.clock
    jobs.clock = lambda: real() + env.c.config.default_lease_s + 1
    try:
        assert await jobs.reap_expired() == 1  # the lease expires: logged, with the job's uuid
    finally:
        jobs.clock = real
    url, tokens = await accept(job_uuid)
    assert (await http.post(f"{JOBS}/{job_uuid}/update", json={**tokens, "progress": 50})).status_code == 204
    done = await http.post(
        f"{JOBS}/{job_uuid}/success", data=tokens, files=result_parts(JobType(job_type), result_files)
    )
    assert done.status_code == 204
    again = await http.post(f"{JOBS}/{job_uuid}/abort", json={**tokens, "reason": "late"})
    assert again.status_code == 400
    assert (await http.post("/api/v1/runners/unregister", json={"runnerToken": runner})).status_code == 204
    return secrets


def _leaks(lines: list[str], secrets: list[str]) -> list[tuple[str, str]]:
    return [(secret, line[:300]) for line in lines for secret in secrets if secret in line]


async def test_no_log_record_holds_a_token(
    env: Env, result_files: dict[str, Path], root_level: logging.Logger
) -> None:
    """At the coordinator's default level (info), no record carries a token at all."""
    capture = Capture()
    root_level.setLevel(logging.INFO)
    root_level.addHandler(capture)
    secrets = await _work_through_a_video(env, result_files)
    root_level.removeHandler(capture)
    assert any("lease of job" in line for line in capture.lines), "the capture saw the coordinator's lines"
    assert _leaks(capture.lines, secrets) == []


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_no_token_reaches_the_log_output_even_at_debug(
    env: Env, result_files: dict[str, Path], root_level: logging.Logger, fmt: str
) -> None:
    """At debug, libraries log SQL parameters (aiosqlite does): the coordinator's log output redacts them."""
    stream = io.StringIO()
    configure_logging("debug", fmt, stream)
    secrets = await _work_through_a_video(env, result_files)
    output = stream.getvalue()
    assert "lease of job" in output
    assert _leaks(output.splitlines(), secrets) == []


async def _break_the_runners_table(data_dir: Path) -> None:
    """A real database fault under a running coordinator: the table its token lookups read is gone."""
    conn = sqlite3.connect(data_dir / "coordinator.sqlite3")
    try:
        conn.execute("ALTER TABLE runners RENAME TO runners_gone")
        conn.commit()
    finally:
        conn.close()


@pytest.fixture
async def broken(tmp_path: Path, result_files: dict[str, Path]) -> AsyncIterator[Env]:
    config = CoordinatorConfig(data_dir=tmp_path / "coordinator", admin_token=ADMIN_TOKEN)
    async with (
        serve_coordinator(config) as running,
        httpx.AsyncClient(base_url=running.url, timeout=30) as http,
    ):
        yield Env(running, http, result_files)


TOKEN_IN_A_FAILED_STATEMENT = "ptrt-0f6a5c3e-5d0b-4c7e-9a61-2b8f0d3c4e11"


async def test_a_database_error_puts_no_token_in_a_log_record(
    broken: Env, root_level: logging.Logger
) -> None:
    capture = Capture()
    root_level.setLevel(logging.INFO)
    root_level.addHandler(capture)
    await _break_the_runners_table(broken.c.config.data_dir)
    r = await broken.http.post(f"{JOBS}/request", json={"runnerToken": TOKEN_IN_A_FAILED_STATEMENT})
    root_level.removeHandler(capture)
    assert r.status_code == 500
    assert TOKEN_IN_A_FAILED_STATEMENT not in r.text
    assert any("no such table" in line for line in capture.lines)
    assert _leaks(capture.lines, [TOKEN_IN_A_FAILED_STATEMENT]) == []


async def test_a_database_error_puts_no_token_in_the_log_output(
    broken: Env, root_level: logging.Logger
) -> None:
    stream = io.StringIO()
    configure_logging("info", "text", stream)
    await _break_the_runners_table(broken.c.config.data_dir)
    r = await broken.http.post(f"{JOBS}/request", json={"runnerToken": TOKEN_IN_A_FAILED_STATEMENT})
    assert r.status_code == 500
    assert TOKEN_IN_A_FAILED_STATEMENT not in r.text
    assert "no such table" in stream.getvalue()
    assert TOKEN_IN_A_FAILED_STATEMENT not in stream.getvalue()
