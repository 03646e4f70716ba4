"""`generate-video-storyboard` (spec §7.7, notes §3.8): one JPEG sprite sheet from the payload's grid."""

from __future__ import annotations

from tuberunner.media.commands import storyboard_command
from tuberunner.media.profiles import StoryboardSprites
from tuberunner.protocol.payloads import StoryboardPayload
from tuberunner.runner.errors import JobFailed
from tuberunner.runner.job import JobContext, JobOutput
from tuberunner.runner.processors.common import encode_settings, payload_of, probe_input, run_encode

__all__ = ["storyboard"]


async def storyboard(ctx: JobContext) -> JobOutput:
    payload = payload_of(ctx, StoryboardPayload)
    sprites = payload.sprites
    what = "Storyboard generation"
    video = await probe_input(await ctx.fetch_input(payload.input.videoFileUrl), "video input")
    if video.video is None:
        raise JobFailed(f"{what}: the input {video.path.name} has no video stream")
    grid = StoryboardSprites(
        width=sprites.size.width,
        height=sprites.size.height,
        columns=sprites.count.width,
        rows=sprites.count.height,
        duration_s=sprites.duration,
    )
    output = ctx.work_dir / f"storyboard-{ctx.job.uuid}.jpg"
    args = storyboard_command(video.path, output, grid, encode_settings(ctx))
    await run_encode(ctx, args, duration_s=video.duration_s, what=what)
    if not output.is_file() or output.stat().st_size == 0:
        raise JobFailed(f"{what}: ffmpeg wrote no sprite sheet")
    return JobOutput(files={"storyboardFile": output})
