"""A real Whisper model, only where one is already on this machine (nothing is downloaded): the folder in
`TUBERUNNER_TEST_WHISPER_MODEL`, or faster-whisper's `tiny` in the Hugging Face cache."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.transcription.conftest import Clips, tiny_settings
from tuberunner.media.binaries import find_ffmpeg
from tuberunner.transcription import Limits, make_engine, parse_vtt, write_vtt


def real_model() -> Path | None:
    configured = os.environ.get("TUBERUNNER_TEST_WHISPER_MODEL")
    if configured:
        return Path(configured)
    from faster_whisper.utils import download_model

    try:
        return Path(download_model("tiny", local_files_only=True))
    except Exception:  # not in the cache: the hub's "offline" errors differ between versions
        return None


async def test_a_real_model_transcribes_a_clip_into_well_formed_webvtt(clips: Clips, tmp_path: Path) -> None:
    model = real_model()
    if model is None:
        pytest.skip(
            "no real Whisper model here (set TUBERUNNER_TEST_WHISPER_MODEL or cache faster-whisper tiny)"
        )
    engine = make_engine(tiny_settings(model, vad=True, temperature_fallback=True, beam_size=5))
    transcript = await engine.transcribe(
        clips.tone,
        tmp_path,
        duration_s=20.0,
        language=None,
        limits=Limits(ffmpeg=find_ffmpeg()),
        on_progress=lambda fraction: None,
    )
    assert re.match(r"^[a-z]{2,3}$", transcript.language)
    cues = parse_vtt(write_vtt(transcript.cues, duration_s=20.0))
    assert all(0 <= c.start_s < c.end_s <= 20.001 for c in cues)
