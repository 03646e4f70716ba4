"""Live videos on the coordinator: RTMP publish and pull, chunk updates, HLS over HTTP, the end of a live.

Real coordinator on loopback, real ffmpeg as publisher and as the runner's puller; the runner's protocol
side is `tests/support/live.LiveRunner`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.live import (
    LiveRunner,
    create_live,
    live_of,
    publishing,
    request_live_job,
    wait_for,
)
from tests.support.protocol import RUNNERS, admin_headers, register_runner
from tests.support.servers import RunningCoordinator, serve_coordinator
from tuberunner.coordinator.config import CoordinatorConfig
from tuberunner.protocol.jobs import JobType

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def live_config(coordinator_config: CoordinatorConfig) -> CoordinatorConfig:
    return replace(
        coordinator_config,
        rtmp_port=None,
        live_segment_duration_s=1.0,
        live_segment_list_size=4,
        live_reconnect_grace_s=1.0,
    )


@pytest.fixture
async def live_coordinator(live_config: CoordinatorConfig) -> AsyncIterator[RunningCoordinator]:
    async with serve_coordinator(live_config) as running:
        yield running


@pytest.fixture
async def client(live_coordinator: RunningCoordinator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=live_coordinator.url, timeout=10) as http:
        yield http


def _publish_url(created: dict[str, Any]) -> str:
    return f"{created['live']['rtmpUrl']}/{created['live']['streamKey']}"


async def _probe(url: str) -> int:
    probe = await asyncio.create_subprocess_exec(
        "ffprobe", "-v", "error", "-rw_timeout", "5000000", "-i", url, stdin=asyncio.subprocess.DEVNULL
    )
    return await asyncio.wait_for(probe.wait(), 20)


async def test_live_from_publish_to_end(
    live_coordinator: RunningCoordinator, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    relay = live_coordinator.coordinator.live.relay
    assert relay is not None
    created = await create_live(client, "show", resolutions="240")
    video_uuid = created["video"]["uuid"]
    assert created["live"]["state"] == "waiting"

    wrong = await asyncio.create_subprocess_exec(
        "ffmpeg", "-v", "quiet", "-f", "lavfi", "-i", "testsrc2", "-t", "1", "-f", "flv",
        f"{created['live']['rtmpUrl']}/not-the-key", stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert await asyncio.wait_for(wrong.wait(), 20) != 0
    assert relay.counters.publishers_refused == 1

    token = await register_runner(client, "live-runner")
    async with publishing(_publish_url(created), 6) as publisher:
        offered = await request_live_job(client, token)
        assert offered["type"] == str(JobType.LIVE_RTMP_HLS)
        output = offered["payload"]["output"]
        assert output["toTranscode"] == [{"resolution": 240, "fps": 25}]
        assert output["segmentDuration"] == 1
        assert output["segmentListSize"] == 4
        assert (await live_of(client, video_uuid))["state"] == "live"

        runner = LiveRunner(client, token, tmp_path / "runner")
        job = await runner.accept(offered["uuid"])
        pull = job["payload"]["input"]["rtmpUrl"]
        assert re.search(rf"/live/{job['uuid']}-[0-9a-f]{{32}}$", pull)
        # Only this acceptance's secret plays the stream.
        assert await _probe(pull[:-4] + "0000") != 0
        assert await _probe(offered["payload"]["input"]["rtmpUrl"]) != 0

        running = asyncio.create_task(runner.run())
        hls = created["live"]["hlsUrl"]
        master = await wait_for(lambda: _ok(client, hls), 15, "the master playlist")
        assert master.headers["cache-control"] == "no-cache"
        playlist_url = hls.rsplit("/", 1)[0] + "/0.m3u8"
        playlist = await client.get(playlist_url)
        assert playlist.headers["cache-control"] == "no-cache"
        segment = next(line for line in playlist.text.splitlines() if line.endswith(".ts"))
        served = await client.get(hls.rsplit("/", 1)[0] + "/" + segment)
        assert served.status_code == 200
        assert served.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert served.content == (runner.work / segment.split("-", 1)[1]).read_bytes()
        await asyncio.wait_for(publisher.wait(), 20)
        await asyncio.wait_for(running, 20)

    assert set(runner.answers) == {204}
    assert len(runner.sent) >= 3
    ended = await wait_for(lambda: _state(client, video_uuid, "ended"), 10, "the live to end")
    assert ended["live"]["error"] is None
    final = (await client.get(playlist_url)).text
    assert final.rstrip().endswith("#EXT-X-ENDLIST")
    assert "#EXT-X-DISCONTINUITY\n" not in final
    listed = [line for line in final.splitlines() if line.endswith(".ts")]
    assert listed == [f"1-{name}" for name in runner.sent[-4:]]
    assert f"#EXT-X-MEDIA-SEQUENCE:{max(0, len(runner.sent) - 4)}" in final
    jobs = ended["jobs"]["list"]
    assert [(j["type"], j["state"]["label"]) for j in jobs] == [(str(JobType.LIVE_RTMP_HLS), "Completed")]
    # An ended (not permanent) live takes no publisher any more.
    async with publishing(_publish_url(created), 1) as again:
        assert await asyncio.wait_for(again.wait(), 20) != 0


async def _ok(client: httpx.AsyncClient, url: str) -> httpx.Response | None:
    response = await client.get(url)
    return response if response.status_code == 200 else None


async def _state(client: httpx.AsyncClient, video_uuid: str, state: str) -> dict[str, Any] | None:
    response = await client.get(f"/api/v1/videos/{video_uuid}", headers=admin_headers())
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body if body["state"] == state else None


__all__ = ["RUNNERS"]
