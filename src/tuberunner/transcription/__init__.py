"""Speech to WebVTT for `video-transcription` jobs: engines (faster-whisper in-process, or the official
runner's command-line engines), their settings, and the VTT format. Nothing here knows about HTTP."""

from __future__ import annotations

from tuberunner.transcription.engine import (
    Engine,
    Limits,
    Transcript,
    TranscriptionError,
    TranscriptionStalled,
    TranscriptionTimedOut,
)
from tuberunner.transcription.settings import (
    CLI_ENGINES,
    DEFAULT_ENGINE,
    ENGINES,
    IN_PROCESS_ENGINE,
    TranscriptionSettings,
    engine_problem,
)
from tuberunner.transcription.vtt import Cue, VttError, parse_vtt, write_vtt

__all__ = [
    "CLI_ENGINES",
    "DEFAULT_ENGINE",
    "ENGINES",
    "IN_PROCESS_ENGINE",
    "Cue",
    "Engine",
    "Limits",
    "Transcript",
    "TranscriptionError",
    "TranscriptionSettings",
    "TranscriptionStalled",
    "TranscriptionTimedOut",
    "VttError",
    "engine_problem",
    "make_engine",
    "parse_vtt",
    "write_vtt",
]


def make_engine(settings: TranscriptionSettings) -> Engine:
    """The engine `settings` names (its heavy imports happen at its first job)."""
    if settings.engine == IN_PROCESS_ENGINE:
        from tuberunner.transcription.faster import FasterWhisperEngine

        return FasterWhisperEngine(settings)
    if settings.engine in CLI_ENGINES:
        from tuberunner.transcription.cli_engine import CliEngine

        return CliEngine(settings)
    raise ValueError(f"unknown transcription engine {settings.engine!r} (known: {', '.join(ENGINES)})")
