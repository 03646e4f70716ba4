"""Live transcoding: what the stream holds, PeerTube's live ffmpeg command, and its media playlists.

The command is the official runner's (PeerTube's `FFmpegLive.getLiveTranscodingCommand` with the default
live profile, notes §3.6): one ffmpeg pulls the RTMP stream, `split`s the picture into one
`scale=w=-2:h=R` branch per rendition, encodes each with libx264 (`-b:v`, `-maxrate` T, `-bufsize` 2T, `-r`
and a keyframe every 2 s of the rendition's frame rate, veryfast, b-strategy 1, 16 B-frames, no scene cut),
one audio rendition in its own group, and writes HLS: MPEG-TS segments `<n>-<seq>.ts`, media playlists
`<n>.m3u8`, `master.m3u8`.
Deliberate differences, none of which changes what viewers get:

* no `delete_segments`: the runner deletes a segment once it is uploaded and out of the window, so a slow
  upload never loses a segment that ffmpeg already dropped;
* `-progress pipe:1` and stream maps written as `0:a:0` (the first audio stream of the one input);
* the stream is analysed for 0.5 s of media instead of ffmpeg's 5 s, by the probe and by the transcoding
  ffmpeg: measured on PeerTube 6.3, joining its RTMP server's kept GOP, reading the stream took 0.4-1.7 s
  with the default and 0.25-0.7 s so, each time with both streams and their parameters found; an FLV
  stream sends audio every few dozen milliseconds, so half a second cannot miss it.

The stream is described by ffmpeg itself (`ffmpeg -i URL` prints what it found; the bundled ffmpeg comes
without ffprobe), one connection before the transcoding one, as the official runner's ffprobe is.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tuberunner.media.errors import FfmpegUnavailable, ProbeError
from tuberunner.media.probe import AudioInfo, VideoInfo
from tuberunner.media.process import redact_urls
from tuberunner.media.profiles import (
    AUDIO_ONLY_RESOLUTION,
    can_copy_audio,
    max_audio_kbitrate,
    target_bitrate,
    video_aspect_ratio,
)

__all__ = [
    "MASTER_PLAYLIST",
    "LiveInput",
    "LiveRendition",
    "MediaPlaylist",
    "PlaylistSegment",
    "live_command",
    "parse_stream_dump",
    "probe_live",
    "variant_count",
]

MASTER_PLAYLIST = "master.m3u8"
# The live profile's B-frame strategy (PeerTube PR #774), as for VOD.
_PRESET = ["-preset", "veryfast", "-b_strategy", "1", "-bf", "16"]
_COPY_AUDIO = -1
# Microseconds of the stream read to find its streams (see the module's docstring).
_ANALYSIS = ["-analyzeduration", "500000"]


@dataclass(frozen=True, slots=True)
class LiveRendition:
    resolution: int
    fps: int


@dataclass(frozen=True, slots=True)
class LiveInput:
    """What `ffmpeg -i URL` found in the stream."""

    video: VideoInfo | None
    audio: AudioInfo | None
    # The container's bit rate (an FLV's metadata), else None: PeerTube's input bitrate for the caps.
    bit_rate: int | None

    @property
    def input_bitrate(self) -> int | None:
        if self.bit_rate:
            return self.bit_rate
        return self.video.bit_rate if self.video is not None else None


# ------------------------------------------------------------------------------------------ probe

_STREAM = re.compile(r"^\s*Stream #\d+:\d+.*?: (Video|Audio): (.*)$")
_DURATION_BITRATE = re.compile(r"^\s*Duration: .*bitrate: (\d+) kb/s")
_SIZE = re.compile(r"\b(\d{1,5})x(\d{1,5})\b")
_FPS = re.compile(r"\b(\d+(?:\.\d+)?) (?:fps|tbr)\b")
_KBITS = re.compile(r"\b(\d+) kb/s\b")
_HZ = re.compile(r"\b(\d+) Hz, ([^,]+)")
_CHANNELS = {"mono": 1, "stereo": 2, "2.1": 3, "quad": 4, "4.0": 4, "5.0": 5, "5.1": 6, "6.1": 7, "7.1": 8}


def parse_stream_dump(stderr: str) -> LiveInput:
    """The streams of ffmpeg's "Input #0" dump; ProbeError when it shows none we can use."""
    video: VideoInfo | None = None
    audio: AudioInfo | None = None
    bit_rate: int | None = None
    for line in stderr.splitlines():
        if (found := _DURATION_BITRATE.match(line)) is not None:
            bit_rate = int(found.group(1)) * 1000
            continue
        stream = _STREAM.match(line)
        if stream is None:
            continue
        kind, details = stream.groups()
        codec = details.split(maxsplit=1)[0].rstrip(",")
        kbits = _KBITS.search(details)
        rate = int(kbits.group(1)) * 1000 if kbits else None
        if kind == "Video" and video is None:
            size, fps = _SIZE.search(details), _FPS.search(details)
            if size is None:
                continue
            video = VideoInfo(
                codec=codec,
                profile=None,
                level=None,
                width=int(size.group(1)),
                height=int(size.group(2)),
                fps=float(fps.group(1)) if fps else 0.0,
                pix_fmt=None,
                bit_rate=rate,
                rotation=0,
            )
        elif kind == "Audio" and audio is None:
            hz = _HZ.search(details)
            layout = hz.group(2).strip() if hz else None
            audio = AudioInfo(
                codec=codec,
                profile=None,
                sample_rate=int(hz.group(1)) if hz else 0,
                channels=_CHANNELS.get((layout or "").split("(")[0], 0),
                channel_layout=None if layout in (None, "unknown") else layout,
                bit_rate=rate,
            )
    if video is None and audio is None:
        raise ProbeError("the stream has neither video nor audio")
    return LiveInput(video=video, audio=audio, bit_rate=bit_rate)


async def probe_live(ffmpeg: Path, url: str, *, timeout_s: float = 20) -> LiveInput:
    """Open the stream once and read what it holds. ProbeError (URL redacted) when it cannot be read in
    `timeout_s`; FfmpegUnavailable when ffmpeg cannot be started."""
    try:
        process = await asyncio.create_subprocess_exec(
            os.fspath(ffmpeg),
            "-hide_banner",
            "-nostdin",
            *_ANALYSIS,
            "-i",
            url,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except (FileNotFoundError, PermissionError) as exc:
        raise FfmpegUnavailable(f"cannot start ffmpeg at {ffmpeg}: {exc.strerror}") from exc
    try:
        async with asyncio.timeout(timeout_s):
            _, stderr = await process.communicate()
    except TimeoutError:
        raise ProbeError(
            f"the stream {redact_urls(url)} sent nothing readable within {timeout_s:g} s"
        ) from None
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    text = stderr.decode("utf-8", "replace")
    try:
        return parse_stream_dump(text)
    except ProbeError:
        last = [line for line in text.strip().splitlines() if line.strip()][-1:] or ["no output"]
        raise ProbeError(f"cannot read the stream {redact_urls(url)}: {redact_urls(last[0])}") from None


# ------------------------------------------------------------------------------------------ command


def live_command(
    url: str,
    stream: LiveInput,
    renditions: Sequence[LiveRendition],
    *,
    out_dir: Path,
    segment_duration_s: float,
    list_size: int,
    threads: int = 0,
    has_libfdk_aac: bool = False,
) -> list[str]:
    """The arguments after the ffmpeg binary. Variant streams are numbered as ffmpeg writes them: the audio
    rendition first (`0.m3u8`) when there is audio and video, then one per video rendition."""
    if not renditions:
        raise ProbeError("the job asks for no rendition")
    has_audio, has_video = stream.audio is not None, stream.video is not None
    videos = [r for r in renditions if r.resolution != AUDIO_ONLY_RESOLUTION]
    audio_only = (has_audio and not has_video) or not videos
    if audio_only and not has_audio:
        raise ProbeError("the job asks for an audio-only rendition of a stream without audio")
    args = ["-hide_banner", "-nostdin", "-y", "-progress", "pipe:1", "-nostats", *_ANALYSIS, "-i", url]
    args += ["-sc_threshold", "0", "-max_muxing_queue_size", "1024", "-map_metadata", "-1"]
    args += ["-pix_fmt", "yuv420p", *_PRESET]
    if threads > 0:
        args += ["-threads", str(threads)]
    variants: list[str] = []
    if audio_only:
        args += ["-map", "0:a:0", *_audio_options(stream.audio, has_libfdk_aac)]
        variants.append("a:0")
    else:
        branches = "".join(f"[vtemp{r.resolution}]" for r in videos)
        graph = [f"[0:v:0]split={len(videos)}{branches}"]
        graph += [f"[vtemp{r.resolution}]scale=w=-2:h={r.resolution}[vout{r.resolution}]" for r in videos]
        args += ["-filter_complex", ";".join(graph)]
        if has_audio:
            args += ["-map", "0:a:0", *_audio_options(stream.audio, has_libfdk_aac)]
            variants.append("a:0,agroup:Audio,default:yes")
        ratio = video_aspect_ratio(stream.video)
        for number, rendition in enumerate(videos):
            bitrate = target_bitrate(rendition.resolution, rendition.fps, ratio, stream.input_bitrate)
            args += ["-map", f"[vout{rendition.resolution}]", f"-c:v:{number}", "libx264"]
            args += [f"-r:v:{number}", str(rendition.fps), f"-b:v:{number}", str(bitrate)]
            args += [f"-maxrate:v:{number}", str(bitrate), f"-bufsize:v:{number}", str(bitrate * 2)]
            args += [f"-g:v:{number}", str(rendition.fps * 2)]
            variants.append(f"v:{number},agroup:Audio" if has_audio else f"v:{number}")
    args += [
        "-f", "hls",
        "-hls_time", _seconds(segment_duration_s),
        "-hls_list_size", str(list_size),
        "-hls_flags", "independent_segments+program_date_time",
        "-hls_segment_filename", os.fspath(out_dir / "%v-%06d.ts"),
        "-master_pl_name", MASTER_PLAYLIST,
        "-var_stream_map", " ".join(variants),
        os.fspath(out_dir / "%v.m3u8"),
    ]  # fmt: skip
    return args


def variant_count(stream: LiveInput, renditions: Sequence[LiveRendition]) -> int:
    """How many media playlists `live_command` makes."""
    videos = [r for r in renditions if r.resolution != AUDIO_ONLY_RESOLUTION]
    if stream.video is None or not videos:
        return 1
    return len(videos) + (1 if stream.audio is not None else 0)


def _audio_options(audio: AudioInfo | None, has_libfdk: bool) -> list[str]:
    """PeerTube's default live audio: libfdk_aac at quality 5 when ffmpeg has it, else a copy of AAC that
    needs no change, else aac at the rate of the VOD rules."""
    if has_libfdk:
        return ["-c:a:0", "libfdk_aac", "-q:a", "5"]
    if can_copy_audio(audio):
        return ["-c:a:0", "copy"]
    options = ["-c:a:0", "aac"]
    if audio is not None:
        kbitrate = max_audio_kbitrate(audio.codec, audio.bit_rate)
        if kbitrate != _COPY_AUDIO:
            options += ["-b:a:0", f"{kbitrate}k"]
    return options


def _seconds(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".") or "0"


# ------------------------------------------------------------------------------------------ playlists

_HEADER_TAGS = (
    "#EXTM3U",
    "#EXT-X-VERSION",
    "#EXT-X-TARGETDURATION",
    "#EXT-X-MEDIA-SEQUENCE",
    "#EXT-X-DISCONTINUITY-SEQUENCE",
    "#EXT-X-INDEPENDENT-SEGMENTS",
    "#EXT-X-PLAYLIST-TYPE",
    "#EXT-X-ALLOW-CACHE",
)


@dataclass(frozen=True, slots=True)
class PlaylistSegment:
    name: str
    sequence: int
    # The tags that describe it (#EXTINF, #EXT-X-PROGRAM-DATE-TIME, ...), in order.
    tags: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class MediaPlaylist:
    """One of ffmpeg's live media playlists: its header, its window of segments, whether it ended."""

    header: tuple[str, ...]
    segments: tuple[PlaylistSegment, ...]
    ended: bool

    @classmethod
    def parse(cls, text: str) -> MediaPlaylist:
        header: list[str] = []
        segments: list[PlaylistSegment] = []
        tags: list[str] = []
        sequence = 0
        ended = False
        for raw in text.splitlines():
            line = raw.strip()
            if not line:
                continue
            if line.startswith("#EXT-X-MEDIA-SEQUENCE:"):
                sequence = int(line.split(":", 1)[1])
            elif line == "#EXT-X-ENDLIST":
                ended = True
            elif line.startswith("#"):
                if not segments and not tags and line.startswith(_HEADER_TAGS):
                    header.append(line)
                else:
                    tags.append(line)
            else:
                segments.append(PlaylistSegment(line, sequence + len(segments), tuple(tags)))
                tags = []
        return cls(tuple(header), tuple(segments), ended)

    def names(self) -> list[str]:
        return [segment.name for segment in self.segments]

    def up_to(self, name: str, *, first_sequence: int = 0) -> str:
        """The playlist as the server may serve it after receiving `name`: the segments of the window up to
        `name` whose sequence is at least `first_sequence` (the sender's first one after a segment it could
        not send, which must not be listed), no end tag."""
        last = next(s.sequence for s in self.segments if s.name == name)
        kept = [s for s in self.segments if first_sequence <= s.sequence <= last]
        lines = [line for line in self.header if not line.startswith("#EXT-X-MEDIA-SEQUENCE")]
        lines.append(f"#EXT-X-MEDIA-SEQUENCE:{kept[0].sequence}")
        for segment in kept:
            lines += [*segment.tags, segment.name]
        return "\n".join(lines) + "\n"
