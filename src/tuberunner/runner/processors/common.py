"""What every processor does the same way: read its payload, probe inputs, run ffmpeg, translate failures.

Every failure of the work itself leaves here as `JobFailed`, with a message written for the instance's
administrator (the server stores it as the job's error, 1-5000 characters): a bad payload, an input ffmpeg
cannot read, an input without the audio the job needs, an ffmpeg that failed (with the tail of its stderr),
stalled or ran too long. Taxonomy errors from fetching inputs (JobGone, TransientError, ...) pass unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from tuberunner.media.commands import EncodeSettings
from tuberunner.media.errors import (
    FfmpegFailed,
    FfmpegRunError,
    FfmpegUnavailable,
    NoAudioStream,
    ProbeError,
)
from tuberunner.media.probe import MediaInfo, probe
from tuberunner.media.process import run_ffmpeg
from tuberunner.media.progress import Progress
from tuberunner.protocol.payloads import parse_payload
from tuberunner.runner.errors import JobFailed
from tuberunner.runner.job import JobContext

__all__ = ["MAX_MESSAGE_CHARS", "encode_settings", "payload_of", "probe_input", "run_encode"]

# The server refuses an error message outside 1-5000 characters (spec §13.5).
MAX_MESSAGE_CHARS = 5000
# How much of ffmpeg's stderr tail goes into the message.
_STDERR_TAIL_CHARS = 3000

P = TypeVar("P", bound=BaseModel)


def payload_of(ctx: JobContext, model: type[P]) -> P:
    """The job's payload as `model`; JobFailed naming the bad fields when it does not fit."""
    try:
        parsed = parse_payload(ctx.job.type, ctx.job.payload)
    except ValidationError as exc:
        raise JobFailed(_limit(f"Invalid {ctx.job.type} payload: {describe_validation(exc)}")) from exc
    if not isinstance(parsed, model):
        raise JobFailed(f"{ctx.job.type} payload is not a {model.__name__}")
    return parsed


def describe_validation(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in error["loc"]) or "payload"
        problems.append(f"{where}: {error['msg']}")
    return "; ".join(problems)


def encode_settings(ctx: JobContext) -> EncodeSettings:
    return EncodeSettings(threads=ctx.settings.threads, has_libfdk_aac=ctx.settings.has_libfdk_aac)


async def probe_input(path: Path, what: str) -> MediaInfo:
    """Probe a downloaded input; JobFailed (naming the input) when it is not usable media."""
    try:
        return await probe(path)
    except ProbeError as exc:
        raise JobFailed(_limit(f"Cannot read the {what}: {exc}")) from exc


async def run_encode(
    ctx: JobContext,
    args: list[str],
    *,
    duration_s: float | None,
    what: str,
    check_output: Path | None = None,
) -> None:
    """Run one ffmpeg command with the job's settings, reporting its progress as it goes.

    Cancellation kills ffmpeg's process group (run_ffmpeg does, before the cancellation goes on).
    With `check_output`, the result must last as long as the input: ffmpeg ends "successfully" on an
    input cut short, and a silently truncated video must not reach the server as a success."""
    settings = ctx.settings

    def on_progress(progress: Progress) -> None:
        if progress.percent is not None:
            ctx.report_progress(round(progress.percent, 1))
        if progress.speed is not None:
            ctx.report_speed(progress.speed)

    try:
        await run_ffmpeg(
            settings.ffmpeg,
            args,
            duration_s=duration_s,
            on_progress=on_progress,
            stall_timeout_s=settings.stall_timeout_s,
            max_duration_s=settings.max_duration_s,
            nice=settings.nice,
            cwd=ctx.work_dir,
        )
    except FfmpegFailed as exc:
        tail = exc.stderr_tail[-_STDERR_TAIL_CHARS:]
        raise JobFailed(_limit(f"{what} failed: {exc}\n--- ffmpeg stderr (end) ---\n{tail}")) from exc
    except (FfmpegRunError, FfmpegUnavailable) as exc:
        raise JobFailed(_limit(f"{what} failed: {exc}")) from exc
    if check_output is not None and duration_s:
        produced = (await probe_input(check_output, "output")).duration_s
        if produced < duration_s - max(_DURATION_SLACK_S, duration_s * 0.02):
            raise JobFailed(
                f"{what} failed: ffmpeg made {produced:.2f} s of the input's {duration_s:.2f} s; "
                "the input is truncated or corrupt"
            )


_DURATION_SLACK_S = 0.5


def no_audio(exc: NoAudioStream, what: str) -> JobFailed:
    return JobFailed(_limit(f"{what}: the input has no audio stream ({exc})"))


def _limit(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 1] + "…"
