"""`tuberunner transcode --transcribe` as a user runs it: a real subprocess with the tiny model; the VTT
lands in OUT/ and in summary.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.transcription.conftest import Clips
from tuberunner.cli import _optional_transcribe_value
from tuberunner.transcription import parse_vtt


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["transcode", "in.mp4", "--transcribe"], ["transcode", "in.mp4", "--transcribe", "auto"]),
        (["transcode", "--transcribe", "in.mp4"], ["transcode", "--transcribe", "auto", "in.mp4"]),
        (
            ["transcode", "--transcribe", "-o", "x", "a"],
            ["transcode", "--transcribe", "auto", "-o", "x", "a"],
        ),
        (["transcode", "a", "--transcribe", "fr"], ["transcode", "a", "--transcribe", "fr"]),
        (["transcode", "a"], ["transcode", "a"]),
    ],
)
def test_transcribe_takes_an_optional_language(argv: list[str], expected: list[str]) -> None:
    assert _optional_transcribe_value(argv) == expected


def test_transcode_with_transcribe_writes_the_caption_and_names_it_in_the_summary(
    tiny_model: Path, clips: Clips, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ["transcode", str(clips.tone), "-o", str(out), "--no-hls", "--resolutions", "144", "--transcribe"]
    args += ["--transcription-model", str(tiny_model)]
    done = subprocess.run(
        [sys.executable, "-m", "tuberunner", "--log-level", "warning", *args],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    (caption,) = summary["captions"]
    assert caption["file"] == f"tone-{caption['language']}.vtt"
    # The one-shot keeps the daemon's defaults (voice detection on): a tone holds no speech, so the file
    # may have no cue, but it is well-formed WebVTT.
    cues = parse_vtt((out / caption["file"]).read_text())
    assert all(0 <= c.start_s < c.end_s <= 20.001 for c in cues)
    (job,) = [job for job in summary["jobs"] if job["type"] == "video-transcription"]
    assert job["state"] == "Completed"


def test_transcribe_without_a_usable_model_is_a_usage_error(clips: Clips, tmp_path: Path) -> None:
    args = ["transcode", str(clips.tone), "-o", str(tmp_path / "out"), "--transcribe", "fr"]
    args += ["--transcription-model", str(tmp_path / "missing-model")]
    done = subprocess.run(
        [sys.executable, "-m", "tuberunner", *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert "--transcribe" in done.stderr
    assert "missing-model" in done.stderr
