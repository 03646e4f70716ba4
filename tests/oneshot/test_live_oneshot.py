"""`tuberunner live -o OUT`: the embedded coordinator with RTMP, a live published with real ffmpeg, the live
HLS mirrored into OUT/ while it runs, and a VOD HLS of the whole stream left there at the end.

The runner side is `tests/support/live.LiveRunner` (the protocol, real ffmpeg), put in through `run_live`'s
`runners` seam."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.support.live import LiveRunner, publish_args, publishing, request_live_job, wait_for
from tests.support.servers import free_port
from tuberunner.coordinator.embedded import Embedded
from tuberunner.media.binaries import find_ffmpeg
from tuberunner.oneshot.live import LiveOptions, run_live
from tuberunner.protocol.jobs import JobType
from tuberunner.runner.processors import PROCESSORS

pytestmark = pytest.mark.timeout(90)


async def test_live_oneshot_mirrors_the_live_and_leaves_a_vod_of_the_whole_stream(tmp_path: Path) -> None:
    runners: list[LiveRunner] = []

    @contextlib.asynccontextmanager
    async def protocol_runner(embedded: Embedded, state_dir: Path) -> AsyncIterator[None]:
        c = embedded.coordinator
        registration = await c.runners.create_registration_token()
        _, token = await c.runners.register(registration, "protocol", None, None, "127.0.0.1")
        async with httpx.AsyncClient(base_url=embedded.url, timeout=10) as client:

            async def work() -> None:
                job = await request_live_job(client, token, timeout_s=60)
                runner = LiveRunner(client, token, state_dir / "runner")
                runners.append(runner)
                await runner.accept(job["uuid"])
                await runner.run()

            task = asyncio.create_task(work())
            try:
                yield
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    out = tmp_path / "out"
    lines: list[str] = []
    stop = asyncio.Event()
    options = LiveOptions(output=out, resolutions=(240,), rtmp_port=free_port(), segment_duration_s=1.0)
    session = asyncio.create_task(run_live(options, lines.append, stop, runners=protocol_runner))

    async def key() -> str | None:
        found = [line.split()[-1] for line in lines if line.startswith("(ffmpeg: -f flv ")]
        return found[0].rstrip(")") if found else None

    url = await wait_for(key, 20, "the RTMP URL")
    assert url.startswith(f"rtmp://127.0.0.1:{options.rtmp_port}/live/")
    async with publishing(url, 5) as publisher:

        async def live_playlist() -> bool:
            playlist = out / "0.m3u8"
            return playlist.exists() and "#EXT-X-ENDLIST" not in playlist.read_text()

        await wait_for(live_playlist, 20, "the live playlist in OUT/")
        assert (out / "master.m3u8").exists()
        await publisher.wait()
    result = await asyncio.wait_for(session, 30)

    assert result.error is None
    (runner,) = runners
    vod = (out / "0.m3u8").read_text()
    assert "#EXT-X-PLAYLIST-TYPE:VOD" in vod
    assert vod.rstrip().endswith("#EXT-X-ENDLIST")
    listed = [line for line in vod.splitlines() if line.endswith(".ts")]
    assert listed == [f"1-{name}" for name in runner.sent]
    assert result.playlists == {"0.m3u8": listed}
    for name in listed:
        assert (out / name).read_bytes() == (runner.work / name.split("-", 1)[1]).read_bytes()
    # The whole stream plays from OUT/ alone: as many frames as its playlist's durations say (25 fps).
    args = [
        "-v",
        "error",
        "-i",
        str(out / "master.m3u8"),
        "-map",
        "0:v:0",
        "-c",
        "copy",
        "-f",
        "framecrc",
        "-",
    ]
    decode = await asyncio.create_subprocess_exec(str(find_ffmpeg()), *args, stdout=asyncio.subprocess.PIPE)
    stdout, _ = await decode.communicate()
    assert decode.returncode == 0
    packets = [line for line in stdout.decode().splitlines() if line and not line.startswith("#")]
    listed_s = sum(
        float(line[len("#EXTINF:") :].rstrip(",")) for line in vod.splitlines() if line.startswith("#EXTINF:")
    )
    assert abs(len(packets) - listed_s * 25) <= 1
    assert len(packets) >= 3 * 25  # the runner joined within the first seconds


@pytest.mark.skipif(
    JobType.LIVE_RTMP_HLS not in PROCESSORS, reason="the runner of this tree has no live processor"
)
async def test_live_oneshot_with_its_own_runner_leaves_every_frame_in_out(tmp_path: Path) -> None:
    """The command as users run it: the embedded runner transcodes (240p and the audio); OUT/ ends with a
    VOD HLS of the whole stream, every frame of it (the publisher's single GOP is kept for the runner)."""
    out = tmp_path / "out"
    lines: list[str] = []
    options = LiveOptions(output=out, resolutions=(240,), rtmp_port=free_port(), segment_duration_s=2.0)
    session = asyncio.create_task(run_live(options, lines.append, asyncio.Event()))

    async def key() -> str | None:
        found = [line.split()[-1] for line in lines if line.startswith("(ffmpeg: -f flv ")]
        return found[0].rstrip(")") if found else None

    url = await wait_for(key, 30, "the RTMP URL")
    args = publish_args(url, 6)
    args[args.index("-g") + 1] = "1000"
    publisher = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.DEVNULL)
    assert await publisher.wait() == 0
    result = await asyncio.wait_for(session, 30)
    assert result.error is None
    assert set(result.playlists) == {"0.m3u8", "1.m3u8"}  # audio, 240p
    decode_args = [
        "-v",
        "error",
        "-i",
        str(out / "1.m3u8"),
        "-map",
        "0:v:0",
        "-c",
        "copy",
        "-f",
        "framecrc",
        "-",
    ]
    decode = await asyncio.create_subprocess_exec(
        str(find_ffmpeg()), *decode_args, stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await decode.communicate()
    packets = [line for line in stdout.decode().splitlines() if line and not line.startswith("#")]
    assert len(packets) == 6 * 25
