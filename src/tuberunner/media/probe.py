"""Describe a media file: container, first video stream, first audio stream.

The work happens in a process of its own (`probe_worker.py`, PyAV, forked by the `probe_server` of this
process, see `probe_client`): a hostile file that crashes or hangs libavformat kills or stalls only that
process, which is killed after `timeout_s`. Its JSON answer becomes the frozen dataclasses below. "First
stream" follows ffprobe as PeerTube uses it (`streams.find(type)`), and the command builders map exactly
those streams, so the decisions taken on this description apply to the streams that are really encoded.

A still image probes as a video stream with `duration_s == 0.0` (see `probe_worker`); a file that opens but
is cut short keeps the duration its header announces, so truncation shows up later as an `FfmpegFailed`.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuberunner.media.errors import ProbeError
from tuberunner.media.probe_client import WORKER_MODULE, WorkerTimeout, run_worker

_WORKER_MODULE = WORKER_MODULE


@dataclass(frozen=True, slots=True)
class VideoInfo:
    codec: str
    profile: str | None
    level: int | None
    width: int
    height: int
    fps: float
    pix_fmt: str | None
    bit_rate: int | None
    rotation: int
    """Display rotation, counter-clockwise degrees: 0, 90, 180 or 270."""

    @property
    def is_rotated_sideways(self) -> bool:
        return self.rotation in (90, 270)

    @property
    def display_width(self) -> int:
        return self.height if self.is_rotated_sideways else self.width

    @property
    def display_height(self) -> int:
        return self.width if self.is_rotated_sideways else self.height

    @property
    def is_portrait(self) -> bool:
        """PeerTube's `isPortraitMode`: taller than wide once rotated for display."""
        return self.display_height > self.display_width

    @property
    def short_side(self) -> int:
        """PeerTube's "resolution" of a video: the smaller display dimension."""
        return min(self.width, self.height)


@dataclass(frozen=True, slots=True)
class AudioInfo:
    codec: str
    profile: str | None
    sample_rate: int
    channels: int
    channel_layout: str | None
    """None when the layout is unknown (ffprobe's "unknown")."""
    bit_rate: int | None


@dataclass(frozen=True, slots=True)
class MediaInfo:
    path: Path
    format_name: str
    duration_s: float
    """0.0 for a still image."""
    size_bytes: int
    bit_rate: int | None
    """Overall bit rate of the container (what PeerTube's bitrate formulas take as the input bitrate)."""
    video: VideoInfo | None
    audio: AudioInfo | None

    @property
    def input_bitrate(self) -> int | None:
        """PeerTube's `getVideoStreamBitrate`: the container bit rate, else the video stream's."""
        if self.bit_rate:
            return self.bit_rate
        return self.video.bit_rate if self.video is not None else None


@dataclass(frozen=True, slots=True)
class KeyframeSpacing:
    keyframes: int
    starts_with_keyframe: bool
    max_interval_s: float | None
    """The longest time between two keyframes (or from the last one to the end); None without keyframes."""


async def probe(path: Path, *, timeout_s: float = 30) -> MediaInfo:
    """Describe `path`; raises `ProbeError` naming the cause when it is not a usable media file."""
    answer = await _ask_worker(path, [], timeout_s)
    try:
        return _media_info(path, answer["info"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProbeError(f"probing {path.name} returned an unexpected answer: {exc!r}") from exc


async def keyframe_spacing(path: Path, *, timeout_s: float = 120) -> KeyframeSpacing:
    """How far apart the keyframes of the first video stream of `path` are (its packets are read, not
    decoded: seconds for hours of video); `ProbeError` when it cannot be read."""
    answer = await _ask_worker(path, ["--keyframes"], timeout_s)
    try:
        raw = answer["keyframes"]
        interval = raw["max_interval_s"]
        return KeyframeSpacing(
            keyframes=int(raw["keyframes"]),
            starts_with_keyframe=bool(raw["starts_with_keyframe"]),
            max_interval_s=None if interval is None else float(interval),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProbeError(f"reading the keyframes of {path.name} gave an unexpected answer: {exc!r}") from exc


async def _ask_worker(path: Path, options: list[str], timeout_s: float) -> dict[str, Any]:
    try:
        ran = await run_worker(_WORKER_MODULE, [*options, os.fspath(path)], timeout_s)
    except WorkerTimeout as exc:
        raise ProbeError(
            f"probing {path.name} took longer than {timeout_s:g} s; the file is probably corrupt"
        ) from exc
    # An answer printed in full counts even if the worker then died while exiting (libav finalisers).
    answer = _parse_answer(ran.stdout)
    if answer is None:
        reason = _exit_reason(ran.returncode)
        raise ProbeError(f"probing {path.name} failed ({reason}): {_last_line(ran.stderr)}")
    if not answer.get("ok"):
        raise ProbeError(f"{path.name}: {answer.get('error', 'unknown probe error')}")
    return answer


def hls_codecs_string(info: MediaInfo) -> str:
    """RFC 6381 `CODECS` value of an HLS variant, the way PeerTube writes its master playlist.

    H.264 uses PeerTube's profile table (High 6400, Main 4D40, Baseline 42E0; unknown profiles fall back to
    High) followed by the level in hex, e.g. `avc1.64001f` for High 3.1. "Constrained Baseline" is mapped to
    42E0 as well, where PeerTube would fall back to High: 42E0 is what such a stream really is.
    """
    parts = []
    if info.video is not None:
        parts.append(_video_codec_string(info.video))
    if info.audio is not None:
        parts.append(_audio_codec_string(info.audio))
    return ",".join(parts)


_AVC_PROFILES = {"High": "6400", "Main": "4D40", "Baseline": "42E0", "Constrained Baseline": "42E0"}
_HEVC_PROFILES = {"Main": "1.6", "Main 10": "2.4", "Main Still Picture": "3.8"}
_AV1_PROFILES = {"Main": "0", "High": "1", "Professional": "2"}
_OTHER_AUDIO_CODECS = {
    "mp3": "mp4a.40.34",
    "opus": "opus",
    "vorbis": "vorbis",
    "flac": "fLaC",
    "ac3": "ac-3",
    "eac3": "ec-3",
}
# PeerTube's fallback when ffprobe reports no level: 3.1, the usual level of 720p30.
_DEFAULT_AVC_LEVEL = 31


def _video_codec_string(video: VideoInfo) -> str:
    if video.codec == "hevc":
        level = video.level if video.level else 123
        return f"hvc1.{_HEVC_PROFILES.get(video.profile or '', '1.6')}.L{level}.B0"
    if video.codec == "vp9":
        return "vp09.00.50.08"
    if video.codec == "av1":
        return f"av01.{_AV1_PROFILES.get(video.profile or '', '0')}.{video.level or 0:02d}M.08"
    profile = _AVC_PROFILES.get(video.profile or "", _AVC_PROFILES["High"])
    return f"avc1.{profile}{video.level or _DEFAULT_AVC_LEVEL:02x}"


def _audio_codec_string(audio: AudioInfo) -> str:
    if audio.codec == "aac":
        # Object types: 2 = AAC-LC, 5 = HE-AAC (SBR), 29 = HE-AACv2 (SBR + PS).
        return {"HE-AAC": "mp4a.40.5", "HE-AACv2": "mp4a.40.29"}.get(audio.profile or "", "mp4a.40.2")
    return _OTHER_AUDIO_CODECS.get(audio.codec, "mp4a.40.2")


def _parse_answer(stdout: bytes) -> dict[str, Any] | None:
    try:
        answer = json.loads(stdout)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


def _media_info(path: Path, raw: dict[str, Any]) -> MediaInfo:
    video_raw = raw["video"]
    audio_raw = raw["audio"]
    return MediaInfo(
        path=path,
        format_name=str(raw["format_name"]),
        duration_s=float(raw["duration_s"]),
        size_bytes=int(raw["size_bytes"]),
        bit_rate=_optional_int(raw["bit_rate"]),
        video=None
        if video_raw is None
        else VideoInfo(
            codec=str(video_raw["codec"]),
            profile=_optional_str(video_raw["profile"]),
            level=_optional_int(video_raw["level"]),
            width=int(video_raw["width"]),
            height=int(video_raw["height"]),
            fps=float(video_raw["fps"]),
            pix_fmt=_optional_str(video_raw["pix_fmt"]),
            bit_rate=_optional_int(video_raw["bit_rate"]),
            rotation=int(video_raw["rotation"]),
        ),
        audio=None
        if audio_raw is None
        else AudioInfo(
            codec=str(audio_raw["codec"]),
            profile=_optional_str(audio_raw["profile"]),
            sample_rate=int(audio_raw["sample_rate"]),
            channels=int(audio_raw["channels"]),
            channel_layout=_optional_str(audio_raw["channel_layout"]),
            bit_rate=_optional_int(audio_raw["bit_rate"]),
        ),
    )


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _exit_reason(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def _last_line(stderr: bytes) -> str:
    lines = [line for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"
