"""Fixtures for the ops tests: the end-to-end ones (generated media, the coordinator's fast settings on
SQLite), daemons started with their health/metrics endpoint, and readers of /healthz, /readyz, /metrics.

A daemon in another process tells nothing by event: what the tests wait for is what its endpoint answers,
read every 50 ms until it holds or the deadline passes (the endpoint is the thing under test)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import (  # noqa: F401 - fixtures used by these tests
    WAIT_S,
    coordinator_config,
    database_url,
    media,
)

# Fast heartbeats and leases, one ffmpeg thread, no niceness (job costs as in the e2e tests), short drain,
# socket reconnections within half a second, no periodic poll (pickups come from socket pings).
DAEMON_SETTINGS = {
    "TUBERUNNER_JOBS_UPDATE_INTERVAL_S": "0.3",
    "TUBERUNNER_JOBS_LEASE_S": "2",
    "TUBERUNNER_JOBS_SHUTDOWN_GRACE_S": "1",
    "TUBERUNNER_FFMPEG_THREADS": "1",
    "TUBERUNNER_FFMPEG_NICE": "0",
    "TUBERUNNER_NETWORK_SOCKET_RETRY_MAX_S": "0.5",
    "TUBERUNNER_NETWORK_POLL_INTERVAL_S": "3600",
    "TUBERUNNER_DAEMON_CONFIG_CHECK_INTERVAL_S": "0.1",
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def start_tuberunner(env: dict[str, str], log_path: Path, *args: str) -> asyncio.subprocess.Process:
    """`tuberunner ARGS...` (e.g. `--log-format json server`), its output appended to `log_path`."""
    with log_path.open("ab") as log:  # the child keeps its own descriptor
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tuberunner", *args, env=env, stdout=log, stderr=subprocess.STDOUT
        )


async def get(url: str) -> httpx.Response | None:
    """The answer, or None while nothing listens there."""
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            return await http.get(url)
    except httpx.TransportError:
        return None


async def until(predicate: Callable[[], Awaitable[bool]], what: str, timeout_s: float = WAIT_S) -> None:
    """Read again every 50 ms until `predicate()` holds."""
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout_s:g} s: {what}")
        await asyncio.sleep(0.05)


async def answer_of(url: str, status: int, timeout_s: float = WAIT_S) -> dict[str, Any]:
    """The JSON body of `url` once it answers `status`."""
    found: list[httpx.Response] = []

    async def answered() -> bool:
        response = await get(url)
        found[:] = [response] if response is not None else []
        return response is not None and response.status_code == status

    await until(answered, f"{url} answers {status}", timeout_s)
    body: dict[str, Any] = found[0].json()
    return body


def parse_metrics(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


async def metrics_of(url: str) -> Samples:
    response = await get(url + "/metrics")
    assert response is not None
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse_metrics(response.text)


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over every series whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)
