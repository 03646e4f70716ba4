"""The VOD processors: web video, HLS rendition, audio merge (spec §7.1-§7.3, notes §3.2-§3.4).

Each one has the official runner's shape: parse the payload, fetch the inputs, probe them, build the
command (`media.commands`, faithful to PeerTube's preset), run ffmpeg with progress, return the files for
`success`. Files are written in the job's work dir under the official runner's names. Nothing here cleans
up: the supervisor deletes the work dir, and run_ffmpeg kills ffmpeg when the job is cancelled.
"""

from __future__ import annotations

from pathlib import Path

from tuberunner.media.commands import audio_merge_command, hls_command, web_video_command
from tuberunner.media.errors import NoAudioStream
from tuberunner.media.hls_playlist import fix_hls_playlist
from tuberunner.media.probe import MediaInfo
from tuberunner.media.profiles import AUDIO_ONLY_RESOLUTION
from tuberunner.protocol.payloads import AudioMergePayload, HlsPayload, VideoInput, WebVideoPayload
from tuberunner.runner.errors import JobFailed
from tuberunner.runner.job import JobContext, JobOutput
from tuberunner.runner.processors.common import (
    encode_settings,
    no_audio,
    payload_of,
    probe_input,
    run_encode,
)

__all__ = ["audio_merge", "hls", "web_video"]


async def _video_inputs(ctx: JobContext, inputs: VideoInput) -> tuple[MediaInfo, MediaInfo | None]:
    """The max-quality video and, for a source with split audio, its separated audio file (probed)."""
    video = await probe_input(await ctx.fetch_input(inputs.videoFileUrl), "video input")
    audio = None
    if inputs.separatedAudioFileUrl:
        audio_path = await ctx.fetch_input(inputs.separatedAudioFileUrl[0])
        audio = await probe_input(audio_path, "separated audio input")
        if audio.audio is None:
            raise JobFailed(f"The separated audio input {audio_path.name} has no audio stream")
    return video, audio


def _needs_video(video: MediaInfo, resolution: int, what: str) -> None:
    if resolution != AUDIO_ONLY_RESOLUTION and video.video is None:
        raise JobFailed(f"{what} at {resolution}p: the input {video.path.name} has no video stream")


async def web_video(ctx: JobContext) -> JobOutput:
    """`vod-web-video-transcoding`: one progressive, faststart MP4 at the requested resolution and fps."""
    payload = payload_of(ctx, WebVideoPayload)
    resolution, fps = payload.output.resolution, payload.output.fps
    what = f"Web video transcoding to {resolution}p"
    video, audio = await _video_inputs(ctx, payload.input)
    _needs_video(video, resolution, what)
    output = ctx.work_dir / f"output-{ctx.job.uuid}.mp4"
    try:
        args = web_video_command(
            video, output, resolution=resolution, fps=fps, settings=encode_settings(ctx), audio_input=audio
        )
    except NoAudioStream as exc:
        raise no_audio(exc, what) from exc
    await run_encode(ctx, args, duration_s=video.duration_s, what=what, check_output=output)
    return JobOutput(files={"videoFile": _produced(output, what)})


async def hls(ctx: JobContext) -> JobOutput:
    """`vod-hls-transcoding`: a media playlist and the one fragmented MP4 it addresses by byte ranges.

    `resolution: 0` is the audio-only rendition; `separatedAudio` makes a video rendition video-only."""
    payload = payload_of(ctx, HlsPayload)
    resolution, fps = payload.output.resolution, payload.output.fps
    label = "audio-only" if resolution == AUDIO_ONLY_RESOLUTION else f"{resolution}p"
    what = f"HLS transcoding ({label})"
    video, audio = await _video_inputs(ctx, payload.input)
    _needs_video(video, resolution, what)
    playlist = ctx.work_dir / f"{ctx.job.uuid}-{resolution}.m3u8"
    fragmented = ctx.work_dir / f"{ctx.job.uuid}-{resolution}-fragmented.mp4"
    try:
        args = hls_command(
            video,
            playlist,
            fragmented,
            resolution=resolution,
            fps=fps,
            settings=encode_settings(ctx),
            separated_audio=payload.output.separatedAudio,
            audio_input=audio,
        )
    except NoAudioStream as exc:
        raise no_audio(exc, what) from exc
    await run_encode(ctx, args, duration_s=video.duration_s, what=what, check_output=fragmented)
    fix_hls_playlist(_produced(playlist, what))
    return JobOutput(files={"videoFile": _produced(fragmented, what), "resolutionPlaylistFile": playlist})


async def audio_merge(ctx: JobContext) -> JobOutput:
    """`vod-audio-merge-transcoding`: the preview image, looped, over the uploaded audio, as an MP4."""
    payload = payload_of(ctx, AudioMergePayload)
    what = "Audio merge transcoding"
    audio = await probe_input(await ctx.fetch_input(payload.input.audioFileUrl), "audio input")
    if audio.audio is None:
        raise JobFailed(f"{what}: the audio input {audio.path.name} has no audio stream")
    image = await probe_input(await ctx.fetch_input(payload.input.previewFileUrl), "preview image")
    if image.video is None:
        raise JobFailed(f"{what}: the preview {image.path.name} is not an image")
    output = ctx.work_dir / f"output-{ctx.job.uuid}.mp4"
    try:
        args = audio_merge_command(
            image.path,
            audio,
            output,
            resolution=payload.output.resolution,
            fps=payload.output.fps,
            settings=encode_settings(ctx),
        )
    except NoAudioStream as exc:
        raise no_audio(exc, what) from exc
    await run_encode(ctx, args, duration_s=audio.duration_s, what=what, check_output=output)
    return JobOutput(files={"videoFile": _produced(output, what)})


def _produced(path: Path, what: str) -> Path:
    """ffmpeg said it succeeded; make sure the file is really there and not empty."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise JobFailed(f"{what}: ffmpeg exited normally but wrote no {path.name}") from exc
    if size == 0:
        raise JobFailed(f"{what}: ffmpeg exited normally but {path.name} is empty")
    return path
