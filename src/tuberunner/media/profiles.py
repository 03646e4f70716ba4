"""PeerTube's default transcoding profile, as numbers: bitrates, audio rules, fps, ladder, storyboard.

These reproduce the server and runner code of PeerTube (notes §3.1, §3.8) so that what we produce, and what
our coordinator asks for, matches what an instance expects. Two JavaScript habits matter for exactness and
are reproduced on purpose: `Math.round` rounds halves up (`_js_round`), and aspect ratios are rounded to four
decimals before any formula sees them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tuberunner.media.probe import AudioInfo, VideoInfo

AUDIO_ONLY_RESOLUTION = 0
# Every resolution PeerTube knows (0 = audio only), and the order in which it creates the jobs of a ladder.
VOD_RESOLUTIONS: tuple[int, ...] = (0, 144, 240, 360, 480, 720, 1080, 1440, 2160)
JOB_PRIORITY_ORDER: tuple[int, ...] = (0, 480, 360, 720, 240, 144, 1080, 1440, 2160)

# Bits per pixel, keyed by the largest standard resolution not above the target (core-utils bitrate.ts).
_AVERAGE_BITS_PER_PIXEL: Mapping[int, float] = {
    0: 0, 144: 0.19, 240: 0.17, 360: 0.15, 480: 0.12, 720: 0.11, 1080: 0.10, 1440: 0.09, 2160: 0.08,
}  # fmt: skip
_MAX_BITS_PER_PIXEL: Mapping[int, float] = {
    0: 0, 144: 0.32, 240: 0.29, 360: 0.26, 480: 0.22, 720: 0.19, 1080: 0.17, 1440: 0.16, 2160: 0.14,
}  # fmt: skip
_MIN_BITS_PER_PIXEL: Mapping[int, float] = {size: 0.02 if size else 0 for size in VOD_RESOLUTIONS}

# What the formulas fall back to when they give 0 bits (no video: ratio 0), in bits/s.
_AVERAGE_FALLBACK = 192_000
_MAX_FALLBACK = 256_000
_MIN_FALLBACK = 10_000

# The input bitrate plus this margin caps the target, so a low-bitrate source is not inflated.
_INPUT_BITRATE_MARGIN = 1.3

# Audio bitrate rule (kbit/s), ffprobe.ts getMaxAudioBitrate.
_MAX_AUDIO_KBITRATE = 384
_UNKNOWN_AUDIO_KBITRATE = 256
_COPY_AUDIO = -1


def _js_round(value: float) -> int:
    """JavaScript's Math.round: halves go up (Python's round() goes to even)."""
    return math.floor(value + 0.5)


def aspect_ratio(width: int, height: int) -> float:
    """PeerTube's `buildAspectRatio`: width/height rounded to 4 decimals; 0 when a dimension is missing."""
    if not width or not height:
        return 0.0
    return _js_round(width / height * 10_000) / 10_000


def video_aspect_ratio(video: VideoInfo | None) -> float:
    """Display aspect ratio of a probed stream (after rotation), 0 for no video, as the formulas take it."""
    if video is None:
        return 0.0
    return aspect_ratio(video.display_width, video.display_height)


def _bits_per_second(resolution: int, fps: float, ratio: float, bits_per_pixel: Mapping[int, float]) -> int:
    # "resolution" is the short side; the long side comes from the ratio, inverted for portrait.
    long_side = resolution / ratio if 0 < ratio < 1 else resolution * ratio
    for bucket in sorted(bits_per_pixel, reverse=True):
        if bucket <= resolution:
            return math.floor(resolution * long_side * fps * bits_per_pixel[bucket])
    raise ValueError(f"unknown resolution {resolution}")


def average_bitrate(resolution: int, fps: float, ratio: float) -> int:
    """`getAverageTheoreticalBitrate`, bits/s."""
    return _bits_per_second(resolution, fps, ratio, _AVERAGE_BITS_PER_PIXEL) or _AVERAGE_FALLBACK


def max_bitrate(resolution: int, fps: float, ratio: float) -> int:
    """`getMaxTheoreticalBitrate`, bits/s: above it PeerTube won't copy a video (quick transcode)."""
    return _bits_per_second(resolution, fps, ratio, _MAX_BITS_PER_PIXEL) or _MAX_FALLBACK


def min_bitrate(resolution: int, fps: float, ratio: float) -> int:
    """`getMinTheoreticalBitrate`, bits/s: the floor of any target."""
    return _bits_per_second(resolution, fps, ratio, _MIN_BITS_PER_PIXEL) or _MIN_FALLBACK


def target_bitrate(resolution: int, fps: float, ratio: float, input_bitrate: int | None) -> int:
    """`getTargetBitrate`, bits/s: the VBV cap of a VOD encode (`-maxrate` T, `-bufsize` 2T).

    The average for the resolution, capped at 1.3 x the input bitrate when known, never below the minimum.
    PeerTube may pass a fractional value; it is floored here. That never changes the encode: x264 reads
    both rates in whole kbit/s, and 2·floor(T) is even, so it can never sit one bit below a kbit/s boundary
    that 2·T would cross.
    """
    average = average_bitrate(resolution, fps, ratio)
    capped = min(average, input_bitrate * _INPUT_BITRATE_MARGIN) if input_bitrate else average
    return math.floor(max(min_bitrate(resolution, fps, ratio), capped))


# ---------------------------------------------------------------------------------------------------------
# Audio


def max_audio_kbitrate(codec: str, bit_rate: int | None) -> int:
    """`getMaxAudioBitrate`: the `-b:a` to use in kbit/s, or -1 meaning "keep it as is" (AAC ≤ 384k)."""
    if not bit_rate:
        return _UNKNOWN_AUDIO_KBITRATE
    if codec == "aac":
        return _MAX_AUDIO_KBITRATE if bit_rate > _MAX_AUDIO_KBITRATE * 1000 else _COPY_AUDIO
    # An mp3 (or other) stream holds less than an AAC one at the same rate: step the rate down.
    if bit_rate <= 192_000:
        return 128
    if bit_rate <= 384_000:
        return 256
    return _MAX_AUDIO_KBITRATE


def can_copy_audio(audio: AudioInfo | None) -> bool:
    """`canDoQuickAudioTranscode`: AAC with a known bitrate ≤ 384k and a known layout other than quad."""
    if audio is None:
        return True
    if audio.codec != "aac" or not audio.bit_rate:
        return False
    if max_audio_kbitrate("aac", audio.bit_rate) != _COPY_AUDIO:
        return False
    # Unknown and quad layouts cause playback issues in Chrome.
    return audio.channel_layout not in (None, "unknown", "quad")


def audio_options(audio: AudioInfo | None, has_libfdk: bool, *, can_copy: bool = True) -> list[str]:
    """Output options for the audio stream: encoder and rate, `-acodec copy`, or `-an` without audio.

    libfdk_aac, when ffmpeg has it, always re-encodes at VBR quality 5. Otherwise AAC is stream-copied when
    `can_copy` and the copy rule allow it, else encoded with ffmpeg's aac in stereo (forced: other layouts
    break HLS playback in Chrome) at the rate of `max_audio_kbitrate` (none: encoder default).
    PeerTube's HLS jobs pass `can_copy=False` (copying only part of the streams desynchronised audio).
    """
    if audio is None:
        return ["-an"]
    if has_libfdk:
        return ["-acodec", "libfdk_aac", "-q:a", "5"]
    if can_copy and can_copy_audio(audio):
        return ["-acodec", "copy"]
    options = ["-acodec", "aac", "-channel_layout", "stereo"]
    kbitrate = max_audio_kbitrate(audio.codec, audio.bit_rate)
    if kbitrate != _COPY_AUDIO:
        options += ["-b:a", f"{kbitrate}k"]
    return options


# ---------------------------------------------------------------------------------------------------------
# Frame rate and ladder (decided by the server; our coordinator uses the same rules)


def compute_output_fps(
    input_fps: float, resolution: int, is_origin_resolution: bool, max_fps: int = 60
) -> int:
    """`computeOutputFPS` for VOD: the frame rate of one output resolution.

    The input rate is first rounded to an integer, as PeerTube's ffprobe parsing does. Below 720p (and not
    the origin resolution) a rate above 30 is brought down to the largest of 24/25/30 that divides it (else
    the closest by modulo); anything above `max_fps` goes to the best of 50/60/max. ValueError under 0.1.
    """
    if resolution == AUDIO_ONLY_RESOLUTION:
        return 0
    standard = [rate for rate in (24, 25, 30) if rate <= max_fps] or [max_fps]
    hd_standard = [rate for rate in (50, 60, max_fps) if rate <= max_fps]
    average = min(30, max_fps)
    keep_origin_fps_resolution_min = 720

    fps = _js_round(input_fps)
    if not is_origin_resolution and resolution < keep_origin_fps_resolution_min and fps > average:
        fps = _closest_framerate(fps, standard)
    if fps < 0.1:
        raise ValueError(f"cannot compute an output frame rate: {input_fps} fps is lower than 0.1")
    fps = max(fps, 1)
    if fps > max_fps:
        fps = _closest_framerate(fps, hd_standard)
    return fps


def _closest_framerate(fps: int, candidates: Sequence[int]) -> int:
    descending = sorted(candidates, reverse=True)
    for rate in descending:
        if fps % rate == 0:
            return rate
    # Smallest remainder; ties keep the larger rate (JS sort is stable over the descending list).
    return sorted(descending, key=lambda rate: fps % rate)[0]


def to_even(value: int) -> int:
    """PeerTube's `toEven`: odd values go one up (ffmpeg's yuv420p needs even dimensions)."""
    return value + 1 if value % 2 else value


def resolution_ladder(
    input_short_side: int,
    enabled: Sequence[int],
    *,
    has_audio: bool = True,
    always_include_input: bool = False,
) -> list[int]:
    """The resolutions to produce for an input, highest first, 0 (audio only) last when enabled.

    Enabled resolutions up to the input's short side are kept. When none fits (a tiny input), or with
    `always_include_input` (PeerTube's "always transcode original resolution"), the input's own short side,
    made even, is added. 0 is kept only when the input has audio.
    """
    video = {resolution for resolution in enabled if 0 < resolution <= input_short_side}
    if always_include_input or not video:
        video.add(to_even(input_short_side))
    ladder = sorted(video, reverse=True)
    if AUDIO_ONLY_RESOLUTION in enabled and has_audio:
        ladder.append(AUDIO_ONLY_RESOLUTION)
    return ladder


# ---------------------------------------------------------------------------------------------------------
# Storyboard (PeerTube ≥ 8.0 computes these on the server and sends them in the job payload)

STORYBOARD_SPRITE_MAX_SIZE = 192
STORYBOARD_MAX_EDGE_COUNT = 11
STORYBOARD_MIN_DURATION_S = 3


@dataclass(frozen=True, slots=True)
class StoryboardSprites:
    """One sprite sheet: `columns` x `rows` thumbnails of `width` x `height`, one per `duration_s` seconds.

    On the wire (`sprites` of a storyboard payload): size.width/height, count.width = columns,
    count.height = rows, duration.
    """

    width: int
    height: int
    columns: int
    rows: int
    duration_s: float


def storyboard_sprites(width: int, height: int, duration_s: float) -> StoryboardSprites | None:
    """PeerTube's sprite parameters for a video of `width` x `height` (display, after rotation).

    None when the video is shorter than 3 s (PeerTube works on the duration rounded to whole seconds) or
    has no picture. The long edge of a sprite is 192 px; one sprite per `ceil(duration / maxSprites)`
    seconds with at most 11 x 11 sprites; the grid is the smallest rows x columns (rows ≤ columns) that fits.
    """
    duration = _js_round(duration_s)
    ratio = aspect_ratio(width, height)
    if duration < STORYBOARD_MIN_DURATION_S or ratio <= 0:
        return None
    if height > width:
        sprite_height = STORYBOARD_SPRITE_MAX_SIZE
        sprite_width = _js_round(sprite_height * ratio)
    else:
        sprite_width = STORYBOARD_SPRITE_MAX_SIZE
        sprite_height = _js_round(sprite_width / ratio)

    max_sprites = min(duration, STORYBOARD_MAX_EDGE_COUNT * STORYBOARD_MAX_EDGE_COUNT)
    sprite_duration = math.ceil(duration / max_sprites)
    total_sprites = math.ceil(duration / sprite_duration)
    columns, rows = _grid_size(total_sprites)
    return StoryboardSprites(
        width=sprite_width, height=sprite_height, columns=columns, rows=rows, duration_s=sprite_duration
    )


def _grid_size(sprites: int) -> tuple[int, int]:
    for rows in range(1, STORYBOARD_MAX_EDGE_COUNT + 1):
        for columns in range(rows, STORYBOARD_MAX_EDGE_COUNT + 1):
            if sprites <= rows * columns:
                return columns, rows
    raise ValueError(f"no grid of at most {STORYBOARD_MAX_EDGE_COUNT}² holds {sprites} sprites")
