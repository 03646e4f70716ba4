"""`video-studio-transcoding` (spec §7.5, notes §3.5): the payload's tasks, in order, on the video.

The official runner's shape: download the video, then for each task download its file (intro, outro,
watermark) with the job's tokens, run one ffmpeg (`media.studio`) into a new `output-edition-<uuid>.mp4`,
and delete the previous intermediate file; the last output is `payload[videoFile]`. Progress covers the
whole chain: task i of n reports from i/n to (i+1)/n. A separated audio input (HLS split audio) is first
remuxed with the video (stream copy), so each task reads one file.

Inputs come from `ctx.fetch_input` (shared cache, resumed downloads; never deleted here); cancellation and
the stall watchdog are `run_encode`'s, and the supervisor deletes the work dir whatever happens.
"""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import replace
from pathlib import Path

from tuberunner.media.errors import MediaError
from tuberunner.media.probe import MediaInfo
from tuberunner.media.studio import (
    WatermarkPlacement,
    cut_command,
    cut_duration_s,
    intro_outro_command,
    merge_audio_command,
    watermark_command,
)
from tuberunner.protocol.payloads import CutTask, IntroTask, OutroTask, StudioPayload, StudioTask
from tuberunner.runner.errors import JobFailed
from tuberunner.runner.job import JobContext, JobOutput
from tuberunner.runner.processors.common import encode_settings, payload_of, probe_input, run_encode

__all__ = ["studio"]

# As `run_encode`'s check: an output this much shorter than expected is a failure.
_DURATION_SLACK_S = 0.5
_DURATION_SLACK_RATIO = 0.02


async def studio(ctx: JobContext) -> JobOutput:
    payload = payload_of(ctx, StudioPayload)
    if not payload.tasks:
        raise JobFailed("Studio transcoding: the payload has no task")
    current = await probe_input(await ctx.fetch_input(payload.input.videoFileUrl), "video input")
    if current.video is None:
        raise JobFailed(f"Studio transcoding: the input {current.path.name} has no video stream")
    if payload.input.separatedAudioFileUrl:
        audio_path = await ctx.fetch_input(payload.input.separatedAudioFileUrl[0])
        audio = await probe_input(audio_path, "separated audio input")
        merged = _edition_path(ctx)
        try:
            args = merge_audio_command(current, audio, merged)
        except MediaError as exc:
            raise JobFailed(f"Studio transcoding: {exc}") from exc
        # A stream copy takes moments: it reports no progress, so the tasks' progress only goes up.
        quiet = replace(ctx, report_progress=lambda percent: None)
        await run_encode(quiet, args, duration_s=current.duration_s, what="Merging the separated audio")
        current = await probe_input(merged, "merged input")

    count = len(payload.tasks)
    owned: Path | None = current.path if current.path.parent == ctx.work_dir else None
    for index, task in enumerate(payload.tasks):
        output = _edition_path(ctx)
        produced = await _run_task(_share_of(ctx, index, count), task, current, output, index)
        if owned is not None:
            owned.unlink(missing_ok=True)  # the previous intermediate file, as the official runner does
        current, owned = produced, output
    return JobOutput(files={"videoFile": current.path})


async def _run_task(
    ctx: JobContext, task: StudioTask, video: MediaInfo, output: Path, index: int
) -> MediaInfo:
    """Run one task from `video` into `output`; returns the probe of `output` (the next task's input)."""
    what = f"Studio task {index + 1} ({task.name})"
    settings = encode_settings(ctx)
    try:
        if isinstance(task, CutTask):
            start, end = task.options.start, task.options.end
            try:
                duration_s = cut_duration_s(video, start, end)
            except ValueError as exc:
                raise JobFailed(f"{what}: {exc}") from exc
            args = cut_command(video, output, start_s=start, end_s=end, settings=settings)
        elif isinstance(task, IntroTask | OutroTask):
            kind = "intro" if isinstance(task, IntroTask) else "outro"
            clip = await probe_input(await ctx.fetch_input(task.options.file), f"{kind} file")
            if clip.video is None:
                raise JobFailed(f"{what}: the {kind} file {clip.path.name} has no video stream")
            duration_s = video.duration_s + clip.duration_s
            args = intro_outro_command(video, clip, output, outro=kind == "outro", settings=settings)
        else:
            image = await probe_input(await ctx.fetch_input(task.options.file), "watermark image")
            if image.video is None:
                raise JobFailed(f"{what}: the watermark file {image.path.name} is not an image")
            options = task.options
            placement = WatermarkPlacement(
                size_ratio=options.watermarkSizeRatio,
                horizontal_margin_ratio=options.horitonzalMarginRatio,
                vertical_margin_ratio=options.verticalMarginRatio,
            )
            duration_s = video.duration_s
            args = watermark_command(video, image.path, output, placement=placement, settings=settings)
    except MediaError as exc:
        raise JobFailed(f"{what}: {exc}") from exc
    await run_encode(ctx, args, duration_s=duration_s, what=what)
    if not output.is_file() or output.stat().st_size == 0:
        raise JobFailed(f"{what}: ffmpeg exited normally but wrote no {output.name}")
    # ffmpeg ends "successfully" on an input cut short: the result must last as long as expected.
    produced = await probe_input(output, f"output of {what.lower()}")
    if produced.duration_s < duration_s - max(_DURATION_SLACK_S, duration_s * _DURATION_SLACK_RATIO):
        raise JobFailed(
            f"{what} failed: ffmpeg made {produced.duration_s:.2f} s of the expected {duration_s:.2f} s; "
            "an input is truncated or corrupt"
        )
    return produced


def _share_of(ctx: JobContext, index: int, count: int) -> JobContext:
    """`ctx` whose progress reports are task `index`'s share of the whole chain."""
    report = ctx.report_progress

    def scaled(percent: float | None) -> None:
        report(None if percent is None else round((index * 100 + percent) / count, 1))

    return replace(ctx, report_progress=scaled)


def _edition_path(ctx: JobContext) -> Path:
    return ctx.work_dir / f"output-edition-{uuidlib.uuid4()}.mp4"
