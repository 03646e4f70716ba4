"""The live processor's faults, in a real runner (supervisor, real processors, real ffmpeg) pulling real RTMP.

Server answers the coordinator cannot give at a chosen moment (PeerTube's "Session of this live ended", a
404 to a running job, 503s, answers slower than the window) come from `tests.support.live_server`, a small
PeerTube on loopback that checks each update it receives as a player would need it; connection resets go
through `TcpProxy`. The stall watchdog, the slots, the shutdown and the logs of a whole live are exercised
against the real coordinator and its RTMP server.

Video segments last 2 s whatever the job's segment duration: the live command puts a keyframe every 2 s of
the rendition's frame rate (PeerTube's live profile). Audio segments last the segment duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import ProcessWatch, ffmpeg_pids
from tests.runner.conftest import FAST, FakeProcessor, SupervisorHarness, job_of, register, seed_job
from tests.support.live import create_live, publishing, wait_for
from tests.support.live_server import Answer, LiveServer, Update, rtmp_relay, serving
from tests.support.servers import ADMIN_TOKEN, RunningCoordinator
from tests.support.tcp_proxy import Action, Direction, Plan, TcpProxy
from tuberunner import __version__
from tuberunner.coordinator.config import CoordinatorConfig
from tuberunner.media.binaries import find_ffmpeg
from tuberunner.media.live import MediaPlaylist
from tuberunner.protocol.jobs import JobState, JobType
from tuberunner.runner.config import InstanceConfig
from tuberunner.runner.job import ProcessingSettings, Processor
from tuberunner.runner.processors import PROCESSORS, supports
from tuberunner.runner.processors import live as live_processor
from tuberunner.runner.supervisor import Supervisor

pytestmark = pytest.mark.timeout(90)

VIDEO_SEGMENT_S = 2.0
VIDEO, AUDIO = "1.m3u8", "0.m3u8"  # one video rendition with audio: the audio playlist comes first

StartRunner = Callable[..., Awaitable[SupervisorHarness]]


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture
async def start_runner(tmp_path: Path) -> AsyncIterator[StartRunner]:
    """`await start_runner(instance, processors=..., **config_overrides)`: a supervisor with the real live
    processor and ffmpeg, one VOD slot and one live slot; stopped after the test, leaving no ffmpeg."""
    harnesses: list[SupervisorHarness] = []

    async def start(
        instance: InstanceConfig,
        *,
        processors: dict[JobType, Processor] | None = None,
        work_dir: Path | None = None,
        **overrides: Any,
    ) -> SupervisorHarness:
        config = replace(FAST, instances=(instance,), concurrency=1, live_concurrency=1, **overrides)
        supervisor = Supervisor(
            config,
            work_dir=work_dir or tmp_path / f"runner-{len(harnesses)}" / "jobs",
            processors=processors or PROCESSORS,
            supports=supports,
            settings=ProcessingSettings(ffmpeg=find_ffmpeg(), threads=1),
            version=__version__,
        )
        harness = SupervisorHarness(supervisor, asyncio.create_task(supervisor.run()))
        harnesses.append(harness)
        return harness

    yield start
    for harness in harnesses:
        harness.supervisor.request_stop()
    for harness in harnesses:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(harness.task, 30)
    leftovers = ffmpeg_pids()
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert leftovers == [], f"ffmpeg processes outlived their runner: {leftovers}"
    for harness in harnesses:
        assert list(harness.supervisor.work_dir.iterdir()) == []


@dataclass
class FakeLive:
    """A live job on `server`, its stream published to a real RTMP relay, and how the runner reaches it."""

    server: LiveServer
    publisher: asyncio.subprocess.Process
    instance: InstanceConfig
    proxy: TcpProxy | None

    def runner_ffmpeg(self) -> int:
        """The one ffmpeg of the runner (every ffmpeg child of this process but the publisher)."""
        (pid,) = [pid for pid in ffmpeg_pids() if pid != self.publisher.pid]
        return pid


@contextlib.asynccontextmanager
async def fake_live(
    *,
    list_size: int,
    seconds: float,
    via_proxy: bool = False,
    segment_s: int = 1,
    resolutions: tuple[int, ...] = (240,),
) -> AsyncIterator[FakeLive]:
    """240p at 25 fps from a 320x240 stream with audio, `list_size` segments in the window, published for
    `seconds`; the runner talks to the server through a TCP proxy when `via_proxy`."""
    async with contextlib.AsyncExitStack() as stack:
        relay, policy = await stack.enter_async_context(rtmp_relay())
        server = LiveServer(
            runner_token="live-runner-token",
            rtmp_url=f"rtmp://127.0.0.1:{relay.port}/live/a-stream-key",
            to_transcode=[{"resolution": resolution, "fps": 25} for resolution in resolutions],
            segment_duration_s=segment_s,
            list_size=list_size,
        )
        await stack.enter_async_context(serving(server))
        proxy = None
        url = server.url
        if via_proxy:
            proxy = await stack.enter_async_context(TcpProxy("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
            url = proxy.url
        publisher = await stack.enter_async_context(publishing(server.rtmp_url, seconds))
        await asyncio.wait_for(policy.publishing.wait(), 10)
        yield FakeLive(server, publisher, InstanceConfig(url, server.runner_token, "live-runner"), proxy)


def _fast_polling(**overrides: Any) -> dict[str, Any]:
    """The fake server has no socket: the runner polls it."""
    return {"socket_enabled": False, "poll_interval_s": 0.2, **overrides}


def _sequences(names: list[str]) -> list[int]:
    return [int(name.rsplit("-", 1)[1].removesuffix(".ts")) for name in names]


def _counter(harness: SupervisorHarness, outcome: str) -> float:
    value = harness.supervisor.metrics.registry.get_sample_value(
        "tuberunner_runner_live_segments_total", {"outcome": outcome}
    )
    return value or 0.0


def _run_outcome(harness: SupervisorHarness, job_uuid: str) -> str:
    (outcome,) = [run.outcome for run in harness.supervisor.finished if run.job.uuid == job_uuid]
    return outcome


# ------------------------------------------------------------------------------------------ server answers


@pytest.mark.parametrize(
    ("answer", "reported", "outcome"),
    [
        (Answer.session_ended(), ["success"], "succeeded"),
        (Answer.unknown_job(), [], "gone: "),
        (
            Answer(400, "Payload is invalid"),
            ["error: The server refused live segment"],
            "errored: The server refused live segment",
        ),
    ],
    ids=["session-ended-success", "unknown-job-nothing-reported", "refused-error-reported"],
)
async def test_a_refused_update_stops_ffmpeg_within_a_second(
    start_runner: StartRunner, answer: Answer, reported: list[str], outcome: str
) -> None:
    """PeerTube's 400 `runner_job_not_in_processing_state` "Session of this live ended": the session is
    over, so ffmpeg is stopped and the job ends with `success`. 404: the job is not ours any more, so ffmpeg
    is stopped and nothing is reported. Another 400: the job errors with the server's reason."""
    async with fake_live(list_size=4, seconds=60) as live:
        runner = await start_runner(live.instance, **_fast_polling())
        server = live.server
        await server.wait_for(lambda: len(server.received) >= 1, 30, "a first segment")
        watch = ProcessWatch(live.runner_ffmpeg())
        refused_at: list[float] = []

        def refuse(update: Update) -> Answer:
            refused_at.append(time.monotonic())
            return answer

        server.answer = refuse
        ended_at = await watch.ended(10)
        assert await runner.supervisor.wait_for(lambda: not runner.supervisor.jobs, 10)
    assert ended_at - refused_at[0] <= 1.0
    assert len(refused_at) == 1  # never retried
    assert _run_outcome(runner, server.job_uuid).startswith(outcome)
    assert [end[: len(expected)] for end, expected in zip(server.ends, reported, strict=True)] == reported
    assert server.problems == []


async def test_uploads_falling_behind_skip_segments_never_listed_and_the_lag_recovers(
    start_runner: StartRunner,
) -> None:
    """The first update of each rendition after the fault starts is answered after 4 s, longer than the
    audio window (2 segments of 1 s): what left the window meanwhile is skipped and counted, the playlists
    sent never list it, sequence numbers never go back, and once the server answers at once again the lag
    is what it was before. (The video window, 2 segments of 2 s, outlasts the delay: nothing skipped.)"""
    delay_s = 4.0
    async with fake_live(list_size=2, seconds=60) as live:
        runner = await start_runner(live.instance, **_fast_polling(call_timeout_s=15, read_timeout_s=15))
        server = live.server
        await server.wait_for(
            lambda: len(server.received_of(AUDIO)) >= 2 and len(server.received_of(VIDEO)) >= 1,
            30,
            "the first segments",
        )
        delayed: dict[str, float] = {}

        def slow(update: Update) -> Answer:
            rendition = update.chunk.split("-")[0]
            if rendition in delayed:
                return Answer()
            delayed[rendition] = update.at + delay_s
            return Answer(delay_s=delay_s)

        server.answer = slow

        def fresh() -> list[str]:
            """Audio segments received once the backlog the fault left had been sent (within ms of the end
            of the delay): listed by ffmpeg after the fault."""
            if len(delayed) < 2:
                return []
            over_at = max(delayed.values()) + 0.5
            return [name for name in server.received_of(AUDIO) if server.received[name] > over_at]

        await server.wait_for(lambda: len(fresh()) >= 2, 30, "two audio segments after the fault")
        after_fault = fresh()
        live.publisher.kill()
        assert await runner.supervisor.wait_for(lambda: not runner.supervisor.jobs, 20)

    assert server.problems == []
    assert server.ends == ["success"]
    gaps = 0
    for playlist in (AUDIO, VIDEO):
        sequences = _sequences(server.received_of(playlist))
        assert sequences == sorted(sequences)
        assert sequences[0] == 0
        gaps += sequences[-1] + 1 - len(sequences)
    assert gaps >= 1, "the fault skipped nothing: the test did not test"
    assert _counter(runner, "skipped") == gaps
    assert _counter(runner, "uploaded") == len(server.received)
    lags = _lags(server, AUDIO)
    assert max(lags.values()) >= delay_s - 1.0, lags  # the fault was seen
    # The segments listed after the fault are as fresh as the first ones were (ffmpeg's program date-time
    # and the clock of the stream differ by a constant: lags are compared, not taken as they are).
    before = min(lags[name] for name in server.received_of(AUDIO)[:2])
    assert max(lags[name] for name in after_fault) <= before + 1.0, lags


def _lags(server: LiveServer, playlist: str) -> dict[str, float]:
    """Per segment of `playlist` received: wall time at the server minus the end of the segment (its
    program date-time plus its duration, as the playlist sent with it says)."""
    lags = {}
    for update, answer in server.updates:
        if answer.status != 204 or update.playlist_name != playlist or update.playlist is None:
            continue
        segment = MediaPlaylist.parse(update.playlist).segments[-1]
        tags = dict(tag.split(":", 1) for tag in segment.tags)
        start = datetime.strptime(tags["#EXT-X-PROGRAM-DATE-TIME"], "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
        end = start + float(tags["#EXTINF"].rstrip(","))
        lags[segment.name] = server.wall_received[segment.name] - end
    return lags


async def test_the_master_comes_with_the_first_segment_of_the_last_rendition(
    start_runner: StartRunner,
) -> None:
    """Two video renditions close their first segments together: the master (which players need first)
    goes with whichever lands last, not with the next segment 2 s later."""
    async with fake_live(list_size=4, seconds=5, resolutions=(240, 144)) as live:
        runner = await start_runner(live.instance, **_fast_polling())
        server = live.server
        assert await runner.supervisor.wait_for(lambda: server.ends == ["success"], 30)
    accepted = [update for update, answer in server.updates if answer.status == 204]
    first_of = {
        playlist: next(i for i, u in enumerate(accepted) if u.playlist_name == playlist)
        for playlist in (AUDIO, VIDEO, "2.m3u8")
    }
    with_master = [i for i, update in enumerate(accepted) if update.master is not None]
    assert with_master == [max(first_of.values())], (first_of, with_master)
    assert server.problems == []


async def test_transient_failures_are_retried_and_no_segment_is_lost(start_runner: StartRunner) -> None:
    """Three updates answered 503, then two connections reset while an update is being sent: each update is
    sent again until it lands; every segment of the stream reaches the server, in order."""
    async with fake_live(list_size=4, seconds=9, via_proxy=True) as live:
        assert live.proxy is not None
        runner = await start_runner(
            live.instance, **_fast_polling(enabled_job_types=frozenset({JobType.LIVE_RTMP_HLS}))
        )
        server = live.server
        await server.wait_for(lambda: len(server.received_of(VIDEO)) >= 1, 30, "a video segment")
        failures: list[Update] = []

        def unavailable(update: Update) -> Answer:
            if len(failures) < 3:
                failures.append(update)
                return Answer(503, "Service Unavailable")
            return Answer()

        server.answer = unavailable
        await server.wait_for(lambda: len(server.received_of(VIDEO)) >= 2, 20, "a segment after the 503s")
        # With only the live to run, the runner asks for no job: the updates meet the resets.
        live.proxy.plan_next(Plan.reset_after(1000, Direction.UP), count=2)
        live.proxy.reset_all()

        async def reset_twice() -> bool:
            assert live.proxy is not None
            return live.proxy.stats.actions.count(Action.RESET) >= 2

        await wait_for(reset_twice, 20, "two connections reset")
        assert await asyncio.wait_for(live.publisher.wait(), 20) == 0
        assert await runner.supervisor.wait_for(lambda: not runner.supervisor.jobs, 20)

    assert len(failures) == 3
    assert server.problems == []
    assert server.ends == ["success"]
    for playlist in (AUDIO, VIDEO):
        sequences = _sequences(server.received_of(playlist))
        assert sequences == list(range(len(sequences))), f"{playlist}: a segment was lost"
    assert len(server.received_of(VIDEO)) >= 4
    assert _counter(runner, "skipped") == 0
    assert _counter(runner, "uploaded") == len(server.received)


def test_a_playlist_ffmpeg_left_empty_or_cut_short_is_not_read_as_a_window() -> None:
    """On a full disk ffmpeg can leave a playlist empty or cut short (seen: an empty one). Read as it is, its
    segments would seem to have left the window (removed from the server while players still list them);
    such a read is ignored until ffmpeg writes it whole again."""
    whole = (
        "#EXTM3U\n#EXT-X-VERSION:6\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:4\n"
        "#EXTINF:2.0,\n1-000004.ts\n#EXTINF:2.0,\n1-000005.ts\n#EXTINF:2.0,\n1-000006.ts\n"
    )
    previous = MediaPlaylist.parse(whole)
    moved = whole.replace("SEQUENCE:4\n#EXTINF:2.0,\n1-000004.ts\n", "SEQUENCE:5\n")
    moved += "#EXTINF:2.0,\n1-000007.ts\n"
    for text, expected in [
        (whole, True),
        (moved, True),
        ("", False),
        (whole[: whole.index("1-000006.ts") + 5], False),  # a name cut in half
        (whole[: whole.index("#EXTINF:2.0,\n1-000006.ts")], False),  # the window's end went back
        (whole.replace("SEQUENCE:4", "SEQUENCE:3"), False),  # its start went back
    ]:
        assert live_processor._whole(MediaPlaylist.parse(text), text, previous) is expected, text


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (a work disk that fills up), unmounted after the runner using it has stopped."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a disk that fills up) needs root")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> Path:
    """Write zeros into `folder` until its disk is full; the file that fills it."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as out, contextlib.suppress(OSError):
        while True:
            out.write(bytes(65536))
    return filler


async def test_a_full_work_disk_skips_what_ffmpeg_could_not_write_and_the_live_goes_on(
    small_disk: Path, start_runner: StartRunner
) -> None:
    """The work disk fills up for a few seconds mid-live: ffmpeg lists segments it wrote empty or cut short
    and leaves its playlists empty. Those segments are skipped (counted), never sent nor listed, the empty
    playlists are not taken for a window that moved, and the live goes on once the disk has room."""
    async with fake_live(list_size=3, seconds=60) as live:
        runner = await start_runner(live.instance, work_dir=small_disk, **_fast_polling())
        server = live.server
        await server.wait_for(lambda: len(server.received_of(VIDEO)) >= 2, 30, "segments before the fault")
        filler = _fill(small_disk)
        await asyncio.sleep(4)  # the fault's length: a few segments are written on a full disk
        filler.unlink()
        before = len(server.received_of(VIDEO))
        await server.wait_for(lambda: len(server.received_of(VIDEO)) >= before + 2, 30, "segments after it")
        live.publisher.kill()
        assert await runner.supervisor.wait_for(lambda: not runner.supervisor.jobs, 20)

    assert server.problems == []
    assert server.ends == ["success"]
    sent = [u.chunk_bytes for u, answer in server.updates if answer.status == 204 and u.kind == "add-chunk"]
    assert sent
    assert all(data and len(data) % 188 == 0 for data in sent), "an incomplete segment was sent"
    assert _counter(runner, "skipped") >= 1, "the full disk spoilt no segment: the test did not test"
    for playlist in (AUDIO, VIDEO):
        sequences = _sequences(server.received_of(playlist))
        assert sequences == sorted(sequences)


# ------------------------------------------------------------------------------------------ the coordinator


@pytest.fixture
def coordinator_config(tmp_path: Path) -> CoordinatorConfig:
    """Live on (RTMP on a free port) with 1 s segments (video ones last 2 s: see the module doc)."""
    return CoordinatorConfig(
        data_dir=tmp_path / "coordinator",
        admin_token=ADMIN_TOKEN,
        reaper_interval_s=0.2,
        ping_debounce_s=0.01,
        rtmp_port=None,
        live_segment_duration_s=1.0,
        live_segment_list_size=4,
        live_reconnect_grace_s=1.0,
    )


@dataclass
class CoordinatorLive:
    video_uuid: str
    stream_key: str
    publish_url: str
    job_uuid: str = ""


async def _new_live(coordinator: RunningCoordinator, name: str) -> CoordinatorLive:
    async with httpx.AsyncClient(base_url=coordinator.url, timeout=10) as http:
        created = await create_live(http, name, resolutions="240")
    live = created["live"]
    key = live["streamKey"]
    return CoordinatorLive(created["video"]["uuid"], key, f"{live['rtmpUrl']}/{key}")


async def _live_job(coordinator: RunningCoordinator, live: CoordinatorLive) -> str:
    async def created() -> str | None:
        found = await coordinator.coordinator.live.by_video_uuid(live.video_uuid)
        return found.job_uuid if found is not None else None

    live.job_uuid = await wait_for(created, 20, "the live job")
    return live.job_uuid


async def _uploading(runner: SupervisorHarness, segments: int) -> None:
    async def uploaded() -> bool:
        return _counter(runner, "uploaded") >= segments

    await wait_for(uploaded, 30, f"{segments} segments uploaded")


def _ended(runner: SupervisorHarness, job_uuid: str) -> Callable[[], bool]:
    return lambda: any(run.job.uuid == job_uuid for run in runner.supervisor.finished)


async def test_a_stalled_stream_errors_the_job_after_the_stall_time(
    coordinator: RunningCoordinator, start_runner: StartRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The publisher is SIGSTOPped: its connection stays open and sends nothing. No new segment for the
    stall time (5 segments, at least `STALL_MIN_S`: lowered to 4 s here, so 5 s of 1 s segments) kills
    ffmpeg and errors the job with the stall message."""
    monkeypatch.setattr(live_processor, "STALL_MIN_S", 4.0)
    stall_s = live_processor.stall_after_s(1.0)
    assert stall_s == 5.0
    runner = await start_runner(await register(coordinator, "stalling"))
    live = await _new_live(coordinator, "stalls")
    async with publishing(live.publish_url, 60) as publisher:
        job_uuid = await _live_job(coordinator, live)
        await _uploading(runner, 2)
        publisher.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            assert await runner.supervisor.wait_for(_ended(runner, job_uuid), stall_s + 10)
            elapsed = time.monotonic() - stopped_at
        finally:
            publisher.send_signal(signal.SIGCONT)
    message = f"Live stalled: ffmpeg wrote no segment for {stall_s:g} s (the stream sends nothing)"
    assert _run_outcome(runner, job_uuid) == f"errored: {message}"
    # Counted from the last segment ffmpeg listed, at most a video segment before the publisher stopped.
    assert stall_s - VIDEO_SEGMENT_S - 0.5 <= elapsed <= stall_s + 1.5, elapsed
    row = await job_of(coordinator, job_uuid)
    assert row is not None
    assert (row.state, row.error) == (JobState.ERRORED, message)


async def test_a_live_whose_ffmpeg_is_stuck_is_let_go_as_soon_as_the_coordinator_takes_it_back(
    coordinator: RunningCoordinator, start_runner: StartRunner
) -> None:
    """The live's ffmpeg is SIGSTOPped (stuck: no segment, no end) and the job cancelled: a live has no
    heartbeat, but the coordinator's take-back push makes the runner ask, and the answer stops the live at
    once instead of at the stall watchdog (20 s here)."""
    runner = await start_runner(await register(coordinator, "stuck"))
    live = await _new_live(coordinator, "stuck")
    async with publishing(live.publish_url, 60) as publisher:
        job_uuid = await _live_job(coordinator, live)
        await _uploading(runner, 1)
        (pid,) = [pid for pid in ffmpeg_pids() if pid != publisher.pid]
        watch = ProcessWatch(pid)
        os.kill(pid, signal.SIGSTOP)
        async with httpx.AsyncClient(base_url=coordinator.url, timeout=10) as http:
            asked = time.monotonic()
            answer = await http.post(
                f"/api/v1/runners/jobs/{job_uuid}/cancel", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
            )
        assert answer.status_code == 204
        assert await watch.ended(10) - asked <= 2.0
        assert await runner.supervisor.wait_for(_ended(runner, job_uuid), 5)
    assert _run_outcome(runner, job_uuid).startswith("cancelled: the server took the job back")


async def test_a_live_is_taken_while_the_vod_slot_is_busy_and_a_vod_job_while_the_live_slot_is(
    coordinator: RunningCoordinator, start_runner: StartRunner, clip: Path
) -> None:
    vod = FakeProcessor(source=clip)
    runner = await start_runner(
        await register(coordinator, "slots"),
        processors={JobType.VOD_WEB_VIDEO: vod, JobType.LIVE_RTMP_HLS: live_processor.live},
    )
    supervisor = runner.supervisor
    first_vod = await seed_job(coordinator)
    await asyncio.wait_for(vod.started.wait(), 10)
    live = await _new_live(coordinator, "beside a VOD job")
    async with publishing(live.publish_url, 60) as publisher:
        job_uuid = await _live_job(coordinator, live)
        # Taken although the only VOD slot is busy...
        assert await supervisor.wait_for(lambda: job_uuid in supervisor.jobs, 10)
        assert first_vod in supervisor.jobs
        registry = supervisor.metrics.registry
        slots = {
            name: registry.get_sample_value(f"tuberunner_runner_{name}")
            for name in ("slots", "slots_busy", "live_slots", "live_slots_busy")
        }
        assert slots == {"slots": 1, "slots_busy": 1, "live_slots": 1, "live_slots_busy": 1}
        await _uploading(runner, 1)
        vod.release.set()
        assert await supervisor.wait_for(_ended(runner, first_vod), 10)
        # ... and a VOD job is taken while the only live slot is busy.
        second_vod = await seed_job(coordinator)
        assert await supervisor.wait_for(_ended(runner, second_vod), 10)
        assert job_uuid in supervisor.jobs
        publisher.kill()
    assert await supervisor.wait_for(_ended(runner, job_uuid), 20)
    for job in (first_vod, second_vod, job_uuid):
        assert _run_outcome(runner, job) == "succeeded"
        row = await job_of(coordinator, job)
        assert row is not None
        assert row.state == JobState.COMPLETED


async def test_stopping_gives_the_live_back_at_once_while_vod_jobs_drain(
    coordinator: RunningCoordinator, start_runner: StartRunner, clip: Path
) -> None:
    """SIGTERM's drain: a live never ends by itself, so it is given back at once (PeerTube turns a live's
    abort into an error, and a new job of the session goes to another runner); the VOD job goes on and is
    delivered within the grace."""
    vod = FakeProcessor(source=clip)
    runner = await start_runner(
        await register(coordinator, "draining"),
        processors={JobType.VOD_WEB_VIDEO: vod, JobType.LIVE_RTMP_HLS: live_processor.live},
    )
    supervisor = runner.supervisor
    vod_job = await seed_job(coordinator)
    await asyncio.wait_for(vod.started.wait(), 10)
    live = await _new_live(coordinator, "given back")
    async with publishing(live.publish_url, 60) as publisher:
        job_uuid = await _live_job(coordinator, live)
        await _uploading(runner, 1)
        (pid,) = [pid for pid in ffmpeg_pids() if pid != publisher.pid]
        watch = ProcessWatch(pid)
        asked = time.monotonic()
        supervisor.request_stop()  # what SIGTERM does
        assert await watch.ended(5) - asked <= 1.0
        assert await supervisor.wait_for(_ended(runner, job_uuid), 5)

        async def given_back() -> bool:
            row = await job_of(coordinator, job_uuid)
            return row is not None and row.state != JobState.PROCESSING

        await wait_for(given_back, 5, "the live job given back")
    assert _run_outcome(runner, job_uuid) == "cancelled: Runner stopped"
    row = await job_of(coordinator, job_uuid)
    assert row is not None
    assert row.state == JobState.ERRORED  # PeerTube's answer to the abort of a live
    # The VOD job was left to finish.
    assert vod_job in supervisor.jobs
    assert not vod.cancelled.is_set()
    vod.release.set()
    assert await asyncio.wait_for(runner.task, 20) is True
    assert _run_outcome(runner, vod_job) == "succeeded"
    vod_row = await job_of(coordinator, vod_job)
    assert vod_row is not None
    assert vod_row.state == JobState.COMPLETED


async def test_no_log_line_of_a_whole_live_names_the_stream_key_or_the_pull_secret(
    coordinator: RunningCoordinator, start_runner: StartRunner, caplog: pytest.LogCaptureFixture
) -> None:
    """Every line logged while a live runs from its publish to its end, DEBUG included (ffmpeg's command
    line): the RTMP URLs are there with their path hidden."""
    caplog.set_level(logging.DEBUG, logger="tuberunner")
    runner = await start_runner(await register(coordinator, "discreet"))
    live = await _new_live(coordinator, "secret")
    async with publishing(live.publish_url, 5) as publisher:
        job_uuid = await _live_job(coordinator, live)
        assert await runner.supervisor.wait_for(lambda: job_uuid in runner.supervisor.jobs, 10)
        pull_url = runner.supervisor.jobs[job_uuid].job.payload["input"]["rtmpUrl"]
        assert await asyncio.wait_for(publisher.wait(), 20) == 0
    assert await runner.supervisor.wait_for(_ended(runner, job_uuid), 20)
    assert _run_outcome(runner, job_uuid) == "succeeded"
    secret = pull_url.rsplit("/", 1)[1].removeprefix(f"{job_uuid}-")
    assert len(secret) >= 32
    formatter = logging.Formatter("%(name)s %(message)s")
    lines = [formatter.format(record) for record in caplog.records]
    # The command line was logged (its URL redacted): the check below looked at it.
    assert [line for line in lines if "ffmpeg started" in line and "rtmp://127.0.0.1:" in line]
    assert [line for line in lines if live.stream_key in line or secret in line] == []
