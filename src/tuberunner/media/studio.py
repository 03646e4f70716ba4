"""ffmpeg argument lists for the studio tasks (`video-studio-transcoding`, notes §3.5), as pure functions.

They follow PeerTube's `FFmpegEdition` (`cutVideo`, `addWatermark`, `addIntroOutro`): each task fully
re-encodes the video with the shared VOD preset at the input's own resolution and frame rate, and no scale
filter (the resolution only sets the bitrate cap).

    cut            -ss <start> / -to <end> as output options (accurate; decodes from the start), audio
                   re-encoded
    add-watermark  the watermark scaled to a height of (video height x sizeRatio), its width kept in
                   aspect, overlaid at x = main_w - overlay_w - main_h x horizontalMargin,
                   y = main_h x verticalMargin; audio may be copied
    add-intro      the intro/outro fitted (force_original_aspect_ratio=decrease, spline) and centred on a
    add-outro      black box the size of the main video, then concat n=2 v=1 [a=1] unsafe=1; an intro
                   without audio gets `anullsrc` of its duration when the main video has audio

What differs, as in `commands`: the progress prefix, the input protocol whitelist, explicit stream mapping
(`-map`). And one deliberate change with the same result: PeerTube sizes the watermark and the black box
with `scale2ref` (the size read from the main video's frames); here the sizes come from the probe of the
main video (its display size) and plain `scale`/`pad` filters do the rest. `scale2ref` is deprecated since
ffmpeg 7.1 and the ffmpeg 9 bundled with imageio-ffmpeg ignores `force_original_aspect_ratio` in it (the
intro is stretched, with a compensating SAR, instead of fitted on black), while `scale`/`pad` behave the
same on every ffmpeg version.

`merge_audio_command` is ours: a source with separated audio (HLS split audio) is first remuxed into one
file (stream copy), so that every task has one input, as the official runner's 6.3 tasks have.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tuberunner.media.commands import (
    EncodeSettings,
    _global_output_options,
    _input,
    _path,
    _prefix,
    _seconds,
    _threads,
    _video_options,
)
from tuberunner.media.errors import NoAudioStream, NoVideoStream
from tuberunner.media.probe import MediaInfo
from tuberunner.media.profiles import audio_options

__all__ = [
    "WatermarkPlacement",
    "cut_command",
    "cut_duration_s",
    "intro_outro_command",
    "merge_audio_command",
    "studio_fps",
    "watermark_command",
]


@dataclass(frozen=True, slots=True)
class WatermarkPlacement:
    """The task's ratios (PeerTube's server sends 1/10, 1/20, 1/20)."""

    size_ratio: float
    horizontal_margin_ratio: float
    vertical_margin_ratio: float


def studio_fps(video: MediaInfo) -> int:
    """The output frame rate of a studio task: the input's, rounded to an integer (at least 1)."""
    if video.video is None:
        raise NoVideoStream(f"{video.path.name} has no video stream to edit")
    return max(1, round(video.video.fps))


def cut_duration_s(video: MediaInfo, start_s: float | None, end_s: float | None) -> float:
    """How long the cut of `video` lasts; ValueError when the range is empty or out of the video."""
    start = start_s or 0.0
    end = min(end_s, video.duration_s) if end_s else video.duration_s
    if start < 0 or (end_s is not None and end_s < 0):
        raise ValueError(f"a cut cannot start or end before 0 s (start {start_s}, end {end_s})")
    if end - start <= 0:
        raise ValueError(
            f"the cut {start:g}-{end_s if end_s is not None else 'end'} s leaves nothing of a "
            f"{video.duration_s:.2f} s video"
        )
    return end - start


def cut_command(
    video: MediaInfo,
    output: Path,
    *,
    start_s: float | None,
    end_s: float | None,
    settings: EncodeSettings,
) -> list[str]:
    """`cut`: the part between `start_s` and `end_s` (None or 0: from the start / to the end)."""
    fps = studio_fps(video)
    args = [
        *_prefix(),
        *_input(video.path),
        *_main_streams(video, "0:v:0"),
        *_preset(video, fps, settings, can_copy_audio=False),
    ]
    # PeerTube tests the values for truth: a start of 0 writes no -ss.
    if start_s:
        args += ["-ss", _seconds(start_s)]
    if end_s:
        args += ["-to", _seconds(end_s)]
    return [*args, "-f", "mp4", _path(output)]


def watermark_command(
    video: MediaInfo,
    watermark: Path,
    output: Path,
    *,
    placement: WatermarkPlacement,
    settings: EncodeSettings,
) -> list[str]:
    """`add-watermark`: the image in the top right corner, its height a ratio of the video's."""
    fps = studio_fps(video)
    assert video.video is not None  # studio_fps checked it
    # scale2ref's `h=ih*ratio` (truncated, as scale does), `w=oh*mdar` (-1: the same aspect-kept width).
    height = max(2, int(video.video.display_height * placement.size_ratio))
    graph = ";".join(
        [
            f"[1:v:0]scale=w=-1:h={height}[watermark]",
            "[0:v:0][watermark]overlay="
            f"x=main_w - overlay_w - (main_h * {placement.horizontal_margin_ratio:g}):"
            f"y=main_h * {placement.vertical_margin_ratio:g}[v]",
        ]
    )
    return [
        *_prefix(),
        *_input(video.path),
        *_input(watermark),
        "-filter_complex",
        graph,
        *_main_streams(video, "[v]"),
        *_preset(video, fps, settings, can_copy_audio=True),
        "-f",
        "mp4",
        _path(output),
    ]


def intro_outro_command(
    video: MediaInfo,
    clip: MediaInfo,
    output: Path,
    *,
    outro: bool,
    settings: EncodeSettings,
) -> list[str]:
    """`add-intro` / `add-outro`: `clip` before (or after) `video`, fitted into its frame on black."""
    fps = studio_fps(video)
    if clip.video is None:
        raise NoVideoStream(f"the {'outro' if outro else 'intro'} {clip.path.name} has no video stream")
    main_has_audio = video.audio is not None
    silent_clip = main_has_audio and clip.audio is None
    args = [*_prefix(), *_input(video.path), *_input(clip.path)]
    if silent_clip:
        args += ["-f", "lavfi", "-t", _seconds(clip.duration_s), "-i", "anullsrc"]
    assert video.video is not None  # studio_fps checked it
    width, height = video.video.display_width, video.video.display_height
    graph = [
        f"[1:v:0]scale=w={width}:h={height}:force_original_aspect_ratio=decrease:flags=spline,"
        f"pad=w={width}:h={height}:x=(ow-iw)/2:y=(oh-ih)/2:color=black[clip-resized]"
    ]
    clip_inputs, main_inputs = ["[clip-resized]"], ["[0:v:0]"]
    if main_has_audio:
        main_inputs.append("[0:a:0]")
        clip_inputs.append("[2:a:0]" if silent_clip else "[1:a:0]")
    segments = [*main_inputs, *clip_inputs] if outro else [*clip_inputs, *main_inputs]
    outputs = "[v][a]" if main_has_audio else "[v]"
    graph.append("".join(segments) + f"concat=n=2:v=1:a={int(main_has_audio)}:unsafe=1{outputs}")
    args += ["-filter_complex", ";".join(graph), "-map", "[v]"]
    if main_has_audio:
        args += ["-map", "[a]"]
    return [
        *args,
        *_preset(video, fps, settings, can_copy_audio=False),
        "-f",
        "mp4",
        _path(output),
    ]


def merge_audio_command(video: MediaInfo, audio: MediaInfo, output: Path) -> list[str]:
    """The video stream of `video` and the audio stream of `audio` in one MP4, both stream-copied."""
    if video.video is None:
        raise NoVideoStream(f"{video.path.name} has no video stream to edit")
    if audio.audio is None:
        raise NoAudioStream(f"the separated audio file {audio.path.name} has no audio stream")
    return [
        *_prefix(),
        *_input(video.path),
        *_input(audio.path),
        "-map",
        "0:v:0",
        "-map",
        "1:a:0",
        "-c",
        "copy",
        "-f",
        "mp4",
        _path(output),
    ]


# ---------------------------------------------------------------------------------------------------------


def _main_streams(video: MediaInfo, video_stream: str) -> list[str]:
    """The edited picture and, when the main video has one, its first audio stream."""
    streams = ["-map", video_stream]
    if video.audio is not None:
        streams += ["-map", "0:a:0"]
    return streams


def _preset(video: MediaInfo, fps: int, settings: EncodeSettings, *, can_copy_audio: bool) -> list[str]:
    """PeerTube's presetVOD for studio: the input's resolution and fps, no scale filter."""
    assert video.video is not None  # studio_fps checked it
    return [
        *_threads(settings),
        "-movflags",
        "faststart",
        *_global_output_options(),
        *_video_options(bitrate_source=video, resolution=video.video.short_side, fps=fps, scale=None),
        *audio_options(video.audio, settings.has_libfdk_aac, can_copy=can_copy_audio),
    ]
