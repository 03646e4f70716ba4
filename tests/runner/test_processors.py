"""The VOD processors on tiny generated clips with the real ffmpeg; outputs checked with `media.probe`."""

from __future__ import annotations

import asyncio
import itertools
import os
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tuberunner.media.binaries import find_ffmpeg
from tuberunner.media.probe import MediaInfo, probe
from tuberunner.media.samples import make_sample_clip, make_still_image
from tuberunner.protocol.jobs import JobType
from tuberunner.runner.errors import JobFailed
from tuberunner.runner.job import AcceptedJob, JobContext, JobOutput, ProcessingSettings
from tuberunner.runner.processors import PROCESSORS, REQUIRED_TYPES, build_table, payload_problem, supports

DURATION_S = 2.0
BASE = "http://tube.test/api/v1/runners/jobs/{job}/files/videos/5b1f3f5e-7c3a-4c4e-9f57-2f7a8d9b0c11"
VIDEO_URL = BASE + "/max-quality"
AUDIO_URL = BASE + "/max-quality/audio"
PREVIEW_URL = BASE + "/previews/max-quality"


@dataclass(frozen=True)
class Clips:
    av: Path  # 320x240, 25 fps, h264 + aac
    silent: Path  # 320x240, 25 fps, h264 only
    audio: Path  # aac only
    image: Path  # 321x241 JPEG: odd on purpose


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Clips:
    folder = tmp_path_factory.mktemp("clips")
    ffmpeg = find_ffmpeg()

    async def make() -> Clips:
        common: dict[str, Any] = {"duration_s": DURATION_S, "width": 320, "height": 240, "fps": 25}
        return Clips(
            av=await make_sample_clip(ffmpeg, folder / "av.mp4", **common),
            silent=await make_sample_clip(ffmpeg, folder / "silent.mp4", audio=False, **common),
            audio=await make_sample_clip(
                ffmpeg, folder / "audio.m4a", audio_only=True, duration_s=DURATION_S
            ),
            image=await make_still_image(ffmpeg, folder / "image.jpg", width=321, height=241),
        )

    return asyncio.run(make())


@dataclass
class Run:
    """One processor call with inputs served from local files."""

    job_type: JobType
    payload: dict[str, Any]
    inputs: dict[str, Path]
    work_dir: Path
    settings: ProcessingSettings
    progress: list[float | None] = field(default_factory=list)
    fetched: list[str] = field(default_factory=list)
    job_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))

    def context(self) -> JobContext:
        async def fetch_input(url: str) -> Path:
            self.fetched.append(url)
            return self.inputs[url]

        job = AcceptedJob(self.job_uuid, self.job_type, self.payload, "ptrjt-test", "http://tube.test")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        return JobContext(job, self.work_dir, self.settings, fetch_input, self.progress.append)

    async def __call__(self) -> JobOutput:
        return await PROCESSORS[self.job_type](self.context())


@pytest.fixture
def settings() -> ProcessingSettings:
    return ProcessingSettings(ffmpeg=find_ffmpeg(), threads=2, stall_timeout_s=30)


def video_payload(
    resolution: int, fps: int, *, separated_audio: bool | None = None, split: bool = False
) -> Any:
    payload: dict[str, Any] = {
        "input": {"videoFileUrl": VIDEO_URL, "separatedAudioFileUrl": [AUDIO_URL] if split else []},
        "output": {"resolution": resolution, "fps": fps},
    }
    if separated_audio is not None:
        payload["output"]["separatedAudio"] = separated_audio
    return payload


def moov_before_mdat(path: Path) -> bool:
    """Faststart: the index (moov) comes before the media data (mdat) among the top-level boxes."""
    order = []
    with path.open("rb") as handle:
        while True:
            header = handle.read(8)
            if len(header) < 8:
                break
            size, kind = int.from_bytes(header[:4], "big"), header[4:].decode("latin-1")
            if size == 1:
                size = int.from_bytes(handle.read(8), "big")
                handle.seek(size - 16, os.SEEK_CUR)
            else:
                handle.seek(size - 8, os.SEEK_CUR)
            order.append(kind)
            if size < 8:
                break
    return "moov" in order and "mdat" in order and order.index("moov") < order.index("mdat")


def assert_av(
    info: MediaInfo,
    *,
    width: int,
    height: int,
    fps: float,
    audio: bool = True,
    pix_fmts: tuple[str, ...] = ("yuv420p",),
) -> None:
    assert info.video is not None
    assert (info.video.codec, info.video.width, info.video.height) == ("h264", width, height)
    assert info.video.fps == pytest.approx(fps, abs=0.01)
    assert info.video.pix_fmt in pix_fmts
    if audio:
        assert info.audio is not None
        assert info.audio.codec == "aac"
    else:
        assert info.audio is None
    assert info.duration_s == pytest.approx(DURATION_S, abs=0.2)


# ------------------------------------------------------------------------------------------ web video


async def test_web_video_scales_and_sets_fps_in_a_faststart_mp4(
    clips: Clips, settings: ProcessingSettings, tmp_path: Path
) -> None:
    run = Run(JobType.VOD_WEB_VIDEO, video_payload(144, 15), {VIDEO_URL: clips.av}, tmp_path, settings)
    output = await run()
    video = output.files["videoFile"]
    assert set(output.files) == {"videoFile"}
    assert video.parent == tmp_path
    assert_av(await probe(video), width=192, height=144, fps=15)
    assert moov_before_mdat(video)
    assert run.progress
    assert run.progress[-1] == 100
    assert all(0 <= p <= 100 for p in run.progress if p is not None)


async def test_web_video_takes_the_audio_from_a_separated_audio_input(
    clips: Clips, settings: ProcessingSettings, tmp_path: Path
) -> None:
    run = Run(
        JobType.VOD_WEB_VIDEO,
        video_payload(240, 25, split=True),
        {VIDEO_URL: clips.silent, AUDIO_URL: clips.audio},
        tmp_path,
        settings,
    )
    output = await run()
    assert run.fetched == [VIDEO_URL, AUDIO_URL]
    assert_av(await probe(output.files["videoFile"]), width=320, height=240, fps=25)


# ------------------------------------------------------------------------------------------ HLS


def parse_playlist(playlist: Path) -> tuple[str, list[tuple[int, int]], list[str]]:
    """(map URI, byte ranges (length, offset) of the segments, segment URIs)."""
    lines = playlist.read_text().splitlines()
    assert lines[0] == "#EXTM3U"
    assert "#EXT-X-PLAYLIST-TYPE:VOD" in lines
    assert lines[-1] == "#EXT-X-ENDLIST"
    (map_line,) = [line for line in lines if line.startswith("#EXT-X-MAP:")]
    map_uri = map_line.split('URI="', 1)[1].split('"', 1)[0]
    ranges = []
    uris = []
    for index, line in enumerate(lines):
        if line.startswith("#EXT-X-BYTERANGE:"):
            length, offset = line.split(":", 1)[1].split("@")
            ranges.append((int(length), int(offset)))
            uris.append(lines[index + 1])
    return map_uri, ranges, uris


async def test_hls_rendition_is_a_byte_range_playlist_over_one_fragmented_mp4(
    clips: Clips, settings: ProcessingSettings, tmp_path: Path
) -> None:
    run = Run(
        JobType.VOD_HLS,
        video_payload(144, 25, separated_audio=False),
        {VIDEO_URL: clips.av},
        tmp_path,
        settings,
    )
    output = await run()
    fragmented, playlist = output.files["videoFile"], output.files["resolutionPlaylistFile"]
    assert playlist.suffix == ".m3u8"
    map_uri, ranges, uris = parse_playlist(playlist)
    # Bare file names only: the server stores both side by side and rewrites the name.
    assert map_uri == fragmented.name
    assert set(uris) == {fragmented.name}
    assert ranges
    # Contiguous byte ranges that end inside the file.
    for (length, offset), (_, next_offset) in itertools.pairwise(ranges):
        assert offset + length == next_offset
    assert ranges[-1][0] + ranges[-1][1] <= fragmented.stat().st_size
    assert_av(await probe(fragmented), width=192, height=144, fps=25)


async def test_hls_audio_only_rendition_has_no_video(
    clips: Clips, settings: ProcessingSettings, tmp_path: Path
) -> None:
    run = Run(
        JobType.VOD_HLS, video_payload(0, 0, separated_audio=True), {VIDEO_URL: clips.av}, tmp_path, settings
    )
    output = await run()
    info = await probe(output.files["videoFile"])
    assert info.video is None
    assert info.audio is not None
    assert info.audio.codec == "aac"
    assert info.duration_s == pytest.approx(DURATION_S, abs=0.2)
    assert parse_playlist(output.files["resolutionPlaylistFile"])[0] == output.files["videoFile"].name


async def test_hls_with_separated_audio_is_video_only(
    clips: Clips, settings: ProcessingSettings, tmp_path: Path
) -> None:
    run = Run(
        JobType.VOD_HLS,
        video_payload(240, 25, separated_audio=True),
        {VIDEO_URL: clips.av},
        tmp_path,
        settings,
    )
    output = await run()
    assert_av(await probe(output.files["videoFile"]), width=320, height=240, fps=25, audio=False)


async def test_an_audio_only_rendition_of_a_silent_video_fails_clearly(
    clips: Clips, settings: ProcessingSettings, tmp_path: Path
) -> None:
    run = Run(JobType.VOD_HLS, video_payload(0, 0), {VIDEO_URL: clips.silent}, tmp_path, settings)
    with pytest.raises(JobFailed, match="no audio stream"):
        await run()


# ------------------------------------------------------------------------------------------ audio merge


def merge_payload() -> Any:
    return {
        "input": {"audioFileUrl": VIDEO_URL, "previewFileUrl": PREVIEW_URL},
        "output": {"resolution": 480, "fps": 25},
    }


async def test_audio_merge_loops_the_preview_made_even_over_the_audio(
    clips: Clips, settings: ProcessingSettings, tmp_path: Path
) -> None:
    inputs = {VIDEO_URL: clips.audio, PREVIEW_URL: clips.image}
    run = Run(JobType.VOD_AUDIO_MERGE, merge_payload(), inputs, tmp_path, settings)
    output = await run()
    video = output.files["videoFile"]
    # 321x241 made even by truncation; the payload's 480 only feeds the bitrate (PeerTube's behaviour).
    # A JPEG decodes to full range: ffmpeg flags the 4:2:0 output as yuvj420p, as with the official runner.
    assert_av(await probe(video), width=320, height=240, fps=25, pix_fmts=("yuv420p", "yuvj420p"))
    assert moov_before_mdat(video)
    assert run.progress[-1] == 100


async def test_audio_merge_of_an_input_without_audio_fails_clearly(
    clips: Clips, settings: ProcessingSettings, tmp_path: Path
) -> None:
    inputs = {VIDEO_URL: clips.silent, PREVIEW_URL: clips.image}
    run = Run(JobType.VOD_AUDIO_MERGE, merge_payload(), inputs, tmp_path, settings)
    with pytest.raises(JobFailed, match="has no audio stream"):
        await run()


# ------------------------------------------------------------------------------------------ failures


async def test_an_unreadable_input_fails_the_job_naming_it(
    settings: ProcessingSettings, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(os.urandom(50_000))
    run = Run(
        JobType.VOD_WEB_VIDEO, video_payload(144, 25), {VIDEO_URL: garbage}, tmp_path / "work", settings
    )
    with pytest.raises(JobFailed, match="Cannot read the video input"):
        await run()


def fake_ffmpeg(folder: Path, script: str) -> Path:
    path = folder / "ffmpeg"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


async def test_an_ffmpeg_failure_fails_the_job_with_the_end_of_its_stderr(
    clips: Clips, tmp_path: Path
) -> None:
    broken = fake_ffmpeg(
        tmp_path, 'echo "[libx264 @ 0x1] something broke badly" >&2\necho "Conversion failed!" >&2\nexit 1\n'
    )
    settings = ProcessingSettings(ffmpeg=broken, stall_timeout_s=10)
    run = Run(
        JobType.VOD_WEB_VIDEO, video_payload(144, 25), {VIDEO_URL: clips.av}, tmp_path / "work", settings
    )
    with pytest.raises(JobFailed) as failure:
        await run()
    assert "exited with code 1" in failure.value.message
    assert "something broke badly" in failure.value.message
    assert "Conversion failed!" in failure.value.message  # the tail is carried whole
    assert len(failure.value.message) <= 5000


async def test_a_malformed_payload_fails_the_job(settings: ProcessingSettings, tmp_path: Path) -> None:
    run = Run(JobType.VOD_HLS, {"input": {}, "output": {"fps": "x"}}, {}, tmp_path, settings)
    with pytest.raises(JobFailed, match=r"Invalid vod-hls-transcoding payload: input\.videoFileUrl"):
        await run()


def ffmpeg_children() -> Iterator[int]:
    """Pids of our direct children (ffmpeg runs in its own session, but stays our child)."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'.
        ppid = int(stat_line.rsplit(")", 1)[1].split()[1])
        if ppid == me:
            yield int(entry.name)


async def test_a_cancelled_processor_leaves_no_ffmpeg_behind(clips: Clips, tmp_path: Path) -> None:
    # The real ffmpeg, reading its input at native speed (-re): a 2 s clip takes 2 s to encode.
    slow = fake_ffmpeg(tmp_path, f'exec "{find_ffmpeg()}" -re "$@"\n')
    settings = ProcessingSettings(ffmpeg=slow, stall_timeout_s=10)
    run = Run(
        JobType.VOD_WEB_VIDEO, video_payload(144, 25), {VIDEO_URL: clips.av}, tmp_path / "work", settings
    )
    before = set(ffmpeg_children())
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(run())
        while not [p for p in run.progress if p]:  # ffmpeg is encoding
            await asyncio.sleep(0.02)
        (pid,) = set(ffmpeg_children()) - before
        assert "ffmpeg" in Path(f"/proc/{pid}/cmdline").read_text()
        task.cancel()
    assert task.cancelled()
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped: not even a zombie
    assert set(ffmpeg_children()) == before


# ------------------------------------------------------------------------------------------ the table


def test_the_table_holds_the_vod_processors() -> None:
    assert set(PROCESSORS) >= REQUIRED_TYPES
    with pytest.raises(TypeError):
        PROCESSORS[JobType.STUDIO] = PROCESSORS[JobType.VOD_HLS]  # type: ignore[index]


def test_a_bad_table_fails_when_built() -> None:
    web = PROCESSORS[JobType.VOD_WEB_VIDEO]
    with pytest.raises(ValueError, match="two processors"):
        build_table([(JobType.VOD_WEB_VIDEO, web), (JobType.VOD_WEB_VIDEO, web)], required=frozenset())
    with pytest.raises(ValueError, match="no processor for vod-hls-transcoding"):
        build_table([(JobType.VOD_WEB_VIDEO, web)], required=frozenset({JobType.VOD_HLS}))


def test_supports_gives_the_reason_it_cannot_run_a_job() -> None:
    assert supports("vod-web-video-transcoding", video_payload(144, 25)) is None
    assert supports(JobType.VOD_HLS, video_payload(0, 0, separated_audio=True)) is None
    assert supports("vod-audio-merge-transcoding", merge_payload()) is None
    assert (
        supports("video-transcoding-of-the-future", {})
        == "unknown job type 'video-transcoding-of-the-future'"
    )
    # Transcription is added to a runner's table by its configuration (runner_processors), not built in.
    assert (
        supports("video-transcription", {}) == "job type video-transcription is not supported by this runner"
    )
    assert supports("live-rtmp-hls-transcoding", {}) == (
        "malformed live-rtmp-hls-transcoding payload: input: Field required; output: Field required"
    )
    reason = supports("vod-hls-transcoding", {"input": {"videoFileUrl": VIDEO_URL}, "output": {"fps": 25}})
    assert reason is not None
    assert reason.startswith("malformed vod-hls-transcoding payload: output.resolution")
    studio = {"input": {"videoFileUrl": VIDEO_URL}, "tasks": [{"name": "add-subtitles", "options": {}}]}
    assert payload_problem(JobType.STUDIO, studio) == "unknown studio task 'add-subtitles'"
