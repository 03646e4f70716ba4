"""The in-process engine on the real loading and decoding path (faster-whisper, CTranslate2, ffmpeg) with
the tiny random model: well-formed cues, progress by decoded duration, one model per process, and a
cancelled or stalled transcription that stops at once (its thread returns, nothing more is decoded)."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from tests.transcription.conftest import Clips, no_transcribe_thread_left, tiny_settings, transcribe_threads
from tuberunner.media.binaries import find_ffmpeg
from tuberunner.media.probe import probe
from tuberunner.transcription import (
    Limits,
    TranscriptionError,
    TranscriptionStalled,
    engine_problem,
    make_engine,
    parse_vtt,
    write_vtt,
)
from tuberunner.transcription.faster import FasterWhisperEngine, _load_model, loaded_models

LANGUAGE = re.compile(r"^[a-z]{2,3}$")


async def test_the_tiny_model_transcribes_a_clip_into_well_formed_monotonic_cues(
    tiny_model: Path, clips: Clips, tmp_path: Path
) -> None:
    settings = tiny_settings(tiny_model)
    assert engine_problem(settings) is None
    engine = make_engine(settings)
    assert isinstance(engine, FasterWhisperEngine)
    duration_s = (await probe(clips.tone)).duration_s
    progress: list[float] = []
    transcript = await engine.transcribe(
        clips.tone,
        tmp_path,
        duration_s=duration_s,
        language=None,
        limits=Limits(ffmpeg=find_ffmpeg()),
        on_progress=progress.append,
    )
    assert LANGUAGE.match(transcript.language), transcript.language
    assert transcript.cues, "a random model still emits tokens over 20 s of audio"
    # Progress is the decoded share of the duration, growing, and reaching the end.
    assert progress == sorted(progress)
    assert progress[0] > 0
    assert progress[-1] == pytest.approx(1.0, abs=0.05)
    assert all(0 <= value <= 1 for value in progress)
    # The document written from the raw segments parses strictly: ordered, each cue ends after it starts,
    # all inside the media.
    cues = parse_vtt(write_vtt(transcript.cues, duration_s=duration_s))
    assert cues
    starts = [cue.start_s for cue in cues]
    assert starts == sorted(starts)
    assert all(cue.end_s > cue.start_s for cue in cues)
    assert all(cue.start_s >= 0 for cue in cues)
    assert all(cue.end_s <= duration_s + 0.001 for cue in cues)
    assert all(cue.text.strip() for cue in cues)
    # The audio decoded for the model does not stay on disk.
    assert list(tmp_path.iterdir()) == []
    assert no_transcribe_thread_left(timeout_s=1.0)


async def test_the_model_is_loaded_once_per_process_and_kept(tiny_model: Path) -> None:
    settings = tiny_settings(tiny_model, threads=2)
    first = await asyncio.to_thread(_load_model, settings)
    held = loaded_models()
    assert await asyncio.to_thread(_load_model, settings) is first
    assert loaded_models() == held


async def test_a_model_that_cannot_be_loaded_is_a_transcription_error_naming_it(
    tmp_path: Path, clips: Clips
) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model.bin").write_bytes(b"not a model")
    engine = make_engine(tiny_settings(broken))
    with pytest.raises(TranscriptionError, match=r"cannot load the transcription model .*broken-model"):
        await engine.transcribe(
            clips.tone,
            tmp_path,
            duration_s=20.0,
            language=None,
            limits=Limits(ffmpeg=find_ffmpeg()),
            on_progress=lambda fraction: None,
        )


async def test_a_cancelled_transcription_stops_before_the_next_segment_and_its_thread_returns(
    tiny_model: Path, clips: Clips, tmp_path: Path
) -> None:
    engine = make_engine(tiny_settings(tiny_model))
    first_segment = asyncio.Event()
    progress: list[float] = []

    def on_progress(fraction: float) -> None:
        progress.append(fraction)
        first_segment.set()

    task = asyncio.create_task(
        engine.transcribe(
            clips.long_tone,
            tmp_path,
            duration_s=180.0,
            language=None,
            limits=Limits(ffmpeg=find_ffmpeg()),
            on_progress=on_progress,
        )
    )
    await asyncio.wait_for(first_segment.wait(), 60)
    assert [t.is_alive() for t in transcribe_threads()] == [True]
    cancelled_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stop_s = time.monotonic() - cancelled_at
    # The call returns only once the decoder's thread has: nothing is left decoding.
    assert no_transcribe_thread_left(timeout_s=0.5)
    print(f"cancel → transcription thread gone: {stop_s:.3f} s")
    # The thread posted its end after its last segment, so every segment it decoded has been reported:
    # at most the window being decoded when the cancel came, far from the 180 s of audio.
    assert progress[-1] < 0.5


async def test_a_transcription_that_decodes_nothing_within_the_stall_timeout_is_stopped(
    tiny_model: Path, clips: Clips, tmp_path: Path
) -> None:
    engine = make_engine(tiny_settings(tiny_model))
    # Language detection and the first 30 s window take far longer than 1 ms: a stall by that measure.
    # (ffmpeg's audio decode is watched with a floor of 5 s: its progress comes twice a second.)
    limits = Limits(ffmpeg=find_ffmpeg(), stall_timeout_s=0.001)
    with pytest.raises(TranscriptionStalled, match=r"decoded nothing for 0\.001 s"):
        await engine.transcribe(
            clips.long_tone,
            tmp_path,
            duration_s=180.0,
            language=None,
            limits=limits,
            on_progress=lambda fraction: None,
        )
    assert no_transcribe_thread_left(timeout_s=0.5)
