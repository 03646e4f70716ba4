"""The audio whisper hears: the media's first audio stream as 16 kHz mono float32 PCM, decoded by ffmpeg.

ffmpeg runs under `run_ffmpeg`, so the decode of a long video reports progress, is killed when it stalls or
when the job is cancelled, and never outlives the call.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tuberunner.media.process import run_ffmpeg
from tuberunner.media.progress import Progress

__all__ = ["SAMPLE_RATE", "decode_audio_command", "extract_audio"]

SAMPLE_RATE = 16000


def decode_audio_command(media: Path, output: Path) -> list[str]:
    return [
        "-hide_banner",
        "-nostdin",
        "-y",
        "-i",
        str(media),
        "-map",
        "0:a:0",
        "-vn",
        "-sn",
        "-dn",
        "-ac",
        "1",
        "-ar",
        str(SAMPLE_RATE),
        "-c:a",
        "pcm_f32le",
        "-f",
        "f32le",
        str(output),
    ]


async def extract_audio(
    ffmpeg: Path,
    media: Path,
    output: Path,
    *,
    duration_s: float | None,
    stall_timeout_s: float,
    max_duration_s: float | None = None,
    nice: int = 0,
    on_progress: Callable[[Progress], None] | None = None,
) -> Path:
    """Write `media`'s audio to `output` (raw f32le, 16 kHz, mono); ffmpeg's errors propagate."""
    await run_ffmpeg(
        ffmpeg,
        decode_audio_command(media, output),
        duration_s=duration_s,
        on_progress=on_progress,
        stall_timeout_s=stall_timeout_s,
        max_duration_s=max_duration_s,
        nice=nice,
        cwd=output.parent,
    )
    return output
