"""Live videos on the coordinator: RTMP publish and pull, chunk updates, HLS over HTTP, the end of a live.

Real coordinator on loopback, real ffmpeg as publisher and as the runner's puller; the runner's protocol
side is `tests/support/live.LiveRunner`.
"""

from __future__ import annotations

import asyncio
import re
import time
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
from tuberunner.media.binaries import find_ffmpeg
from tuberunner.protocol.jobs import JobState, JobType

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
        str(find_ffmpeg()),
        "-v",
        "error",
        "-rw_timeout",
        "5000000",
        "-i",
        url,
        "-t",
        "0.2",
        "-f",
        "null",
        "-",
        stdin=asyncio.subprocess.DEVNULL,
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
        str(find_ffmpeg()), "-v", "quiet", "-f", "lavfi", "-i", "testsrc2", "-t", "1", "-f", "flv",
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
    assert runner.success_status == 204
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
    metrics = (await client.get("/metrics")).text
    assert 'tuberunner_coordinator_live_publishers_total{outcome="refused"} 1.0' in metrics
    assert 'tuberunner_coordinator_live_pulls_total{outcome="refused"} 2.0' in metrics
    assert 'tuberunner_coordinator_lives{state="ended"} 1.0' in metrics
    received = re.search(r"^tuberunner_coordinator_live_segments_received_total (\S+)$", metrics, re.M)
    assert received is not None
    assert float(received.group(1)) == len(runner.sent)
    lags = re.search(r"^tuberunner_coordinator_live_lag_seconds_count (\S+)$", metrics, re.M)
    assert lags is not None
    assert float(lags.group(1)) == len(runner.sent)
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


_SQLITE = pytest.mark.parametrize("database_url", [None])


@_SQLITE
async def test_lost_runner_is_replaced_and_the_playlist_goes_on(
    live_config: CoordinatorConfig, tmp_path: Path
) -> None:
    """The holder stops updating: its 2 s lease expires, a new job takes the live over, the old pull is
    cut when the new one is accepted, and viewers get one playlist: sequence numbers only go up, names are
    never reused, a discontinuity marks the change."""
    config = replace(live_config, lease_s={JobType.LIVE_RTMP_HLS: 2.0})
    async with (
        serve_coordinator(config) as running,
        httpx.AsyncClient(base_url=running.url, timeout=10) as client,
    ):
        created = await create_live(client, resolutions="240")
        video_uuid = created["video"]["uuid"]
        first_token = await register_runner(client, "first")
        second_token = await register_runner(client, "second")
        async with publishing(_publish_url(created), 9) as publisher:
            first = LiveRunner(client, first_token, tmp_path / "first")
            await first.accept((await request_live_job(client, first_token))["uuid"])
            first_running = asyncio.create_task(first.run())
            await wait_for(lambda: _listed(first, 2), 10, "two segments from the first runner")
            # The first runner hangs: its ffmpeg goes on pulling, but nothing reaches the coordinator.
            first.paused = True
            second = LiveRunner(client, second_token, tmp_path / "second")
            offered = await request_live_job(client, second_token, timeout_s=10)
            assert offered["uuid"] != first.job["uuid"]
            await second.accept(offered["uuid"])
            second_running = asyncio.create_task(second.run())
            # The new acceptance cuts the old pull.
            await asyncio.wait_for(first_running, 3)
            late = await first.update("0-000099.ts", chunk_bytes=b"late")
            assert late.status_code == 404
            await asyncio.wait_for(publisher.wait(), 20)
            await asyncio.wait_for(second_running, 20)
        assert second.success_status == 204

        ended = await wait_for(lambda: _state(client, video_uuid, "ended"), 10, "the live to end")
        states = [(j["uuid"], j["state"]["label"]) for j in ended["jobs"]["list"]]
        assert states == [(first.job["uuid"], "Errored"), (second.job["uuid"], "Completed")]
        assert ended["live"]["session"] == 1
        playlist = (await client.get(ended["live"]["hlsUrl"].rsplit("/", 1)[0] + "/0.m3u8")).text
        names = [line for line in playlist.splitlines() if line.endswith(".ts")]
        assert len(names) == len(set(names))
        assert all(name.startswith("2-") for name in names[-len(second.sent[-4:]) :])
        state = running.coordinator.live.files.state(video_uuid)
        assert state is not None
        rendition = state.renditions["0.m3u8"]
        assert rendition.total == len(first.sent) + len(second.sent)
        assert rendition.sequence == rendition.total - len(rendition.segments)
        # One discontinuity: tagged in the window, or counted by EXT-X-DISCONTINUITY-SEQUENCE once it left.
        in_window = sum(s.discontinuity for s in rendition.segments)
        assert rendition.discontinuity_sequence + in_window == 1
        assert ("#EXT-X-DISCONTINUITY\n" in playlist) == bool(in_window)
        assert f"#EXT-X-DISCONTINUITY-SEQUENCE:{rendition.discontinuity_sequence}" in playlist


async def _listed(runner: LiveRunner, count: int) -> bool:
    return len(runner.sent) >= count


@_SQLITE
async def test_publisher_killed_ends_the_live_after_its_grace(
    live_coordinator: RunningCoordinator, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    created = await create_live(client, resolutions="240")
    video_uuid = created["video"]["uuid"]
    token = await register_runner(client, "runner")
    runner = LiveRunner(client, token, tmp_path / "runner")
    async with publishing(_publish_url(created), 30) as publisher:
        await runner.accept((await request_live_job(client, token))["uuid"])
        running = asyncio.create_task(runner.run())
        await wait_for(lambda: _listed(runner, 2), 10, "two segments")
        publisher.kill()
        killed_at = asyncio.get_running_loop().time()
        # The runner's input ends with the publisher: it delivers what it has, then `success`.
        await asyncio.wait_for(running, 10)
    assert runner.success_status == 204
    ended = await wait_for(lambda: _state(client, video_uuid, "ended"), 10, "the live to end")
    assert asyncio.get_running_loop().time() - killed_at < 6
    assert [j["state"]["label"] for j in ended["jobs"]["list"]] == ["Completed"]
    playlist = (await client.get(ended["live"]["hlsUrl"].rsplit("/", 1)[0] + "/0.m3u8")).text
    assert playlist.splitlines()[-2] == f"1-{runner.sent[-1]}"
    assert playlist.rstrip().endswith("#EXT-X-ENDLIST")


@_SQLITE
async def test_a_job_failing_after_its_publisher_dropped_is_one_failure_and_the_grace_holds(
    live_config: CoordinatorConfig, tmp_path: Path
) -> None:
    """The publisher drops while the runner has not started pulling; the runner reports that it cannot read
    the stream. That is one failed job: the session still waits its reconnect grace for the publisher, then
    ends without an error (the failure used to be counted again at every check of the watch loop, and the
    live ended as "5 live jobs in a row failed" within 2.5 s, refusing a publisher back in time)."""
    config = replace(live_config, live_reconnect_grace_s=6.0)
    async with (
        serve_coordinator(config) as running,
        httpx.AsyncClient(base_url=running.url, timeout=10) as client,
    ):
        created = await create_live(client, resolutions="240")
        video_uuid = created["video"]["uuid"]
        token = await register_runner(client, "runner")
        runner = LiveRunner(client, token, tmp_path / "runner")
        async with publishing(_publish_url(created), 30) as publisher:
            job = await runner.accept((await request_live_job(client, token))["uuid"])
            publisher.kill()
            dropped_at = time.time()

        async def publisher_gone() -> bool:
            return not (await live_of(client, video_uuid))["publisherConnected"]

        await wait_for(publisher_gone, 5, "the coordinator to see the publisher leave")
        failed = await client.post(
            f"{RUNNERS}/jobs/{job['uuid']}/error",
            json={**runner.tokens, "message": "Cannot read the live stream: no publisher"},
        )
        assert failed.status_code == 204
        ended = await wait_for(lambda: _state(client, video_uuid, "ended"), 15, "the live to end")
    assert ended["live"]["error"] is None
    assert ended["live"]["endedAt"] - dropped_at >= config.live_reconnect_grace_s - 0.5
    assert [(j["state"]["label"], j["error"]) for j in ended["jobs"]["list"]] == [
        ("Errored", "Cannot read the live stream: no publisher")
    ]


@_SQLITE
async def test_coordinator_restart_mid_live_continues_the_session(
    live_config: CoordinatorConfig, tmp_path: Path
) -> None:
    """The coordinator stops while a live runs: its publisher and the runner's pull are cut. Started again,
    it waits `live_reconnect_grace_s` for the publisher; the publisher comes back, the stale job's lease
    expires, a new job continues the same session and its playlists."""
    from tests.support.servers import free_port

    config = replace(
        live_config,
        rtmp_port=free_port(),
        live_reconnect_grace_s=8.0,
        lease_s={JobType.LIVE_RTMP_HLS: 2.0},
        restart_grace_s=2.0,  # the stale job's lease after the restart
    )
    async with (
        serve_coordinator(config) as running,
        httpx.AsyncClient(base_url=running.url, timeout=10) as client,
    ):
        created = await create_live(client, resolutions="240")
        token = await register_runner(client, "runner")
        first = LiveRunner(client, token, tmp_path / "first")
        async with publishing(_publish_url(created), 30) as publisher:
            await first.accept((await request_live_job(client, token))["uuid"])
            first_running = asyncio.create_task(first.run())
            await wait_for(lambda: _listed(first, 2), 10, "two segments")
            first.paused = True
    assert publisher.returncode is not None
    await asyncio.wait_for(first_running, 10)  # its input ended with the coordinator

    video_uuid = created["video"]["uuid"]
    async with (
        serve_coordinator(config) as running,
        httpx.AsyncClient(base_url=running.url, timeout=10) as client,
    ):
        assert (await live_of(client, video_uuid))["state"] == "live"
        second = LiveRunner(client, token, tmp_path / "second")
        async with publishing(_publish_url(created), 5) as publisher:
            await second.accept((await request_live_job(client, token))["uuid"])
            await asyncio.wait_for(second.run(), 20)
            await asyncio.wait_for(publisher.wait(), 10)
        ended = await wait_for(lambda: _state(client, video_uuid, "ended"), 10, "the live to end")
        assert ended["live"]["session"] == 1
        assert [j["state"]["label"] for j in ended["jobs"]["list"]] == ["Errored", "Completed"]
        state = running.coordinator.live.files.state(video_uuid)
        assert state is not None
        rendition = state.renditions["0.m3u8"]
        assert rendition.total == len(first.sent) + len(second.sent)
        attempts = [s.attempt for s in rendition.segments]
        assert attempts[-1] == 2
        assert rendition.discontinuity_sequence + sum(s.discontinuity for s in rendition.segments) == 1


@_SQLITE
async def test_cancelled_job_or_deleted_video_ends_the_live_and_cuts_the_publisher(
    live_coordinator: RunningCoordinator, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    token = await register_runner(client, "runner")
    cancelled = await create_live(client, "cancelled", resolutions="240")
    async with publishing(_publish_url(cancelled), 30) as publisher:
        offered = await request_live_job(client, token)
        answer = await client.post(f"{RUNNERS}/jobs/{offered['uuid']}/cancel", headers=admin_headers())
        assert answer.status_code == 204
        assert await asyncio.wait_for(publisher.wait(), 3) != 0
    ended = await wait_for(lambda: _state(client, cancelled["video"]["uuid"], "ended"), 5, "the end")
    assert ended["live"]["error"] == "the live job was cancelled"

    deleted = await create_live(client, "deleted", resolutions="240")
    runner = LiveRunner(client, token, tmp_path / "runner")
    async with publishing(_publish_url(deleted), 30) as publisher:
        await runner.accept((await request_live_job(client, token))["uuid"])
        running = asyncio.create_task(runner.run())
        await wait_for(lambda: _listed(runner, 1), 10, "a segment")
        await _refused_updates(runner)
        answer = await client.delete(f"/api/v1/videos/{deleted['video']['uuid']}", headers=admin_headers())
        assert answer.status_code == 204
        assert await asyncio.wait_for(publisher.wait(), 3) != 0
        await asyncio.wait_for(running, 5)  # the pull was cut too
    # Its next call learnt that the job is gone.
    assert runner.success_status == 404 or runner.answers[-1:] == [404]
    assert not live_coordinator.coordinator.live.sessions


async def _refused_updates(runner: LiveRunner) -> None:
    """PeerTube's payload checks (checklist 65), and ours on content."""
    playlist = "#EXTM3U\n#EXTINF:1.0,\n0-000000.ts\n"
    bad = [
        await runner.update("0-000100.ts", kind="toto", chunk_bytes=b"x"),
        await runner.update("0-000100.TS", chunk_bytes=b"x"),
        await runner.update("0-000100.ts"),
        await runner.update("0-000100.ts", chunk_bytes=b"x", playlist=("coucou/hello", playlist)),
        await runner.update("0-000100.ts", chunk_bytes=b"x", playlist=("hello", playlist)),
        await runner.update("0-000100.ts", chunk_bytes=b"x", master=playlist),
        await runner.update("0-000100.ts", chunk_bytes=b"x", playlist=("0.m3u8", "not a playlist")),
        await runner.update("0-000100.ts", chunk_bytes=b"x", playlist=("master.m3u8", playlist)),
    ]
    assert [r.status_code for r in bad] == [400] * len(bad)
    assert all(r.json()["detail"].startswith("Payload is invalid") for r in bad)
    runner.answers.clear()


@_SQLITE
async def test_save_replay_makes_a_video_with_its_jobs(
    live_coordinator: RunningCoordinator, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    created = await create_live(client, "with replay", resolutions="240", saveReplay=True)
    token = await register_runner(client, "runner")
    runner = LiveRunner(client, token, tmp_path / "runner")
    async with publishing(_publish_url(created), 4) as publisher:
        await runner.accept((await request_live_job(client, token))["uuid"])
        await asyncio.wait_for(runner.run(), 20)
        await publisher.wait()
    ended = await wait_for(lambda: _state(client, created["video"]["uuid"], "ended"), 10, "the end")
    await live_coordinator.coordinator.live.wait_replays()
    replays = (await live_of(client, created["video"]["uuid"]))["replays"]
    assert len(replays) == 1
    replay = (await client.get(f"/api/v1/videos/{replays[0]}", headers=admin_headers())).json()
    assert replay["name"].startswith("with replay (replay ")
    assert replay["state"] == "processing"
    assert 3.5 <= replay["source"]["durationS"] <= 4.6
    kinds = sorted({j["type"] for j in replay["jobs"]["list"]})
    assert kinds == ["generate-video-storyboard", "vod-hls-transcoding", "vod-web-video-transcoding"]
    assert ended["live"]["replays"] == [] or ended["live"]["replays"] == replays
    assert not list(live_coordinator.coordinator.live.files.folder(created["video"]["uuid"]).glob("*.flv"))


@_SQLITE
async def test_cli_live_create_and_status(
    live_coordinator: RunningCoordinator, coordinator_config: CoordinatorConfig
) -> None:
    """`coordinator live create` prints the RTMP URL and stream key, the video id last (`--json`: PeerTube's
    names); `coordinator status` shows the live's state and URL; a coordinator with live off says so."""
    import json

    from typer.testing import CliRunner

    from tests.support.servers import ADMIN_TOKEN
    from tuberunner.cli import app

    env = {"TUBERUNNER_ADMIN_TOKEN": ADMIN_TOKEN}

    def run(*args: str) -> Any:
        return CliRunner().invoke(app, list(args), env=env)

    url = live_coordinator.url
    as_json = await asyncio.to_thread(
        run, "coordinator", "live", "create", "cli show", "--url", url, "--json"
    )
    assert as_json.exit_code == 0, as_json.output
    created = json.loads(as_json.stdout)
    assert set(created) == {"rtmpUrl", "streamKey", "uuid"}
    assert created["rtmpUrl"].startswith("rtmp://127.0.0.1:")
    plain = await asyncio.to_thread(
        run, "coordinator", "live", "create", "other", "--url", url, "--resolutions", "480,240", "--permanent"
    )
    assert plain.exit_code == 0, plain.output
    lines = plain.stdout.strip().splitlines()
    assert lines[0].startswith("RTMP URL:   rtmp://")
    assert re.fullmatch(r"stream key: [0-9a-f-]{36}", lines[1])
    status = await asyncio.to_thread(run, "coordinator", "status", lines[-1], "--url", url)
    assert status.exit_code == 0, status.output
    assert f"{lines[-1]}  'other'  waiting" in status.output
    assert f"live HLS: {url}/static/streaming-playlists/hls/{lines[-1]}/master.m3u8" in status.output

    async with serve_coordinator(replace(coordinator_config, rtmp_port=0)) as live_off:
        off = await asyncio.to_thread(run, "coordinator", "live", "create", "x", "--url", live_off.url)
    assert off.exit_code == 1
    assert "Live is off on this coordinator" in off.output


@_SQLITE
async def test_a_permanent_live_waits_for_its_next_session_which_starts_afresh(
    live_coordinator: RunningCoordinator, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    created = await create_live(client, resolutions="240", permanentLive=True)
    video_uuid = created["video"]["uuid"]
    token = await register_runner(client, "runner")
    sessions: list[LiveRunner] = []
    for number in (1, 2):
        runner = LiveRunner(client, token, tmp_path / f"runner-{number}")
        sessions.append(runner)
        async with publishing(_publish_url(created), 3) as publisher:
            await runner.accept((await request_live_job(client, token))["uuid"])
            await asyncio.wait_for(runner.run(), 20)
            await publisher.wait()
        waiting = await wait_for(lambda: _state(client, video_uuid, "waiting"), 10, "the live to wait again")
        assert waiting["live"]["session"] == number
        playlist = (await client.get(created["live"]["hlsUrl"].rsplit("/", 1)[0] + "/0.m3u8")).text
        listed = [line for line in playlist.splitlines() if line.endswith(".ts")]
        # Session 2's playlists hold only its own segments, named apart from session 1's.
        assert listed == [f"{number}-{name}" for name in runner.sent[-4:]]
        assert playlist.rstrip().endswith("#EXT-X-ENDLIST")
    first_names = {f"1-{n}" for n in sessions[0].sent}
    assert not list(live_coordinator.coordinator.live.files.folder(video_uuid).glob("1-*.ts"))
    assert first_names.isdisjoint({f"2-{n}" for n in sessions[1].sent})


async def test_a_bare_update_is_a_live_heartbeat_and_says_when_the_live_is_not_ours(
    live_config: CoordinatorConfig, tmp_path: Path
) -> None:
    """Our extension (our runner sends it only to a coordinator that pushes take-backs): an update with no
    payload renews a live job's lease before its first segment, and answers what a segment's would."""
    config = replace(live_config, lease_s={JobType.LIVE_RTMP_HLS: 2.0})
    async with (
        serve_coordinator(config) as running,
        httpx.AsyncClient(base_url=running.url, timeout=10) as client,
    ):
        created = await create_live(client, "heartbeat", resolutions="240")
        token = await register_runner(client, "live-runner")
        async with publishing(_publish_url(created), 30):
            runner = LiveRunner(client, token, tmp_path / "runner")
            job = await runner.accept((await request_live_job(client, token))["uuid"])
            url = f"{RUNNERS}/jobs/{job['uuid']}/update"
            for _ in range(8):  # 4 s of bare heartbeats, twice the lease: the job is still held
                assert (await client.post(url, json=runner.tokens)).status_code == 204
                await asyncio.sleep(0.5)
            row = await running.coordinator.jobs.get(job["uuid"])
            assert row is not None
            assert row.state == JobState.PROCESSING
            cancelled = await client.post(f"{RUNNERS}/jobs/{job['uuid']}/cancel", headers=admin_headers())
            assert cancelled.status_code == 204
            assert (await client.post(url, json=runner.tokens)).status_code == 404
