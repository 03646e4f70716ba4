"""`video-transcription` (spec §7.6, notes §3.7): speech to a WebVTT file, in the detected language or the
one asked for.

Like the official runner: fetch `input.videoFileUrl` with the job's tokens, refuse an input without audio
("This input file does not contain audio"), run the engine, upload `payload[vttFile]` with
`payload[inputLanguage]` (the ISO 639-1 code whisper detected). Unlike it: progress is reported (the
fraction of the media decoded, segment by segment), a transcription that decodes nothing for the stall
timeout is stopped and reported, cancellation stops the work at once (a CLI engine's process group is
killed; the in-process decoder stops before its next segment and the job ends once its thread has), and a
requested language is honoured (`payload.language`, a Tuberunner extension PeerTube never sends).

Memory: a transcription holds the model's working memory (the model itself is loaded once per process), so
one runner runs at most `[transcription] concurrency` of them at once (default 1): `refusal()` makes the
runner leave other transcription offers to other runners while its slots are taken, and a job accepted in
the same instant waits for a slot (still heartbeating) rather than running beside the others.
"""

from __future__ import annotations

import asyncio
import re

from tuberunner.media.errors import FfmpegFailed, FfmpegRunError, FfmpegUnavailable
from tuberunner.protocol.payloads import TranscriptionPayload
from tuberunner.runner.config import RunnerConfig
from tuberunner.runner.errors import JobFailed
from tuberunner.runner.job import JobContext, JobOutput
from tuberunner.runner.processors.common import MAX_MESSAGE_CHARS, payload_of, probe_input
from tuberunner.transcription import (
    Engine,
    Limits,
    TranscriptionError,
    TranscriptionSettings,
    make_engine,
    write_vtt,
)

__all__ = ["NO_AUDIO_MESSAGE", "TranscriptionProcessor", "transcription_settings"]

# The official runner's message, word for word.
NO_AUDIO_MESSAGE = "This input file does not contain audio"
_LANGUAGE = re.compile(r"^[a-z]{2,3}$")
_STDERR_TAIL_CHARS = 2000


def transcription_settings(config: RunnerConfig) -> TranscriptionSettings:
    """The `[transcription]` section of a runner's configuration."""
    return TranscriptionSettings(
        engine=config.transcription_engine,
        engine_path=config.transcription_engine_path,
        model=config.transcription_model,
        model_path=config.transcription_model_path,
        device=config.transcription_device,
        compute_type=config.transcription_compute_type,
        threads=config.transcription_threads,
        concurrency=config.transcription_concurrency,
        vad=config.transcription_vad,
        word_timestamps=config.transcription_word_timestamps,
        temperature_fallback=config.transcription_temperature_fallback,
    )


def _requested_language(payload: TranscriptionPayload) -> str | None:
    extra = payload.model_extra or {}
    value = extra.get("language")
    if isinstance(value, str) and _LANGUAGE.match(value.strip().lower()):
        return value.strip().lower()
    return None


class TranscriptionProcessor:
    """The processor of one runner: its engine and its transcription slots."""

    def __init__(self, settings: TranscriptionSettings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.engine = engine if engine is not None else make_engine(settings)
        self.running = 0
        self._slots = asyncio.Semaphore(settings.concurrency)

    def refusal(self) -> str | None:
        """Why a new transcription job should be left to other runners now, or None."""
        if self.running >= self.settings.concurrency:
            return (
                f"{self.running} transcription job(s) already running here "
                f"(transcription.concurrency = {self.settings.concurrency})"
            )
        return None

    async def __call__(self, ctx: JobContext) -> JobOutput:
        payload = payload_of(ctx, TranscriptionPayload)
        media = await probe_input(await ctx.fetch_input(payload.input.videoFileUrl), "input")
        if media.audio is None:
            raise JobFailed(NO_AUDIO_MESSAGE)
        settings = ctx.settings
        limits = Limits(
            ffmpeg=settings.ffmpeg,
            stall_timeout_s=settings.stall_timeout_s,
            max_duration_s=settings.max_duration_s,
            nice=settings.nice,
        )
        async with self._slots:
            self.running += 1
            try:
                transcript = await self.engine.transcribe(
                    media.path,
                    ctx.work_dir,
                    duration_s=media.duration_s,
                    language=_requested_language(payload),
                    limits=limits,
                    on_progress=lambda fraction: ctx.report_progress(round(fraction * 100, 1)),
                )
            except TranscriptionError as exc:
                raise JobFailed(_limit(f"Transcription failed: {exc}")) from exc
            except FfmpegFailed as exc:
                tail = exc.stderr_tail[-_STDERR_TAIL_CHARS:]
                raise JobFailed(
                    _limit(
                        f"Transcription failed: decoding the audio: {exc}\n"
                        f"--- ffmpeg stderr (end) ---\n{tail}"
                    )
                ) from exc
            except (FfmpegRunError, FfmpegUnavailable) as exc:
                raise JobFailed(_limit(f"Transcription failed: decoding the audio: {exc}")) from exc
            finally:
                self.running -= 1
        vtt = ctx.work_dir / f"{ctx.job.uuid}.vtt"
        vtt.write_text(write_vtt(transcript.cues, duration_s=media.duration_s), encoding="utf-8")
        return JobOutput(files={"vttFile": vtt}, fields={"inputLanguage": transcript.language})


def _limit(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 1] + "…"
