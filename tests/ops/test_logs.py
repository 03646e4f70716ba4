"""Logs: the daemon's `--log-format json` lines all parse, never contain a token, and every line about a
job carries its id and instance (the reason of a failure included); the coordinator's lines about a job
carry its id; redaction and context fields on their own."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import (
    ADMIN_TOKEN,
    JobChanges,
    Media,
    daemon_env,
    job_row,
    new_registration_token,
    run_cli,
    seed_transcode,
    stop_daemon,
)
from tests.ops.conftest import DAEMON_SETTINGS, answer_of, start_tuberunner
from tests.support.servers import RunningCoordinator, free_port
from tuberunner.coordinator.admin_auth import ADMIN_TOKEN_PREFIX
from tuberunner.ops import logs
from tuberunner.protocol.jobs import JobState
from tuberunner.runner.config import ConfigFile

# Anything that starts like one of our tokens and is not followed by the redaction mark.
LEAKED = re.compile(r"(?<![A-Za-z0-9_])(ptrrt|ptrjt|ptrt|tra)-(?!\[redacted\])[A-Za-z0-9_-]{8,}")


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """This process's log lines (the in-process coordinator's) as JSON, in a buffer."""
    root = logging.getLogger()
    level = root.level
    buffer = io.StringIO()
    handler = logs.configure_logging("info", "json", stream=buffer)
    try:
        yield buffer
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.mark.slow
async def test_json_lines_parse_carry_the_job_and_never_contain_a_token(
    coordinator: RunningCoordinator, media: Media, tmp_path: Path, json_log: io.StringIO
) -> None:
    changes = JobChanges(coordinator)
    port = free_port()
    env = daemon_env(tmp_path / "home", TUBERUNNER_DAEMON_HTTP_PORT=str(port), **DAEMON_SETTINGS)
    registration_token = await new_registration_token(coordinator.url)
    registered = await run_cli(
        env,
        "register",
        "--url",
        coordinator.url,
        "--registration-token",
        registration_token,
        "--runner-name",
        "talkative",
    )
    assert registered.returncode == 0, registered.stderr
    config_file = Path(env["XDG_CONFIG_HOME"]) / "tuberunner" / "default" / "config.toml"
    (instance,) = ConfigFile(config_file).load().instances
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(media.long.read_bytes()[:100_000])
    log_path = tmp_path / "daemon.log"
    daemon = await start_tuberunner(env, log_path, "--log-format", "json", "--log-level", "debug", "server")
    try:
        await answer_of(f"http://127.0.0.1:{port}/readyz", 200)

        async def state_is(job_uuid: str, state: JobState) -> bool:
            row = await job_row(coordinator, job_uuid)
            return row is not None and row.state == state

        succeeded = await seed_transcode(coordinator, media.short, resolution=144)
        await changes.until(lambda: state_is(succeeded, JobState.COMPLETED))
        errored = await seed_transcode(coordinator, truncated, resolution=144)
        await changes.until(lambda: state_is(errored, JobState.ERRORED))
    finally:
        assert await stop_daemon(daemon) == 0, log_path.read_text()[-3000:]

    text = log_path.read_text()
    lines = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
    assert len(lines) > 20
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert {line["level"] for line in lines} >= {"debug", "info", "warning"}
    for secret in (instance.runner_token, registration_token, ADMIN_TOKEN):
        assert secret not in text
    assert LEAKED.findall(text) == []

    for job_uuid in (succeeded, errored):
        about = [line for line in lines if job_uuid in line["message"]]
        assert about, f"no line about job {job_uuid}"
        for line in about:
            assert (line.get("job_id"), line.get("instance")) == (job_uuid, coordinator.url), line
            assert line["runner"] == "default"
    ends = [line for line in lines if line.get("job_id") == errored and "errored after" in line["message"]]
    assert len(ends) == 5
    # The whole reason is in the log, not only its first line.
    assert all(line["level"] == "warning" for line in ends)
    assert all("moov atom not found" in line["message"] for line in ends)

    coordinator_lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    completed = [
        line
        for line in coordinator_lines
        if line["logger"] == "tuberunner.coordinator.completion" and succeeded in line["message"]
    ]
    assert completed
    assert all(line.get("job_id") == succeeded for line in completed)


def _formatted(formatter: logging.Formatter, message: str, *args: Any, **extra: Any) -> str:
    record = logging.LogRecord("tuberunner.test", logging.ERROR, __file__, 1, message, args, None)
    record.__dict__.update(extra)
    try:
        raise RuntimeError(f"failed with {args[0] if args else ''}")
    except RuntimeError:
        import sys

        record.exc_info = sys.exc_info()
    return formatter.format(record)


@pytest.mark.parametrize(
    "token",
    [
        "ptrt-7c3f2a9e-51b4-4c1e-9f0e-2b8e8f1d2c3a",
        "ptrjt-0e4b9d6c-1f2a-4b3c-8d9e-0a1b2c3d4e5f",
        "ptrrt-753f80c8-b1e0-4b3b-96c6-6814a46edf71",
        "tra-Zk3_q9-LmN0pQrStUvWxYz0123456789abcdefgh",
    ],
)
@pytest.mark.parametrize("formatter", [logs.TextFormatter(), logs.JsonFormatter()], ids=["text", "json"])
def test_tokens_are_redacted_in_messages_arguments_and_tracebacks(
    token: str, formatter: logging.Formatter
) -> None:
    line = _formatted(formatter, "calling with %s", f"Bearer {token}")
    secret = token.split("-", 1)[1]
    assert secret not in line
    assert f"{token.split('-', 1)[0]}-[redacted]" in line
    assert line.count("[redacted]") == 2  # the message and the traceback


def test_words_that_only_look_like_prefixes_are_kept() -> None:
    text = "ultra-fast extra-large tra-short ptrt- ffmpeg -preset ultrafast"
    assert logs.redact(text) == text


def test_the_admin_prefix_is_the_coordinators() -> None:
    assert logs.ADMIN_TOKEN_PREFIX == ADMIN_TOKEN_PREFIX


async def test_context_fields_follow_tasks_and_show_in_both_formats() -> None:
    buffer = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = logs.configure_logging("debug", "json", stream=buffer)
    log = logging.getLogger("tuberunner.test")
    try:
        with logs.bound(instance="https://peertube.example", job_id="job-1"):
            task = asyncio.create_task(asyncio.sleep(0))  # created inside: inherits the fields
            log.info("inside")

            async def child() -> None:
                log.info("in a task started inside")

            child_task = asyncio.create_task(child())
        log.info("outside")
        await task
        await child_task
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    inside, outside, in_task = (json.loads(line) for line in buffer.getvalue().splitlines())
    assert (inside["job_id"], inside["instance"]) == ("job-1", "https://peertube.example")
    assert (in_task["job_id"], in_task["message"]) == ("job-1", "in a task started inside")
    assert "job_id" not in outside
    text = _formatted(logs.TextFormatter(), "plain", job_id="job-2", instance="https://x.example")
    assert "plain [instance=https://x.example job_id=job-2]" in text


def test_configure_logging_refuses_unknown_levels_and_formats() -> None:
    with pytest.raises(ValueError, match="log format"):
        logs.configure_logging("info", "xml")
    with pytest.raises(ValueError, match="log level"):
        logs.configure_logging("loud", "text")
