"""The command-line engines' supervision: progress from the verbose segment lines, outputs read under the
input's base name, and a child that is cancelled, stalls or fails is killed with its process group.

The real `whisper-ctranslate2` / `openai-whisper` cannot run within a test's budget here (a random
checkpoint through openai-whisper takes minutes), so a small executable stands in for them: it takes the
official runner's command line and behaves as the engines do (prints `[start --> end] text` lines, writes
`<base>.vtt` and `<base>.json`), or hangs, or fails, as the test asks through the environment.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from tests.transcription.conftest import Clips
from tuberunner.media.binaries import find_ffmpeg
from tuberunner.transcription import (
    Limits,
    TranscriptionError,
    TranscriptionSettings,
    TranscriptionStalled,
    engine_problem,
    make_engine,
)

STAND_IN = """\
import json, os, pathlib, sys, time
args = sys.argv[1:]
media = pathlib.Path(args[0])
out = pathlib.Path(args[args.index("--output_dir") + 1])
mode = os.environ["STAND_IN_MODE"]
pathlib.Path(os.environ["STAND_IN_PID_FILE"]).write_text(str(os.getpid()))
print("Detected language: French", flush=True)
print("[00:00.000 --> 00:05.000]  bonjour", flush=True)
if mode == "hang":
    time.sleep(3600)
if mode == "fail":
    print("RuntimeError: out of memory", file=sys.stderr, flush=True)
    sys.exit(3)
print("[00:05.000 --> 00:10.000]  le monde", flush=True)
(out / (media.stem + ".vtt")).write_text(
    "WEBVTT\\n\\n00:00.000 --> 00:05.000\\nbonjour\\n\\n00:05.000 --> 00:10.000\\nle monde\\n"
)
(out / (media.stem + ".json")).write_text(json.dumps({"language": "fr", "text": "bonjour le monde"}))
"""


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TranscriptionSettings:
    script = tmp_path / "whisper-ctranslate2"
    script.write_text(f"#!{sys.executable}\n{STAND_IN}")
    script.chmod(0o755)
    monkeypatch.setenv("STAND_IN_PID_FILE", str(tmp_path / "pid"))
    settings = TranscriptionSettings(engine="whisper-ctranslate2", engine_path=str(script), model="small")
    assert engine_problem(settings) is None
    return settings


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_the_engine_output_becomes_the_transcript_and_its_lines_the_progress(
    stand_in: TranscriptionSettings, clips: Clips, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STAND_IN_MODE", "ok")
    progress: list[float] = []
    work = tmp_path / "work"
    work.mkdir()
    transcript = await make_engine(stand_in).transcribe(
        clips.tone,
        work,
        duration_s=20.0,
        language=None,
        limits=Limits(ffmpeg=find_ffmpeg()),
        on_progress=progress.append,
    )
    assert transcript.language == "fr"
    assert [(c.start_s, c.end_s, c.text) for c in transcript.cues] == [(0, 5, "bonjour"), (5, 10, "le monde")]
    assert progress == [0.25, 0.5]
    assert not alive(int((tmp_path / "pid").read_text()))


async def test_a_cancelled_engine_process_is_killed_at_once(
    stand_in: TranscriptionSettings, clips: Clips, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STAND_IN_MODE", "hang")
    started = asyncio.Event()
    task = asyncio.create_task(
        make_engine(stand_in).transcribe(
            clips.tone,
            tmp_path,
            duration_s=20.0,
            language=None,
            limits=Limits(ffmpeg=find_ffmpeg()),
            on_progress=lambda fraction: started.set(),
        )
    )
    await asyncio.wait_for(started.wait(), 30)
    pid = int((tmp_path / "pid").read_text())
    assert alive(pid)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not alive(pid)  # killed and reaped before the call returned


async def test_an_engine_process_that_prints_nothing_for_the_stall_timeout_is_killed(
    stand_in: TranscriptionSettings, clips: Clips, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STAND_IN_MODE", "hang")
    limits = Limits(ffmpeg=find_ffmpeg(), stall_timeout_s=1.0)
    with pytest.raises(TranscriptionStalled, match=r"whisper-ctranslate2 printed nothing for 1 s"):
        await make_engine(stand_in).transcribe(
            clips.tone, tmp_path, duration_s=20.0, language=None, limits=limits, on_progress=lambda f: None
        )
    assert not alive(int((tmp_path / "pid").read_text()))


async def test_a_failing_engine_is_an_error_with_the_end_of_its_output(
    stand_in: TranscriptionSettings, clips: Clips, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STAND_IN_MODE", "fail")
    with pytest.raises(TranscriptionError, match=r"(?s)exited with code 3.*RuntimeError: out of memory"):
        await make_engine(stand_in).transcribe(
            clips.tone,
            tmp_path,
            duration_s=20.0,
            language=None,
            limits=Limits(ffmpeg=find_ffmpeg()),
            on_progress=lambda f: None,
        )
