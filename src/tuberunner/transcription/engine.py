"""The engine interface the transcription processor drives, and its errors.

    TranscriptionError          the engine could not transcribe (message for the job's error)
    ├── TranscriptionStalled    no decoded segment for `stall_timeout_s`
    └── TranscriptionTimedOut   longer than `max_duration_s`

An engine turns a media file into a `Transcript`. It reports progress as the fraction of the media's
duration decoded so far (end of the last segment / duration), which also proves that it advances: the
stall watchdog of each engine counts from the last segment. Cancelling the awaiting task stops the work at
once (a child process is killed; the in-process decoder stops before its next segment and the call returns
only once its thread has).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tuberunner.transcription.vtt import Cue

__all__ = [
    "Engine",
    "Limits",
    "Transcript",
    "TranscriptionError",
    "TranscriptionStalled",
    "TranscriptionTimedOut",
]


class TranscriptionError(Exception):
    """The engine failed; `str()` says why."""


class TranscriptionStalled(TranscriptionError):
    pass


class TranscriptionTimedOut(TranscriptionError):
    pass


@dataclass(frozen=True)
class Transcript:
    # ISO 639-1 code (what whisper detects or was told).
    language: str
    cues: list[Cue]


@dataclass(frozen=True)
class Limits:
    ffmpeg: Path
    stall_timeout_s: float = 120.0
    max_duration_s: float | None = None
    nice: int = 0


class Engine(Protocol):
    async def transcribe(
        self,
        media: Path,
        work_dir: Path,
        *,
        duration_s: float,
        language: str | None,
        limits: Limits,
        on_progress: Callable[[float], None],
    ) -> Transcript:
        """Transcribe `media` (any file ffmpeg reads) using `work_dir` for temporary files; `on_progress`
        receives the fraction decoded (0-1), on the event loop."""
        ...
