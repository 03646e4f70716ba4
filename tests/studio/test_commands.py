"""The studio command builders on their own, run with the real ffmpeg on tiny clips: the cases the
coordinator's flows do not reach (separated audio, a main video without sound) and the cut's range rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuberunner.media.binaries import find_ffmpeg
from tuberunner.media.commands import EncodeSettings
from tuberunner.media.probe import probe
from tuberunner.media.process import run_ffmpeg
from tuberunner.media.samples import make_sample_clip
from tuberunner.media.studio import cut_duration_s, intro_outro_command, merge_audio_command

SETTINGS = EncodeSettings(threads=1)


async def test_separated_audio_is_merged_with_the_video_by_stream_copy(tmp_path: Path) -> None:
    ffmpeg = find_ffmpeg()
    video = await probe(await make_sample_clip(ffmpeg, tmp_path / "v.mp4", duration_s=2, audio=False))
    audio = await probe(await make_sample_clip(ffmpeg, tmp_path / "a.m4a", duration_s=2, audio_only=True))
    merged = tmp_path / "merged.mp4"
    await run_ffmpeg(ffmpeg, merge_audio_command(video, audio, merged), duration_s=2.0)
    info = await probe(merged)
    assert info.video is not None
    assert info.audio is not None
    assert (info.video.codec, info.audio.codec) == ("h264", "aac")
    assert video.video is not None
    # Stream copy: the picture is the very same stream.
    assert (info.video.width, info.video.height, info.video.profile) == (
        video.video.width,
        video.video.height,
        video.video.profile,
    )
    assert abs(info.duration_s - 2.0) <= 0.2


async def test_an_outro_after_a_silent_video_stays_silent(tmp_path: Path) -> None:
    ffmpeg = find_ffmpeg()
    main = await probe(
        await make_sample_clip(ffmpeg, tmp_path / "m.mp4", duration_s=1.5, width=160, height=90, audio=False)
    )
    outro = await probe(
        await make_sample_clip(ffmpeg, tmp_path / "o.mp4", duration_s=1, width=90, height=160)
    )
    args = intro_outro_command(main, outro, tmp_path / "out.mp4", outro=True, settings=SETTINGS)
    assert "anullsrc" not in args
    await run_ffmpeg(ffmpeg, args, duration_s=2.5)
    info = await probe(tmp_path / "out.mp4")
    assert info.audio is None
    assert info.video is not None
    assert (info.video.width, info.video.height) == (160, 90)
    assert abs(info.duration_s - 2.5) <= 0.2


async def test_a_cut_must_leave_something_of_the_video(tmp_path: Path) -> None:
    video = await probe(
        await make_sample_clip(find_ffmpeg(), tmp_path / "v.mp4", duration_s=2, width=64, height=36)
    )
    assert cut_duration_s(video, 0.5, 1.5) == pytest.approx(1.0)
    assert cut_duration_s(video, None, 1.0) == pytest.approx(1.0)
    assert cut_duration_s(video, 1.0, None) == pytest.approx(video.duration_s - 1.0)
    assert cut_duration_s(video, 0.5, 60) == pytest.approx(video.duration_s - 0.5)
    for start, end in [(3.0, None), (1.5, 1.0), (-1.0, 1.0)]:
        with pytest.raises(ValueError, match="cut"):
            cut_duration_s(video, start, end)
