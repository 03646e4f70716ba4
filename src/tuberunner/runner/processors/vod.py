"""The VOD processors: web video, HLS rendition, audio merge (spec §7.1-§7.3, notes §3.2-§3.4).

Each one has the official runner's shape: parse the payload, fetch the inputs, probe them, build the
command (`media.commands`, faithful to PeerTube's preset), run ffmpeg with progress, return the files for
`success`. Files are written in the job's work dir under the official runner's names. Nothing here cleans
up: the supervisor deletes the work dir, and run_ffmpeg kills ffmpeg when the job is cancelled.

Nothing is encoded twice when the result would be the same (the runner's `EncodeCache`, on any server):

* a web video is kept after its job, under its input's checksum and its whole command; the HLS job of the
  same input, resolution and fps packages it with `-c copy` (`hls_remux_command`) instead of encoding;
* an HLS job whose input already is what the encode would make (`media.stream_copy`: the usual case of the
  max-resolution rendition made from the max-quality file) packages its input the same way;
* a parent web-video job carrying `tuberunnerLadder` rungs (a Tuberunner coordinator) encodes them all in
  one ffmpeg from one decode (`ladder_command`) and keeps them; the rungs' own web-video and HLS jobs then
  take the kept file (no download, no encode). If the ladder's run fails, the job encodes its own output
  alone, as any runner would; if a rung's job finds nothing kept (another runner, a restart, an
  eviction), it encodes as before. Every output is checked as before (streams, duration).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from tuberunner.media.commands import (
    LadderRung,
    audio_merge_command,
    hls_command,
    hls_remux_command,
    ladder_command,
    web_video_command,
)
from tuberunner.media.errors import NoAudioStream, ProbeError
from tuberunner.media.hls_playlist import fix_hls_playlist
from tuberunner.media.probe import MediaInfo, keyframe_spacing
from tuberunner.media.profiles import AUDIO_ONLY_RESOLUTION
from tuberunner.media.stream_copy import hls_copy_problem
from tuberunner.protocol.payloads import (
    AudioMergePayload,
    HlsPayload,
    Ladder,
    VideoInput,
    WebVideoPayload,
)
from tuberunner.runner.encode_cache import CachedEncode, EncodeKey
from tuberunner.runner.errors import JobFailed
from tuberunner.runner.job import JobContext, JobOutput
from tuberunner.runner.processors.common import (
    encode_settings,
    no_audio,
    payload_of,
    probe_input,
    run_encode,
)
from tuberunner.runner.transfers import resource_of

__all__ = ["audio_merge", "hls", "web_video"]

log = logging.getLogger(__name__)


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
    output = ctx.work_dir / f"output-{ctx.job.uuid}.mp4"
    ladder = payload.tuberunnerLadder
    kept = _take_rung(ctx, payload.input, ladder, resolution, fps, output)
    if kept is not None:
        await _check_kept(ctx, kept, what)
        return JobOutput(files={"videoFile": kept.path})
    video, audio = await _video_inputs(ctx, payload.input)
    _needs_video(video, resolution, what)
    try:
        args = web_video_command(
            video, output, resolution=resolution, fps=fps, settings=encode_settings(ctx), audio_input=audio
        )
    except NoAudioStream as exc:
        raise no_audio(exc, what) from exc
    if (
        ladder is not None
        and ladder.rungs
        and ctx.encodes is not None
        and video.video is not None
        and await _encode_ladder(ctx, payload.input, ladder, video, audio, output, resolution, fps, what)
    ):
        return JobOutput(files={"videoFile": _produced(output, what)})
    encode = run_encode(ctx, args, duration_s=video.duration_s, what=what, check_output=output)
    video_uuid = _video_uuid(payload.input)
    if ctx.encodes is None or resolution == AUDIO_ONLY_RESOLUTION:
        await encode
    else:
        # The inputs' checksums (a thread reading the files) are computed while ffmpeg encodes; that
        # side never raises, so an encode failure is the one error gather passes on.
        keying = _command_key(ctx, payload.input, video, audio, resolution, fps)
        _, key = await asyncio.gather(encode, keying)
        if key is not None:
            ctx.encodes.put(key, output, duration_s=video.duration_s)
        if ladder is not None and video_uuid is not None:
            # A rung of a ladder encoded alone (the parent serves the max-resolution HLS job this way).
            rung = _rung_key(ctx, video_uuid, ladder, resolution, fps)
            ctx.encodes.put(rung, output, duration_s=video.duration_s)
    return JobOutput(files={"videoFile": _produced(output, what)})


async def hls(ctx: JobContext) -> JobOutput:
    """`vod-hls-transcoding`: a media playlist and the one fragmented MP4 it addresses by byte ranges.

    `resolution: 0` is the audio-only rendition; `separatedAudio` makes a video rendition video-only."""
    payload = payload_of(ctx, HlsPayload)
    resolution, fps = payload.output.resolution, payload.output.fps
    label = "audio-only" if resolution == AUDIO_ONLY_RESOLUTION else f"{resolution}p"
    what = f"HLS transcoding ({label})"
    playlist = ctx.work_dir / f"{ctx.job.uuid}-{resolution}.m3u8"
    fragmented = ctx.work_dir / f"{ctx.job.uuid}-{resolution}-fragmented.mp4"
    with_audio = resolution == AUDIO_ONLY_RESOLUTION or not payload.output.separatedAudio

    async def package(source: Path, duration_s: float) -> JobOutput:
        with_video = resolution != AUDIO_ONLY_RESOLUTION
        args = hls_remux_command(source, playlist, fragmented, with_video=with_video, with_audio=with_audio)
        await run_encode(ctx, args, duration_s=duration_s, what=what, check_output=fragmented)
        fix_hls_playlist(_produced(playlist, what))
        return JobOutput(files={"videoFile": _produced(fragmented, what), "resolutionPlaylistFile": playlist})

    stem = ctx.work_dir / f"kept-{ctx.job.uuid}.mp4"
    kept = _take_rung(ctx, payload.input, payload.tuberunnerLadder, resolution, fps, stem)
    if kept is not None:
        log.info("%s: packaging the rung this runner already encoded", what)
        return await package(kept.path, kept.duration_s)
    video, audio = await _video_inputs(ctx, payload.input)
    _needs_video(video, resolution, what)
    if ctx.encodes is not None and resolution != AUDIO_ONLY_RESOLUTION and video.video is not None:
        key = await _command_key(ctx, payload.input, video, audio, resolution, fps)
        kept = ctx.encodes.take(key, stem) if key is not None else None
        if kept is not None:
            log.info("%s: packaging the web video this runner encoded from the same input", what)
            return await package(kept.path, kept.duration_s)
    if audio is None or not with_audio:
        problem = await _copy_problem(video, resolution, fps, with_audio)
        if problem is None:
            log.info("%s: the input already is this rendition; packaging it without encoding", what)
            return await package(video.path, video.duration_s)
        log.debug("%s: encoding (the input cannot be copied: %s)", what, problem)
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


# ------------------------------------------------------------------ reuse (see the module docstring)


def _video_uuid(inputs: VideoInput) -> str | None:
    found = resource_of(inputs.videoFileUrl)
    return found[0].lower() if found is not None else None


def _rung_key(ctx: JobContext, video_uuid: str, ladder: Ladder, resolution: int, fps: int) -> EncodeKey:
    settings = ctx.settings
    identity = [os.fspath(settings.ffmpeg), str(settings.threads), str(settings.has_libfdk_aac)]
    return EncodeKey.of_rung(ctx.job.instance_url, video_uuid, ladder.id, resolution, fps, identity)


def _take_rung(
    ctx: JobContext, inputs: VideoInput, ladder: Ladder | None, resolution: int, fps: int, dest: Path
) -> CachedEncode | None:
    """The rung of `ladder` this runner kept for (`resolution`, `fps`), linked to `dest`, if any."""
    video_uuid = _video_uuid(inputs)
    if ctx.encodes is None or ladder is None or video_uuid is None or resolution == AUDIO_ONLY_RESOLUTION:
        return None
    return ctx.encodes.take(_rung_key(ctx, video_uuid, ladder, resolution, fps), dest)


async def _check_kept(ctx: JobContext, kept: CachedEncode, what: str) -> None:
    """A kept encode is checked like a fresh one: a video stream, the input's whole duration."""
    info = await probe_input(kept.path, "kept encode")
    if info.video is None or info.duration_s < kept.duration_s - max(0.5, kept.duration_s * 0.02):
        raise JobFailed(f"{what}: the kept encode {kept.path.name} is not a whole video")


async def _command_key(
    ctx: JobContext,
    inputs: VideoInput,
    video: MediaInfo,
    audio: MediaInfo | None,
    resolution: int,
    fps: int,
) -> EncodeKey | None:
    """The key of the web video (`resolution`, `fps`) of these inputs: their checksums and the command.
    None when an input cannot be read for its checksum (the job then keeps and reuses nothing)."""
    assert ctx.encodes is not None
    placeholder = Path("/output.mp4")
    args = web_video_command(
        video, placeholder, resolution=resolution, fps=fps, settings=encode_settings(ctx), audio_input=audio
    )
    paths = {os.fspath(video.path), *([os.fspath(audio.path)] if audio else [])}
    args = ["<input>" if arg in paths else arg for arg in args]
    try:
        checksums = [await ctx.encodes.input_sha256(video.path)]
        if audio is not None:
            checksums.append(await ctx.encodes.input_sha256(audio.path))
    except OSError as exc:
        log.warning("no checksum of %s (%s): its encodes are not kept", video.path.name, exc)
        return None
    return EncodeKey.of_command(
        ctx.job.instance_url, _video_uuid(inputs) or "", checksums, ctx.settings.ffmpeg, args
    )


async def _encode_ladder(
    ctx: JobContext,
    inputs: VideoInput,
    ladder: Ladder,
    video: MediaInfo,
    audio: MediaInfo | None,
    output: Path,
    resolution: int,
    fps: int,
    what: str,
) -> bool:
    """Encode this job's output and the ladder's rungs in one run and keep them all; False (after a log
    line) when that run failed, and the job then encodes its own output alone."""
    assert ctx.encodes is not None
    video_uuid = _video_uuid(inputs)
    if video_uuid is None:
        return False
    rungs = [LadderRung(resolution, fps, output)]
    for asked in ladder.rungs:
        if (asked.resolution, asked.fps) != (resolution, fps):
            name = f"rung-{ctx.job.uuid}-{asked.resolution}-{asked.fps}.mp4"
            rungs.append(LadderRung(asked.resolution, asked.fps, ctx.work_dir / name))
    try:
        args = ladder_command(video, rungs, settings=encode_settings(ctx), audio_input=audio)
        await run_encode(ctx, args, duration_s=video.duration_s, what=what, check_output=output)
    except (JobFailed, NoAudioStream, ValueError) as exc:
        log.warning("%s: the ladder of %d rungs failed, encoding this one alone: %s", what, len(rungs), exc)
        return False
    for rung in rungs:
        key = _rung_key(ctx, video_uuid, ladder, rung.resolution, rung.fps)
        ctx.encodes.put(key, rung.output, duration_s=video.duration_s)
    log.info("%s: encoded %d rungs from one decode", what, len(rungs))
    return True


async def _copy_problem(video: MediaInfo, resolution: int, fps: int, with_audio: bool) -> str | None:
    """Why the input cannot be packaged as the rendition as it is (None: it can)."""
    problem = hls_copy_problem(video, None, resolution=resolution, fps=fps, with_audio=with_audio)
    if problem is not None or resolution == AUDIO_ONLY_RESOLUTION:
        return problem  # audio-only: no keyframes to look at
    try:
        keyframes = await keyframe_spacing(video.path)
    except ProbeError as exc:
        return f"its keyframes cannot be read: {exc}"
    return hls_copy_problem(video, keyframes, resolution=resolution, fps=fps, with_audio=with_audio)


def _produced(path: Path, what: str) -> Path:
    """ffmpeg said it succeeded; make sure the file is really there and not empty."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise JobFailed(f"{what}: ffmpeg exited normally but wrote no {path.name}") from exc
    if size == 0:
        raise JobFailed(f"{what}: ffmpeg exited normally but {path.name} is empty")
    return path
