"""Nothing encoded twice: HLS packaged from its input or from a kept web video, and ladder rungs reused.

Real ffmpeg on tiny generated clips. "Packaged, not encoded" is asserted on the bytes: the HLS rendition's
video packets are the very packets of the file it was made from.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import av
import pytest

from tuberunner.media.binaries import find_ffmpeg
from tuberunner.media.commands import EncodeSettings, LadderRung, ladder_command, web_video_command
from tuberunner.media.probe import AudioInfo, KeyframeSpacing, MediaInfo, VideoInfo, keyframe_spacing, probe
from tuberunner.media.samples import make_sample_clip
from tuberunner.media.stream_copy import hls_copy_problem
from tuberunner.protocol.jobs import JobType
from tuberunner.runner.encode_cache import EncodeCache, EncodeKey
from tuberunner.runner.job import AcceptedJob, JobContext, JobOutput, ProcessingSettings
from tuberunner.runner.processors import PROCESSORS

VIDEO = "5b1f3f5e-7c3a-4c4e-9f57-2f7a8d9b0c11"
BASE = "http://tube.test/api/v1/runners/jobs/{job}/files/videos/" + VIDEO
VIDEO_URL = BASE + "/max-quality"
LADDER = "0d6c9a57-parent-job"


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 s of 320x240 at 25 fps, H.264 with a keyframe every 2 s, AAC 128k: what our encode makes."""
    folder = tmp_path_factory.mktemp("reuse")
    return asyncio.run(
        make_sample_clip(find_ffmpeg(), folder / "av.mp4", duration_s=2.0, width=320, height=240, fps=25)
    )


@pytest.fixture
def settings() -> ProcessingSettings:
    return ProcessingSettings(ffmpeg=find_ffmpeg(), threads=2, stall_timeout_s=30)


@pytest.fixture
def encodes(tmp_path: Path) -> EncodeCache:
    return EncodeCache(tmp_path / "kept", max_bytes=10**9)


class Runner:
    """Jobs run one after the other like one runner does, its inputs served from local files."""

    def __init__(self, root: Path, settings: ProcessingSettings, encodes: EncodeCache | None) -> None:
        self.root, self.settings, self.encodes = root, settings, encodes
        self.fetched: list[str] = []
        self.count = 0

    async def run(self, job_type: JobType, payload: dict[str, Any], inputs: dict[str, Path]) -> JobOutput:
        self.count += 1
        work_dir = self.root / f"job-{self.count}"
        work_dir.mkdir(parents=True)

        async def fetch(url: str) -> Path:
            self.fetched.append(url)
            return inputs[url]

        job = AcceptedJob(f"job-{self.count}", job_type, payload, "ptrjt-test", "http://tube.test")
        context = JobContext(job, work_dir, self.settings, fetch, lambda _: None, encodes=self.encodes)
        return await PROCESSORS[job_type](context)


def payload(
    resolution: int, fps: int, *, separated_audio: bool = False, ladder: Any = None
) -> dict[str, Any]:
    output: dict[str, Any] = {"resolution": resolution, "fps": fps}
    if separated_audio:
        output["separatedAudio"] = True
    body: dict[str, Any] = {
        "input": {"videoFileUrl": VIDEO_URL, "separatedAudioFileUrl": []},
        "output": output,
    }
    if ladder is not None:
        body["tuberunnerLadder"] = ladder
    return body


def video_packets(path: Path) -> list[str]:
    return packets(path, "video")


def packets(path: Path, kind: str) -> list[str]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0] if kind == "video" else container.streams.audio[0]
        return [hashlib.sha256(bytes(p)).hexdigest() for p in container.demux(stream) if p.size]


# ------------------------------------------------------------------------------------------ the copy rule


def described(**changes: Any) -> MediaInfo:
    video = VideoInfo("h264", "High", 31, 1280, 720, 30.0, "yuv420p", 1_500_000, 0)
    audio = AudioInfo("aac", "LC", 48000, 2, "stereo", 128_000)
    info = MediaInfo(Path("x.mp4"), "mov,mp4", 30.0, 6_000_000, 1_630_000, video, audio)
    video_changes = {k: v for k, v in changes.items() if k in VideoInfo.__slots__}
    audio_changes = {k[6:]: v for k, v in changes.items() if k.startswith("audio_")}
    return replace(info, video=replace(video, **video_changes), audio=replace(audio, **audio_changes))


GOOD_KEYS = KeyframeSpacing(keyframes=15, starts_with_keyframe=True, max_interval_s=2.0)


@pytest.mark.parametrize(
    ("changes", "keys", "reason"),
    [
        ({"codec": "hevc"}, GOOD_KEYS, "hevc"),
        ({"profile": "High 4:4:4 Predictive"}, GOOD_KEYS, "profile"),
        ({"level": 52}, GOOD_KEYS, "level"),
        ({"pix_fmt": "yuvj420p"}, GOOD_KEYS, "pixel format"),
        ({"rotation": 90}, GOOD_KEYS, "rotated"),
        ({"width": 1920, "height": 1080}, GOOD_KEYS, "not 720p"),
        ({"fps": 25.0}, GOOD_KEYS, "fps"),
        ({"bit_rate": 9_000_000}, GOOD_KEYS, "above the cap"),
        ({"audio_codec": "mp3"}, GOOD_KEYS, "audio"),
        ({}, KeyframeSpacing(3, True, 10.0), "keyframes up to 10.00 s"),
        ({}, KeyframeSpacing(15, False, 2.0), "keyframe"),
    ],
)
def test_an_input_that_differs_from_the_rendition_in_any_way_is_encoded(
    changes: dict[str, Any], keys: KeyframeSpacing, reason: str
) -> None:
    problem = hls_copy_problem(described(**changes), keys, resolution=720, fps=30, with_audio=True)
    assert problem is not None
    assert reason in problem


def test_an_input_that_is_the_rendition_is_copied() -> None:
    assert hls_copy_problem(described(), GOOD_KEYS, resolution=720, fps=30, with_audio=True) is None
    # Audio the profile would re-encode does not matter for a video-only rendition.
    mp3 = described(audio_codec="mp3")
    assert hls_copy_problem(mp3, GOOD_KEYS, resolution=720, fps=30, with_audio=False) is None
    # The audio-only rendition: copied when the AAC rule copies it, in stereo or mono.
    assert hls_copy_problem(described(), None, resolution=0, fps=0, with_audio=True) is None
    surround = described(audio_channels=6, audio_channel_layout="5.1")
    assert hls_copy_problem(surround, None, resolution=0, fps=0, with_audio=True) is not None
    assert hls_copy_problem(surround, GOOD_KEYS, resolution=720, fps=30, with_audio=True) is not None


def test_a_ladder_encodes_each_rung_with_exactly_the_options_of_its_web_video() -> None:
    info, settings = described(), EncodeSettings(threads=2)
    rungs = [LadderRung(720, 30, Path("/out/720.mp4")), LadderRung(480, 30, Path("/out/480.mp4"))]
    ladder = ladder_command(info, rungs, settings=settings)
    graph = ladder[ladder.index("-filter_complex") + 1]
    assert graph.count("[0:v:0]") == 1  # one decode
    start = ladder.index("/out/720.mp4") + 1
    for index, rung in enumerate(rungs):
        alone = web_video_command(info, rung.output, resolution=rung.resolution, fps=30, settings=settings)
        outputs = alone[alone.index("-map") :]
        scale = outputs.index("-vf")
        assert f"[split{index}]scale={outputs[scale + 1].removeprefix('scale=')}[rung{index}]" in graph
        del outputs[scale : scale + 2]
        outputs[outputs.index("0:v:0")] = f"[rung{index}]"
        part = ladder[:start] if index == 0 else ladder[start:]
        assert part[part.index("-map") :] == outputs


async def test_keyframe_spacing_reads_the_gop(clip: Path) -> None:
    spacing = await keyframe_spacing(clip)
    assert spacing.starts_with_keyframe
    assert spacing.keyframes == 1
    assert spacing.max_interval_s == pytest.approx(2.0, abs=0.05)


# ------------------------------------------------------------------------------------------ processors


async def test_hls_of_an_input_that_already_is_the_rendition_is_packaged_not_encoded(
    clip: Path, settings: ProcessingSettings, tmp_path: Path
) -> None:
    runner = Runner(tmp_path, settings, None)
    output = await runner.run(JobType.VOD_HLS, payload(240, 25, separated_audio=True), {VIDEO_URL: clip})
    fragmented = output.files["videoFile"]
    assert video_packets(fragmented) == video_packets(clip)
    info = await probe(fragmented)
    assert info.audio is None
    assert info.duration_s == pytest.approx(2.0, abs=0.1)
    assert "#EXT-X-ENDLIST" in output.files["resolutionPlaylistFile"].read_text()


async def test_a_rendition_with_audio_copies_both_streams_of_its_input(
    clip: Path, settings: ProcessingSettings, tmp_path: Path
) -> None:
    runner = Runner(tmp_path, settings, None)
    output = await runner.run(JobType.VOD_HLS, payload(240, 25), {VIDEO_URL: clip})
    fragmented = output.files["videoFile"]
    assert video_packets(fragmented) == video_packets(clip)
    # AAC 128k stereo is what the profile copies: the same audio packets.
    assert packets(fragmented, "audio") == packets(clip, "audio")


async def test_hls_at_another_frame_rate_is_encoded(
    clip: Path, settings: ProcessingSettings, tmp_path: Path
) -> None:
    runner = Runner(tmp_path, settings, None)
    output = await runner.run(JobType.VOD_HLS, payload(240, 24, separated_audio=True), {VIDEO_URL: clip})
    fragmented = output.files["videoFile"]
    assert video_packets(fragmented) != video_packets(clip)
    info = await probe(fragmented)
    assert info.video is not None
    assert info.video.fps == pytest.approx(24, abs=0.01)


async def test_hls_packages_the_web_video_the_runner_encoded_from_the_same_input(
    clip: Path, settings: ProcessingSettings, encodes: EncodeCache, tmp_path: Path
) -> None:
    runner = Runner(tmp_path, settings, encodes)
    web = await runner.run(JobType.VOD_WEB_VIDEO, payload(144, 25), {VIDEO_URL: clip})
    web_packets = video_packets(web.files["videoFile"])
    hls = await runner.run(JobType.VOD_HLS, payload(144, 25, separated_audio=True), {VIDEO_URL: clip})
    assert video_packets(hls.files["videoFile"]) == web_packets
    assert encodes.stats.reused == 1
    # Another rung (or any other setting) is not the same encode: encoded.
    other = await runner.run(JobType.VOD_HLS, payload(144, 24, separated_audio=True), {VIDEO_URL: clip})
    assert video_packets(other.files["videoFile"]) != web_packets
    assert encodes.stats.reused == 1


async def test_a_kept_web_video_of_another_input_version_is_not_used(
    clip: Path, settings: ProcessingSettings, encodes: EncodeCache, tmp_path: Path
) -> None:
    runner = Runner(tmp_path, settings, encodes)
    web = await runner.run(JobType.VOD_WEB_VIDEO, payload(144, 25), {VIDEO_URL: clip})
    changed = tmp_path / "changed.mp4"
    changed.write_bytes(clip.read_bytes() + b"\0")  # same media, other bytes: another version
    hls = await runner.run(JobType.VOD_HLS, payload(144, 25, separated_audio=True), {VIDEO_URL: changed})
    assert encodes.stats.reused == 0
    # Encoded from the changed file (x264 is deterministic: the same packets, made again).
    assert video_packets(hls.files["videoFile"]) == video_packets(web.files["videoFile"])


async def test_a_ladder_parent_keeps_its_rungs_for_their_jobs_which_neither_download_nor_encode(
    clip: Path, settings: ProcessingSettings, encodes: EncodeCache, tmp_path: Path
) -> None:
    runner = Runner(tmp_path, settings, encodes)
    rungs = [{"resolution": 144, "fps": 25}, {"resolution": 120, "fps": 15}]
    parent = await runner.run(
        JobType.VOD_WEB_VIDEO, payload(240, 25, ladder={"id": LADDER, "rungs": rungs}), {VIDEO_URL: clip}
    )
    assert (await probe(parent.files["videoFile"])).video.height == 240  # type: ignore[union-attr]
    assert encodes.stats.stored == 3  # the three rungs
    runner.fetched.clear()
    child = {"id": LADDER}
    web = await runner.run(JobType.VOD_WEB_VIDEO, payload(120, 15, ladder=child), {})
    hls = await runner.run(JobType.VOD_HLS, payload(120, 15, separated_audio=True, ladder=child), {})
    top = await runner.run(JobType.VOD_HLS, payload(240, 25, separated_audio=True, ladder=child), {})
    assert runner.fetched == []
    info = await probe(web.files["videoFile"])
    assert info.video is not None
    assert (info.video.width, info.video.height) == (160, 120)
    assert info.video.fps == pytest.approx(15, abs=0.01)
    assert info.audio is not None
    assert video_packets(hls.files["videoFile"]) == video_packets(web.files["videoFile"])
    assert video_packets(top.files["videoFile"]) == video_packets(parent.files["videoFile"])


async def test_a_rung_job_on_a_runner_without_the_ladder_encodes_from_its_input(
    clip: Path, settings: ProcessingSettings, encodes: EncodeCache, tmp_path: Path
) -> None:
    maker = Runner(tmp_path / "maker", settings, encodes)
    rungs = [{"resolution": 144, "fps": 25}]
    await maker.run(
        JobType.VOD_WEB_VIDEO, payload(240, 25, ladder={"id": LADDER, "rungs": rungs}), {VIDEO_URL: clip}
    )
    for other_cache in (None, EncodeCache(tmp_path / "other", max_bytes=10**9)):
        other = Runner(tmp_path / f"other-{other_cache is None}", settings, other_cache)
        web = await other.run(
            JobType.VOD_WEB_VIDEO, payload(144, 25, ladder={"id": LADDER}), {VIDEO_URL: clip}
        )
        assert other.fetched == [VIDEO_URL]
        info = await probe(web.files["videoFile"])
        assert info.video is not None
        assert info.video.height == 144


async def test_a_failing_ladder_leaves_the_parent_encoding_its_own_rendition(
    clip: Path, settings: ProcessingSettings, encodes: EncodeCache, tmp_path: Path
) -> None:
    runner = Runner(tmp_path, settings, encodes)
    # A 1-pixel-high rung cannot be encoded in 4:2:0: the ladder's ffmpeg fails.
    ladder = {"id": LADDER, "rungs": [{"resolution": 1, "fps": 25}]}
    parent = await runner.run(JobType.VOD_WEB_VIDEO, payload(144, 25, ladder=ladder), {VIDEO_URL: clip})
    info = await probe(parent.files["videoFile"])
    assert info.video is not None
    assert info.video.height == 144
    assert info.duration_s == pytest.approx(2.0, abs=0.1)
    rung = EncodeKey.of_rung("http://tube.test", VIDEO, LADDER, 1, 25, [])
    assert encodes.take(rung, tmp_path / "nothing.mp4") is None


def test_the_kept_encodes_stay_within_their_budget(tmp_path: Path) -> None:
    now = [0.0]
    cache = EncodeCache(tmp_path / "kept", max_bytes=250, max_idle_s=60, clock=lambda: now[0])
    keys = [EncodeKey("http://tube.test", VIDEO, str(n)) for n in range(3)]
    for key in keys:
        made = tmp_path / f"{key.digest}.mp4"
        made.write_bytes(b"x" * 100)
        now[0] += 1
        cache.put(key, made, duration_s=1.0)
    assert cache.size_bytes == 200  # the least recently used went
    assert cache.take(keys[0], tmp_path / "a.mp4") is None
    assert cache.take(keys[2], tmp_path / "c.mp4") is not None
    assert cache.holds_video("http://tube.test", VIDEO)
    now[0] += 61
    cache.prune()
    assert cache.size_bytes == 0
    assert not cache.holds_video("http://tube.test", VIDEO)
