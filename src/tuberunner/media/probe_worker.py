"""Subprocess entry point of `probe.probe`: `python -m tuberunner.media.probe_worker PATH`.

It opens PATH with PyAV (libavformat), prints one JSON object on stdout and exits 0:
`{"ok": true, "info": {...}}` or `{"ok": false, "error": "<reason>"}`. With `--keyframes PATH` it reads
the first video stream's packets (no decoding) and answers `{"ok": true, "keyframes": {...}}`: how far
apart its keyframes are, which decides whether HLS segments can be cut from it without re-encoding.
It runs in its own process so that a hostile or corrupt file that crashes or hangs the demuxer or decoder
takes down only this process; the caller kills it on a timeout and turns a crash into a `ProbeError`.

Field semantics (mirrored by the dataclasses of `probe.py`):

* `bit_rate` of the format is the container's overall bit rate, which is what PeerTube feeds the bitrate
  formulas (`getVideoStreamBitrate` prefers it over the video stream's own rate).
* `rotation` is the display-matrix rotation, counter-clockwise, normalised to 0, 90, 180 or 270. PyAV only
  exposes it on decoded frames, so the first video frame is decoded (bounded by `_MAX_PACKETS_FOR_ROTATION`).
* A still image (a JPEG/PNG/WebP… read by an image demuxer) reports `duration_s` 0.0 and no bit rate: it has
  no time axis, and the 1/25 s libavformat makes up would only mislead progress and bitrate computations.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import resource
import sys
from fractions import Fraction
from typing import Any

import av
import av.logging

# A probe reads headers and decodes one frame; this address-space cap only stops a hostile file from making
# libav allocate without bound (large enough for 8K frames and libav's thread stacks).
_ADDRESS_SPACE_LIMIT_BYTES = 4 * 1024**3
_MAX_PACKETS_FOR_ROTATION = 500

# Codecs of still images (the list PeerTube uses to tell an audio file with cover art from a video).
_IMAGE_CODECS = frozenset(
    {
        "ansi", "apng", "bintext", "bmp", "brender_pix", "dpx", "exr", "fits", "gem", "gif", "jpeg2000",
        "jpgls", "mjpeg", "mjpegb", "msp2", "pam", "pbm", "pcx", "pfm", "pgm", "pgmyuv", "pgx", "photocd",
        "pictor", "png", "ppm", "psd", "qoi", "sgi", "sunrast", "svg", "targa", "tiff", "txd", "webp", "xbin",
        "xbm", "xface", "xpm", "xwd",
    }
)  # fmt: skip


# Demuxers that read text as pictures: libavformat picks "tty" (ANSI art) for any file named .txt, .ans…
# Nobody uploads those as videos; a text file must be "not a video or audio file".
_TEXT_FORMATS = frozenset({"tty", "bin", "idf", "adf", "xbin"})


def main(argv: list[str]) -> int:
    keyframes = len(argv) == 3 and argv[1] == "--keyframes"
    if len(argv) != 2 and not keyframes:
        print("usage: python -m tuberunner.media.probe_worker [--keyframes] PATH", file=sys.stderr)
        return 2
    _limit_resources()
    try:
        result: dict[str, Any] = (
            {"ok": True, "keyframes": keyframe_spacing(argv[2])}
            if keyframes
            else {"ok": True, "info": describe(argv[1])}
        )
    except _NotMedia as exc:
        result = {"ok": False, "error": str(exc)}
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


class _NotMedia(Exception):
    """The file could be read but is not something we can transcode; the message is the reason."""


def _limit_resources() -> None:
    try:
        resource.setrlimit(resource.RLIMIT_AS, (_ADDRESS_SPACE_LIMIT_BYTES, _ADDRESS_SPACE_LIMIT_BYTES))
        # A crash must not leave a core dump of a hostile file behind.
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        pass  # a lower hard limit already applies: keep it


def describe(path: str) -> dict[str, Any]:
    """Open `path` and describe it; raises `_NotMedia` with a readable reason."""
    # libav writes the precise cause ("moov atom not found") to its log; keep errors so we can quote them.
    av.logging.set_level(av.logging.ERROR)
    try:
        size_bytes = os.stat(path).st_size
    except OSError as exc:
        raise _NotMedia(f"cannot read file: {exc.strerror}") from exc

    with av.logging.Capture() as logs:
        try:
            # Only local files: a playlist-like input must not make the probe open network URLs.
            container = av.open(path, options={"protocol_whitelist": "file"})
        except av.FFmpegError as exc:
            raise _NotMedia(f"not a video or audio file: {_reason(exc, logs)}") from exc
        except OSError as exc:
            raise _NotMedia(f"cannot read file: {exc.strerror or exc}") from exc

    with container:
        format_name: str = container.format.name
        if format_name in _TEXT_FORMATS:
            raise _NotMedia(f"not a video or audio file: it is text ({format_name} format)")
        video_stream = container.streams.video[0] if container.streams.video else None
        audio_stream = container.streams.audio[0] if container.streams.audio else None
        if video_stream is None and audio_stream is None:
            raise _NotMedia("not a video or audio file: it has no audio or video stream")

        still_image = (
            video_stream is not None
            and audio_stream is None
            and video_stream.codec_context.name in _IMAGE_CODECS
            and (format_name == "image2" or format_name.endswith("_pipe"))
        )
        duration_s = 0.0 if still_image else _duration_s(container)
        bit_rate = None if still_image else _positive(container.bit_rate)
        video = _video(container, video_stream) if video_stream is not None else None
        audio = _audio(audio_stream) if audio_stream is not None else None

    return {
        "path": path,
        "format_name": format_name,
        "duration_s": duration_s,
        "size_bytes": size_bytes,
        "bit_rate": bit_rate,
        "video": video,
        "audio": audio,
    }


def keyframe_spacing(path: str) -> dict[str, Any]:
    """Keyframe statistics of the first video stream, from packet flags (nothing is decoded).

    `max_interval_s` is the longest time between two keyframes, and from the last one to the end of the
    stream; `starts_with_keyframe` whether the first packet (in decoding order) is one."""
    av.logging.set_level(av.logging.ERROR)
    try:
        container = av.open(path, options={"protocol_whitelist": "file"})
    except (av.FFmpegError, OSError) as exc:
        raise _NotMedia(f"not a video file: {exc}") from exc
    with container:
        if not container.streams.video:
            raise _NotMedia("no video stream")
        stream = container.streams.video[0]
        time_base = stream.time_base
        keys: list[float] = []
        first_is_key: bool | None = None
        end_s = 0.0
        try:
            for packet in container.demux(stream):
                if packet.pts is None or time_base is None:
                    continue
                at_s = float(packet.pts * time_base)
                duration_s = float(packet.duration * time_base) if packet.duration else 0.0
                end_s = max(end_s, at_s + duration_s)
                if first_is_key is None:
                    first_is_key = bool(packet.is_keyframe)
                if packet.is_keyframe:
                    keys.append(at_s)
        except av.FFmpegError as exc:
            raise _NotMedia(f"cannot read its packets: {exc}") from exc
    keys.sort()
    gaps = [b - a for a, b in itertools.pairwise(keys)]
    if keys:
        gaps.append(end_s - keys[-1])
    return {
        "keyframes": len(keys),
        "starts_with_keyframe": bool(first_is_key),
        "max_interval_s": max(gaps) if gaps else None,
    }


def _reason(exc: av.FFmpegError, logs: list[tuple[int, str, str]]) -> str:
    reason = exc.strerror or str(exc)
    details = [message.strip() for _level, _name, message in logs if message.strip()]
    return f"{reason} ({details[-1]})" if details else reason


def _duration_s(container: Any) -> float:
    if container.duration is not None and container.duration > 0:
        return float(container.duration) / av.time_base
    # Some containers only know the duration per stream.
    longest = 0.0
    for stream in container.streams:
        if stream.duration is not None and stream.time_base is not None:
            longest = max(longest, float(stream.duration * stream.time_base))
    return longest


def _video(container: Any, stream: Any) -> dict[str, Any]:
    context = stream.codec_context
    level = context.level
    return {
        "codec": context.name,
        "profile": stream.profile or None,
        "level": level if isinstance(level, int) and level > 0 else None,
        "width": int(context.width),
        "height": int(context.height),
        "fps": _fps(stream),
        "pix_fmt": context.pix_fmt,
        "bit_rate": _positive(stream.bit_rate),
        "rotation": _rotation(container, stream),
    }


def _fps(stream: Any) -> float:
    # PeerTube's order (avg_frame_rate, then r_frame_rate), then libav's guess; 0.0 when unknown.
    for rate in (stream.average_rate, stream.base_rate, stream.guessed_rate):
        if isinstance(rate, Fraction) and rate > 0:
            return float(rate)
    return 0.0


def _rotation(container: Any, stream: Any) -> int:
    # One frame is all we need: decoder threads would only cost memory and start-up time.
    stream.codec_context.thread_count = 1
    try:
        for count, packet in enumerate(container.demux(stream)):
            if count >= _MAX_PACKETS_FOR_ROTATION:
                break
            for frame in packet.decode():
                degrees = float(frame.rotation)
                if math.isnan(degrees):
                    return 0
                return round(degrees / 90.0) * 90 % 360
    except (av.FFmpegError, ValueError):
        pass  # an undecodable first frame: the transcode will report the real error
    return 0


def _audio(stream: Any) -> dict[str, Any]:
    context = stream.codec_context
    layout = context.layout
    layout_name: str | None = layout.name if layout is not None else None
    # libav names a layout without channel order "N channels"; ffprobe prints "unknown" for it and PeerTube
    # refuses to stream-copy such audio. None says the same thing.
    if layout_name is not None and (layout_name.endswith(" channels") or layout_name == "unknown"):
        layout_name = None
    return {
        "codec": context.name,
        "profile": stream.profile or None,
        "sample_rate": int(context.sample_rate),
        "channels": int(context.channels),
        "channel_layout": layout_name,
        "bit_rate": _positive(stream.bit_rate),
    }


def _positive(value: int | None) -> int | None:
    return int(value) if value else None


if __name__ == "__main__":
    sys.exit(main(sys.argv))
