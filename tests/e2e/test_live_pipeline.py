"""Lives end to end: real ffmpeg publishes a stream with its frame number burnt in (a bar code) to the
coordinator's RTMP server, our runner transcodes it to two renditions, the test reads the live HLS over HTTP
as a viewer does while the stream runs. Then the faults: publisher killed, runner SIGKILLed mid-live, job
cancelled and video deleted, a live taken while every VOD slot is busy.

Skipped, with the reason, in a tree whose runner has no live processor."""

from __future__ import annotations

import asyncio
import re
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import (
    ADMIN,
    Media,
    ProcessWatch,
    StartRunner,
    daemon_env,
    ffmpeg_pids,
    ffmpeg_pids_in,
    job_row,
    register,
    register_daemon,
    seed_transcode,
    start_daemon,
    stop_daemon,
)
from tests.support.live import create_live, wait_for
from tests.support.servers import RunningCoordinator
from tuberunner.media.binaries import find_ffmpeg
from tuberunner.protocol.jobs import JobState, JobType
from tuberunner.runner.processors import PROCESSORS

pytestmark = [
    pytest.mark.skipif(
        JobType.LIVE_RTMP_HLS not in PROCESSORS, reason="the runner of this tree has no live processor"
    ),
    pytest.mark.timeout(120),
]

FPS = 25
SEGMENT_S = 2.0
LIVE = {
    "rtmp_port": None,
    "live_segment_duration_s": SEGMENT_S,
    "live_segment_list_size": 10,
    "live_reconnect_grace_s": 2.0,
}
live_coordinator = pytest.mark.parametrize("coordinator_config", [LIVE], indirect=True)


def _publish_args(url: str, seconds: float, gop: int) -> list[str]:
    """320x240 with the frame counter, a keyframe every `gop` frames (a whole stream's worth: the GOP the
    coordinator keeps for a joining runner starts at frame 0)."""
    from tuberunner.media.samples import frame_counter_filter

    return [
        str(find_ffmpeg()), "-hide_banner", "-loglevel", "error", "-re",
        "-f", "lavfi", "-i", f"testsrc2=size=320x240:rate={FPS}",
        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100",
        "-t", str(seconds), "-vf", frame_counter_filter(),
        "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency",
        "-g", str(gop), "-sc_threshold", "0",
        "-c:a", "aac", "-f", "flv", url,
    ]  # fmt: skip


@dataclass
class Publisher:
    process: asyncio.subprocess.Process
    started_at: float  # wall clock


async def publish(url: str, seconds: float, gop: int = 1000) -> Publisher:
    process = await asyncio.create_subprocess_exec(
        *_publish_args(url, seconds, gop), stdin=asyncio.subprocess.DEVNULL
    )
    return Publisher(process, time.time())


@dataclass
class Viewer:
    """Reads the live HLS every 250 ms as a player does; keeps every segment of every rendition."""

    http: httpx.AsyncClient
    hls_url: str
    started_at: float
    first_segment_s: dict[str, float] = field(default_factory=dict)
    segments: dict[str, dict[int, str]] = field(default_factory=dict)
    data: dict[str, bytes] = field(default_factory=dict)
    lags_s: list[float] = field(default_factory=list)
    video_playlists: set[str] = field(default_factory=set)
    ended: set[str] = field(default_factory=set)

    @property
    def base(self) -> str:
        return self.hls_url.rsplit("/", 1)[0]

    async def run(self) -> None:
        master: str | None = None
        while True:
            if master is None:
                answer = await self.http.get(self.hls_url)
                if answer.status_code == 200:
                    master = answer.text
                    self.video_playlists = {
                        line
                        for line in master.splitlines()
                        if line.endswith(".m3u8") and not line.startswith("#")
                    }
            if master is not None:
                names = self.video_playlists | set(re.findall(r'URI="([^"]+)"', master))
                for name in sorted(names):
                    await self._read(name)
                if names and self.ended >= names:
                    return
            await asyncio.sleep(0.25)

    async def _read(self, name: str) -> None:
        answer = await self.http.get(f"{self.base}/{name}")
        assert answer.status_code == 200, (name, answer.status_code)
        assert answer.headers["cache-control"] == "no-cache"
        text = answer.text
        sequence = int(re.search(r"#EXT-X-MEDIA-SEQUENCE:(\d+)", text).group(1))  # type: ignore[union-attr]
        listed = [line for line in text.splitlines() if line.endswith(".ts")]
        known = self.segments.setdefault(name, {})
        new = []
        for index, segment in enumerate(listed):
            number = sequence + index
            # A sequence number always names the same segment.
            assert known.setdefault(number, segment) == segment, (name, number)
            if segment not in self.data:
                fetched = await self.http.get(f"{self.base}/{segment}")
                assert fetched.status_code == 200, segment
                self.data[segment] = fetched.content
                new.append(segment)
        if listed and name not in self.first_segment_s:
            self.first_segment_s[name] = time.time() - self.started_at
        if new and name in self.video_playlists:
            # Lag: now minus the stream time of the end of the newest segment (its last frame's number).
            frames = await _counters([self.data[new[-1]]])
            self.lags_s.append(time.time() - (self.started_at + (frames[-1] + 1) / FPS))
        if "#EXT-X-ENDLIST" in text:
            self.ended.add(name)

    def numbers(self, name: str) -> list[int]:
        return sorted(self.segments.get(name, {}))

    async def frames(self, name: str) -> list[int]:
        ordered = [self.segments[name][n] for n in self.numbers(name)]
        return await _counters([self.data[s] for s in ordered])


async def _counters(segments: list[bytes]) -> list[int]:
    from tuberunner.media.samples import frame_counters

    return await frame_counters(find_ffmpeg(), segments)


async def _state(http: httpx.AsyncClient, video_uuid: str) -> dict[str, Any]:
    answer = await http.get(f"/api/v1/videos/{video_uuid}", headers=ADMIN)
    answer.raise_for_status()
    found: dict[str, Any] = answer.json()
    return found


async def _live_job(running: RunningCoordinator, video_uuid: str, timeout_s: float = 20) -> str:
    async def created() -> str | None:
        live = await running.coordinator.live.by_video_uuid(video_uuid)
        return live.job_uuid if live is not None else None

    found: str = await wait_for(created, timeout_s, "the live job")
    return found


@live_coordinator
async def test_our_runner_transcodes_a_live_viewers_get_every_frame_in_time(
    coordinator: RunningCoordinator, start_runner: StartRunner
) -> None:
    runner = await start_runner([await register(coordinator.url, "live-runner")])
    async with httpx.AsyncClient(base_url=coordinator.url, timeout=10) as http:
        created = await create_live(http, "counter", resolutions="240,144")
        live = created["live"]
        publisher = await publish(f"{live['rtmpUrl']}/{live['streamKey']}", 12)
        viewer = Viewer(http, live["hlsUrl"], publisher.started_at)
        watching = asyncio.create_task(viewer.run())
        assert await asyncio.wait_for(publisher.process.wait(), 30) == 0
        published_at = time.monotonic()
        await asyncio.wait_for(watching, 30)
        state = await wait_for(
            lambda: _ended(http, created["video"]["uuid"]), 10 - (time.monotonic() - published_at), "ended"
        )

    assert [j["state"]["label"] for j in state["jobs"]["list"]] == ["Completed"]
    assert len(viewer.video_playlists) == 2
    for name in viewer.segments:
        numbers = viewer.numbers(name)
        assert numbers == list(range(numbers[0], numbers[-1] + 1)), f"{name}: sequence gap"
        assert viewer.first_segment_s[name] <= 8.0, viewer.first_segment_s
    for name in viewer.video_playlists:
        assert await viewer.frames(name) == list(range(12 * FPS)), f"{name}: frames lost or repeated"
    assert statistics.median(viewer.lags_s) <= 3.5, viewer.lags_s
    assert max(viewer.lags_s) <= 6.0, viewer.lags_s
    runner.assert_idle_and_clean()


async def _ended(http: httpx.AsyncClient, video_uuid: str) -> dict[str, Any] | None:
    state = await _state(http, video_uuid)
    return state if state["state"] == "ended" else None


@live_coordinator
async def test_publisher_killed_the_runner_delivers_what_it_had_and_the_live_ends(
    coordinator: RunningCoordinator, start_runner: StartRunner
) -> None:
    runner = await start_runner([await register(coordinator.url, "live-runner")])
    async with httpx.AsyncClient(base_url=coordinator.url, timeout=10) as http:
        created = await create_live(http, "killed", resolutions="240")
        live = created["live"]
        publisher = await publish(f"{live['rtmpUrl']}/{live['streamKey']}", 60)
        viewer = Viewer(http, live["hlsUrl"], publisher.started_at)
        watching = asyncio.create_task(viewer.run())

        async def segments() -> bool:
            return sum(len(s) for s in viewer.segments.values()) >= 6

        await wait_for(segments, 30, "segments")
        publisher.process.kill()
        await publisher.process.wait()
        await asyncio.wait_for(watching, 20)
        state = await wait_for(lambda: _ended(http, created["video"]["uuid"]), 15, "the live to end")
    assert [j["state"]["label"] for j in state["jobs"]["list"]] == ["Completed"]
    (video,) = viewer.video_playlists
    frames = await viewer.frames(video)
    assert frames == list(range(len(frames)))  # from the first frame on, no hole
    runner.assert_idle_and_clean()


@pytest.mark.parametrize(
    "coordinator_config", [{**LIVE, "lease_s": {JobType.LIVE_RTMP_HLS: 3.0}}], indirect=True
)
async def test_runner_sigkilled_mid_live_another_runner_resumes_it_and_players_keep_one_playlist(
    coordinator: RunningCoordinator, start_runner: StartRunner, tmp_path: Path
) -> None:
    """The live lease (3 s here, 30 s by default) takes the dead runner's job back; a new job continues the
    session; the playlists go on after a discontinuity, their sequence numbers never going back."""
    env = daemon_env(tmp_path / "daemon", TUBERUNNER_JOBS_UPDATE_INTERVAL_S="0.5")
    await register_daemon(env, coordinator.url, "doomed")
    daemon = await start_daemon(env, tmp_path / "daemon.log")
    try:
        async with httpx.AsyncClient(base_url=coordinator.url, timeout=10) as http:
            created = await create_live(http, "resumed", resolutions="240")
            live = created["live"]
            video_uuid = created["video"]["uuid"]
            publisher = await publish(f"{live['rtmpUrl']}/{live['streamKey']}", 30, gop=2 * FPS)
            viewer = Viewer(http, live["hlsUrl"], publisher.started_at)
            watching = asyncio.create_task(viewer.run())

            async def three() -> bool:
                return any(len(s) >= 3 for s in viewer.segments.values())

            await wait_for(three, 30, "segments from the first runner")
            first_job = await _live_job(coordinator, video_uuid)
            doomed_ffmpeg = ffmpeg_pids_in(tmp_path / "daemon")
            daemon.send_signal(signal.SIGKILL)
            await daemon.wait()
            for pid in doomed_ffmpeg:  # it dies with its runner (PR_SET_PDEATHSIG)
                await ProcessWatch(pid).ended(5)
            rescuer = await start_runner([await register(coordinator.url, "rescuer")])

            async def replaced() -> str | None:
                job = await _live_job(coordinator, video_uuid)
                return job if job != first_job else None

            await wait_for(replaced, 20, "a new live job")
            assert await asyncio.wait_for(publisher.process.wait(), 40) == 0
            await asyncio.wait_for(watching, 30)
            state = await wait_for(lambda: _ended(http, video_uuid), 15, "the live to end")
    finally:
        await stop_daemon(daemon)
    jobs = state["jobs"]["list"]
    assert [(j["state"]["label"], j["error"]) for j in jobs] == [
        ("Errored", "Stalled runner job"),
        ("Completed", None),
    ]
    (video,) = viewer.video_playlists
    numbers = viewer.numbers(video)
    assert numbers == list(range(numbers[0], numbers[-1] + 1))
    names = [viewer.segments[video][n] for n in numbers]
    assert len(set(names)) == len(names)
    assert names[0].startswith("1-")
    assert names[-1].startswith("2-")
    # Each job's segments hold consecutive frames; the second starts at the keyframe the coordinator kept
    # (up to one GOP its predecessor had already sent) and goes on to the last frame of the stream.
    by_job = [
        await _counters([viewer.data[name] for name in names if name.startswith(prefix)])
        for prefix in ("1-", "2-")
    ]
    for frames in by_job:
        assert frames == list(range(frames[0], frames[0] + len(frames)))
    first, second = by_job
    # What was streamed between the kill and the rescuer's join is lost: the 3 s lease, a new job, a runner
    # accepting it and starting its ffmpeg (seconds on a loaded machine).
    assert first[0] < second[0] <= first[-1] + 10 * FPS
    assert second[-1] == 30 * FPS - 1
    rescuer.assert_idle_and_clean()


@live_coordinator
async def test_cancelling_the_job_or_deleting_the_video_stops_ffmpeg_within_a_second(
    coordinator: RunningCoordinator, start_runner: StartRunner
) -> None:
    runner = await start_runner([await register(coordinator.url, "live-runner")])
    async with httpx.AsyncClient(base_url=coordinator.url, timeout=10) as http:
        for how in ("cancel", "delete"):
            created = await create_live(http, how, resolutions="240")
            live = created["live"]
            publisher = await publish(f"{live['rtmpUrl']}/{live['streamKey']}", 60)
            job_uuid = await _live_job(coordinator, created["video"]["uuid"])

            def runners_ffmpeg(publisher: Publisher = publisher) -> list[int]:
                return [pid for pid in ffmpeg_pids() if pid != publisher.process.pid]

            async def transcoding(job_uuid: str = job_uuid) -> bool:
                job = await job_row(coordinator, job_uuid)
                return bool(job and job.state == JobState.PROCESSING and runners_ffmpeg())

            await wait_for(transcoding, 30, "the runner's ffmpeg")
            await asyncio.sleep(1)  # a segment or so
            (pid,) = runners_ffmpeg()
            watch = ProcessWatch(pid)
            asked = time.monotonic()
            if how == "cancel":
                answer = await http.post(f"/api/v1/runners/jobs/{job_uuid}/cancel", headers=ADMIN)
            else:
                answer = await http.delete(f"/api/v1/videos/{created['video']['uuid']}", headers=ADMIN)
            assert answer.status_code == 204
            assert await watch.ended(5) - asked <= 1.0, how
            assert await asyncio.wait_for(publisher.process.wait(), 5) != 0  # the publisher is cut too
    await runner.wait_for(lambda: not runner.supervisor.jobs, 10)
    runner.assert_idle_and_clean()


@live_coordinator
async def test_a_live_is_taken_while_every_vod_slot_is_busy(
    coordinator: RunningCoordinator, start_runner: StartRunner, media: Media
) -> None:
    runner = await start_runner([await register(coordinator.url, "busy")], concurrency=1)
    vod_job = await seed_transcode(coordinator, media.long, resolution=720)
    await runner.running(vod_job)
    async with httpx.AsyncClient(base_url=coordinator.url, timeout=10) as http:
        created = await create_live(http, "while busy", resolutions="240")
        live = created["live"]
        publisher = await publish(f"{live['rtmpUrl']}/{live['streamKey']}", 6)
        job_uuid = await _live_job(coordinator, created["video"]["uuid"])

        async def taken() -> bool:
            job = await job_row(coordinator, job_uuid)
            return bool(job and job.state != JobState.PENDING)

        await wait_for(taken, 10, "the live job to be taken")
        vod = await job_row(coordinator, vod_job)
        assert vod is not None
        assert vod.state == JobState.PROCESSING
        await asyncio.wait_for(publisher.process.wait(), 20)
        await wait_for(lambda: _ended(http, created["video"]["uuid"]), 15, "the live to end")
