"""`tuberunner transcode` with studio edits: the one-shot session (embedded coordinator and runner, real
ffmpeg) in this process, and the `--cut` option's parsing; the outputs in OUT/ are those of the edited
video. (A subprocess per case costs 10-20 s of interpreter start-up on these machines; `tests/oneshot` runs
the command as a user does.)"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import typer

from tests.studio.conftest import MAIN_SIZE, StudioMedia
from tuberunner.cli import _parse_cut
from tuberunner.media.probe import probe
from tuberunner.oneshot.session import TranscodeError, TranscodeOptions, check_paths, transcode

DURATION_TOLERANCE_S = 0.2


async def test_transcode_applies_the_edits_before_transcoding(
    tmp_path: Path, studio_media: StudioMedia
) -> None:
    out = tmp_path / "out"
    options = TranscodeOptions(
        input=studio_media.main,
        output=out,
        resolutions=(1080,),
        hls=False,
        cut=_parse_cut("0.5-2"),
        intro=studio_media.intro,
        outro=studio_media.outro,
        watermark=studio_media.watermark,
        threads=1,
    )
    seen: list[dict[str, Any]] = []
    result = await transcode(options, seen.append, asyncio.Event())
    assert result.video["state"] == "published"
    # While the studio job ran, it was the video's only job.
    assert [job["type"] for job in seen[0]["jobs"]["list"]] == ["video-studio-transcoding"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["studio"]["cutStart"] == 0.5
    assert summary["studio"]["cutEnd"] == 2
    assert [job["type"] for job in summary["jobs"]] == [
        "video-studio-transcoding",
        "vod-web-video-transcoding",
    ]
    (web,) = summary["webVideos"]
    info = await probe(out / web["file"])
    intro, outro = await probe(studio_media.intro), await probe(studio_media.outro)
    assert info.video is not None
    assert (info.video.width, info.video.height) == MAIN_SIZE
    assert info.audio is not None
    assert abs(info.duration_s - (intro.duration_s + 1.5 + outro.duration_s)) <= DURATION_TOLERANCE_S


def test_cut_is_start_dash_end_in_seconds() -> None:
    assert _parse_cut("0.5-2") == (0.5, 2.0)
    assert _parse_cut("5-") == (5.0, None)
    assert _parse_cut("-10") == (None, 10.0)
    assert _parse_cut(None) is None
    for bad in ("2-1", "x-3", "-", "3", ""):
        with pytest.raises(typer.BadParameter):
            _parse_cut(bad)


def test_a_missing_edit_file_is_a_usage_error(tmp_path: Path, studio_media: StudioMedia) -> None:
    missing = tmp_path / "nope.mp4"
    options = TranscodeOptions(input=studio_media.main, output=tmp_path / "out", intro=missing)
    with pytest.raises(TranscodeError, match="--intro file not found") as raised:
        check_paths(options)
    assert raised.value.exit_code == 2
