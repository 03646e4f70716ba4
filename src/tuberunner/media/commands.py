"""ffmpeg argument lists for each job type, built as pure functions (no I/O, no process).

They reproduce the commands of the official runner (PeerTube's `FFmpegVOD`, `presetVOD` and default profile,
notes §3.1-§3.4 and §3.8), because the server trusts what runners upload. Each returns the arguments after
the ffmpeg binary, for `process.run_ffmpeg`. Deliberate differences, none of which changes a correct output:

* every command starts with `-hide_banner -nostdin -y -progress pipe:1 -nostats` (progress parsing, no stdin);
* every file input is restricted with `-protocol_whitelist file,pipe`: a hostile input cannot make ffmpeg
  open network URLs;
* streams are mapped explicitly (`-map 0:v:0`, `-map <n>:a:0`): the first video and audio streams, the ones
  the probe described and the audio rules judged. ffmpeg's default choice (the audio with the most channels)
  could differ and, say, stream-copy an AC-3 track the rules never looked at;
* only one `-f` is written for HLS (PeerTube sets `-f mp4` then overrides it with `-f hls`);
* the audio merge's looped picture lasts as long as the audio (`-t`), so that ffmpeg 5.1 makes a video as
  long as the audio too (see `audio_merge_command`);
* relative paths are written as `./name`, so that a name can never be read as an option or a protocol.

The decisions (bitrate, audio copy, stream selection) are taken on `MediaInfo` from `probe.probe`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tuberunner.media.errors import NoAudioStream, NoVideoStream
from tuberunner.media.hls_playlist import fix_hls_playlist
from tuberunner.media.probe import MediaInfo
from tuberunner.media.profiles import (
    AUDIO_ONLY_RESOLUTION,
    StoryboardSprites,
    audio_options,
    target_bitrate,
    video_aspect_ratio,
)

__all__ = [
    "EncodeSettings",
    "LadderRung",
    "audio_merge_command",
    "fix_hls_playlist",
    "hls_command",
    "hls_remux_command",
    "ladder_command",
    "storyboard_command",
    "thumbnail_command",
    "web_video_command",
]

INPUT_PROTOCOLS = "file,pipe"
HLS_SEGMENT_DURATION_S = 4
THUMBNAIL_FRAMES_TO_ANALYZE = 50


@dataclass(frozen=True, slots=True)
class EncodeSettings:
    """What every encode shares: ffmpeg's thread count (0: ffmpeg decides) and whether libfdk_aac exists."""

    threads: int = 0
    has_libfdk_aac: bool = False


def web_video_command(
    video: MediaInfo,
    output: Path,
    *,
    resolution: int,
    fps: int,
    settings: EncodeSettings,
    audio_input: MediaInfo | None = None,
) -> list[str]:
    """`vod-web-video-transcoding`: one faststart MP4 at `resolution` (short side) and `fps`.

    `audio_input` is the separated audio file of a source uploaded with split audio; the audio then comes
    from it. Resolution 0 gives an audio-only MP4. Audio is stream-copied when the AAC rule allows it.
    """
    return [
        *_prefix(),
        *_inputs(video, audio_input),
        *_vod_preset(
            video,
            audio_input,
            resolution=resolution,
            fps=fps,
            settings=settings,
            scale=_scale_to_resolution(video, resolution),
            can_copy_audio=True,
            video_only=False,
        ),
        "-f",
        "mp4",
        _path(output),
    ]


def hls_command(
    video: MediaInfo,
    playlist: Path,
    fragmented_file: Path,
    *,
    resolution: int,
    fps: int,
    settings: EncodeSettings,
    separated_audio: bool = False,
    audio_input: MediaInfo | None = None,
) -> list[str]:
    """`vod-hls-transcoding`: a VOD playlist plus one fragmented MP4 addressed by byte ranges.

    Resolution 0 is the audio-only variant (`-vn`); `separated_audio` (the payload's `output.separatedAudio`)
    makes a video variant video-only (`-an`). Audio is always re-encoded, as PeerTube does when it does not
    copy the whole variant: copying only the audio desynchronised it (PeerTube issue #6438).
    After the run, call `fix_hls_playlist(playlist)`.
    """
    if fragmented_file.parent != playlist.parent:
        raise ValueError("the fragmented MP4 must sit next to its playlist, which names it by its bare name")
    return [
        *_prefix(),
        *_inputs(video, audio_input),
        *_vod_preset(
            video,
            audio_input,
            resolution=resolution,
            fps=fps,
            settings=settings,
            scale=_scale_to_resolution(video, resolution),
            can_copy_audio=False,
            video_only=separated_audio and resolution != AUDIO_ONLY_RESOLUTION,
        ),
        *_hls_output(playlist, fragmented_file),
    ]


def _hls_output(playlist: Path, fragmented_file: Path) -> list[str]:
    return [
        "-hls_time",
        str(HLS_SEGMENT_DURATION_S),
        "-hls_list_size",
        "0",
        "-hls_playlist_type",
        "vod",
        "-hls_segment_filename",
        _path(fragmented_file),
        "-hls_segment_type",
        "fmp4",
        "-f",
        "hls",
        "-hls_flags",
        "single_file",
        _path(playlist),
    ]


@dataclass(frozen=True, slots=True)
class LadderRung:
    """One output of `ladder_command`: an MP4 at `resolution` (short side) and `fps`."""

    resolution: int
    fps: int
    output: Path


def ladder_command(
    video: MediaInfo,
    rungs: list[LadderRung],
    *,
    settings: EncodeSettings,
    audio_input: MediaInfo | None = None,
) -> list[str]:
    """Several web videos from one decode: the source is read and decoded once, split, and each rung is
    scaled and encoded with exactly the options `web_video_command` gives it (same x264 settings, VBV cap,
    GOP, audio rule, faststart). Only the filter graph differs: `split` feeds one `scale` per rung.
    """
    if not rungs:
        raise ValueError("a ladder needs at least one rung")
    if video.video is None:
        raise NoVideoStream(f"{video.path.name} has no video stream to encode")
    if any(rung.resolution == AUDIO_ONLY_RESOLUTION for rung in rungs):
        raise ValueError("a ladder rung is a video rendition (resolution > 0)")
    count = len(rungs)
    pads = "".join(f"[split{index}]" for index in range(count))
    graph = [f"[0:v:0]split={count}{pads}" if count > 1 else "[0:v:0]null[split0]"]
    for index, rung in enumerate(rungs):
        scale = _scale_to_resolution(video, rung.resolution)
        graph.append(f"[split{index}]scale={scale}[rung{index}]")
    args = [*_prefix(), *_inputs(video, audio_input), "-filter_complex", ";".join(graph)]
    for index, rung in enumerate(rungs):
        args += [
            *_vod_preset(
                video,
                audio_input,
                resolution=rung.resolution,
                fps=rung.fps,
                settings=settings,
                scale=None,
                can_copy_audio=True,
                video_only=False,
                video_map=f"[rung{index}]",
            ),
            "-f",
            "mp4",
            _path(rung.output),
        ]
    return args


def hls_remux_command(
    source: Path, playlist: Path, fragmented_file: Path, *, with_video: bool, with_audio: bool
) -> list[str]:
    """An HLS rendition packaged from an MP4 that already holds its streams (`-c copy`, nothing encoded):
    the same playlist and single fragmented MP4 as `hls_command`. PeerTube packages its own HLS this way
    when the input can be copied (its `presetCopy`). Video and audio are copied together, never one of
    them encoded next to the other copied (that desynchronised PeerTube's audio, issue #6438).

    `with_video` maps the first video stream (ffmpeg fails without one); `with_audio` the first audio
    stream, if there is one next to the video (a silent source gives a video-only rendition, as the encode
    would), and it is required for an audio-only rendition. After the run, call `fix_hls_playlist(playlist)`.
    """
    if fragmented_file.parent != playlist.parent:
        raise ValueError("the fragmented MP4 must sit next to its playlist, which names it by its bare name")
    if not (with_video or with_audio):
        raise ValueError("a rendition has video, audio or both")
    options = ["-map", "0:v:0"] if with_video else []
    if with_audio:
        options += ["-map", "0:a:0?" if with_video else "0:a:0"]
    return [
        *_prefix(),
        *_input(source),
        *options,
        "-c",
        "copy",
        "-map_metadata",
        "-1",
        *_hls_output(playlist, fragmented_file),
    ]


def audio_merge_command(
    image: Path,
    audio: MediaInfo,
    output: Path,
    *,
    resolution: int,
    fps: int,
    settings: EncodeSettings,
) -> list[str]:
    """`vod-audio-merge-transcoding`: the still `image` looped for the length of `audio`, as an MP4.

    The picture keeps its own size, rounded down to even dimensions; `resolution` only feeds the bitrate.
    PeerTube's quirk is kept: the bitrate is computed from the *audio* file as if it were the video input
    (no picture, so ratio 0 and the 192 kbit/s fallback, capped at 1.3 x the audio file's bitrate).

    The looped picture is given the audio's duration (`-t` on that input) on top of PeerTube's `-shortest`:
    before ffmpeg 6.0, `-shortest` stopped the output only after the encoders, so every frame already inside
    x264's lookahead was still written (a 6 s audio gave a 7.56 s video on ffmpeg 5.1, whose audio-only HLS
    rendition was then 1.5 s short of its input). A picture that ends with the audio needs no cut.
    """
    if audio.audio is None:
        raise NoAudioStream(f"{audio.path.name} has no audio stream to put under the picture")
    video_options = _video_options(
        bitrate_source=audio,
        resolution=resolution,
        fps=fps,
        scale="trunc(iw/2)*2:trunc(ih/2)*2",
    )
    return [
        *_prefix(),
        "-loop",
        "1",
        *(["-t", _seconds(audio.duration_s)] if audio.duration_s > 0 else []),
        *_input(image),
        *_input(audio.path),
        "-map",
        "0:v:0",
        "-map",
        "1:a:0",
        *_threads(settings),
        "-movflags",
        "faststart",
        *_global_output_options(),
        *video_options,
        *audio_options(audio.audio, settings.has_libfdk_aac, can_copy=True),
        "-preset:v",
        "veryfast",
        "-tune",
        "stillimage",
        "-shortest",
        "-f",
        "mp4",
        _path(output),
    ]


def storyboard_command(
    video: Path, output: Path, sprites: StoryboardSprites, settings: EncodeSettings
) -> list[str]:
    """`generate-video-storyboard`: one JPEG sprite sheet (`output` should end in .jpg).

    One frame every `sprites.duration_s` seconds, scaled and tiled. `setpts=N/FRAME_RATE/TB` rebuilds clean
    timestamps first, because the selection reads them and some sources have broken ones.
    Note that ffmpeg reports no progress until the sheet is written, at the end of the decode.
    """
    graph = ",".join(
        [
            "setpts='N/FRAME_RATE/TB'",
            f"select='isnan(prev_selected_t)+gte(t-prev_selected_t,{sprites.duration_s:g})'",
            f"scale={sprites.width}:{sprites.height}",
            f"tile=layout={sprites.columns}x{sprites.rows}",
        ]
    )
    return [
        *_prefix(),
        *_input(video),
        *_threads(settings),
        "-filter_complex",
        graph,
        "-frames:v",
        "1",
        "-q:v",
        "2",
        _path(output),
    ]


def thumbnail_command(
    video: Path,
    output: Path,
    *,
    seek_s: float | None,
    width: int | None = None,
    height: int | None = None,
    settings: EncodeSettings,
) -> list[str]:
    """A preview image the way the PeerTube server makes one (runners never did: one-shot mode needs it).

    Seek to `seek_s` (PeerTube: half the duration), let the `thumbnail` filter pick the most representative
    of the next 50 frames, fit it in `width` x `height` keeping the aspect ratio. `-abort_on empty_output`
    makes a seek past the end fail instead of writing nothing; PeerTube then retries with `seek_s=None`.
    """
    filters = [f"thumbnail={THUMBNAIL_FRAMES_TO_ANALYZE}"]
    if width is not None and height is not None:
        filters.append(f"scale={width}x{height}:force_original_aspect_ratio=decrease")
    seek = ["-ss", f"{seek_s:.3f}"] if seek_s is not None else []
    return [
        *_prefix(),
        *seek,
        *_input(video),
        *_threads(settings),
        "-filter:v",
        ",".join(filters),
        "-frames:v",
        "1",
        "-q:v",
        "5",
        "-abort_on",
        "empty_output",
        _path(output),
    ]


# ---------------------------------------------------------------------------------------------------------
# The shared VOD preset (PeerTube's presetVOD + default x264/AAC profile)


def _vod_preset(
    video: MediaInfo,
    audio_input: MediaInfo | None,
    *,
    resolution: int,
    fps: int,
    settings: EncodeSettings,
    scale: str | None,
    can_copy_audio: bool,
    video_only: bool,
    video_map: str = "0:v:0",
) -> list[str]:
    audio_source = audio_input if audio_input is not None else video
    audio_index = 1 if audio_input is not None else 0
    with_audio = not video_only and audio_source.audio is not None
    with_video = not with_audio or resolution != AUDIO_ONLY_RESOLUTION
    if with_video and resolution == AUDIO_ONLY_RESOLUTION:
        # PeerTube would encode the picture at its own size under the audio-only name; refuse instead.
        raise NoAudioStream(f"{audio_source.path.name} has no audio stream for an audio-only output")
    if with_video and video.video is None:
        raise NoVideoStream(f"{video.path.name} has no video stream to encode at {resolution}p")

    options = []
    if with_video:
        options += ["-map", video_map]
    if with_audio:
        options += ["-map", f"{audio_index}:a:0"]
    options += [*_threads(settings), "-movflags", "faststart", *_global_output_options()]
    if with_video:
        options += _video_options(bitrate_source=video, resolution=resolution, fps=fps, scale=scale)
    else:
        options += ["-vn"]
    if with_audio:
        options += audio_options(audio_source.audio, settings.has_libfdk_aac, can_copy=can_copy_audio)
    else:
        options += ["-an"]
    return options


def _video_options(*, bitrate_source: MediaInfo, resolution: int, fps: int, scale: str | None) -> list[str]:
    bitrate = target_bitrate(
        resolution, fps, video_aspect_ratio(bitrate_source.video), bitrate_source.input_bitrate
    )
    options = ["-vcodec", "libx264"]
    if scale is not None:
        options += ["-vf", f"scale={scale}"]
    # No -crf and no -b:v: x264 keeps its default CRF 23, capped by the VBV (maxrate T, buffer 2T).
    options += [
        "-preset",
        "veryfast",
        "-maxrate:v",
        str(bitrate),
        "-bufsize:v",
        str(bitrate * 2),
        # b-strategy 1 is the fast heuristic, for which 16 B-frames is optimal (PeerTube PR #774).
        "-b_strategy",
        "1",
        "-bf",
        "16",
        "-r",
        str(fps),
    ]
    if fps:
        # A keyframe every 2 s: quick seeking and resolution switches.
        options += ["-g:v", str(fps * 2)]
    return options


def _scale_to_resolution(video: MediaInfo, resolution: int) -> str | None:
    if resolution == AUDIO_ONLY_RESOLUTION or video.video is None:
        return None
    # `resolution` is the short side; -2 keeps the aspect ratio with an even long side.
    return f"w={resolution}:h=-2" if video.video.is_portrait else f"w=-2:h={resolution}"


def _global_output_options() -> list[str]:
    return [
        # Avoids "Too many packets buffered for output stream" on some inputs (trac #6375).
        "-max_muxing_queue_size",
        "1024",
        "-map_metadata",
        "-1",
        # Also accepts sources in formats browsers cannot play (MJPEG's yuvj422p…).
        "-pix_fmt",
        "yuv420p",
    ]


def _seconds(value: float) -> str:
    """A time option's value (`-t`, `-ss`, `-to`), to the millisecond."""
    return f"{value:.3f}".rstrip("0").rstrip(".") or "0"


def _prefix() -> list[str]:
    return ["-hide_banner", "-nostdin", "-y", "-progress", "pipe:1", "-nostats"]


def _inputs(video: MediaInfo, audio_input: MediaInfo | None) -> list[str]:
    inputs = _input(video.path)
    if audio_input is not None:
        inputs += _input(audio_input.path)
    return inputs


def _input(path: Path) -> list[str]:
    return ["-protocol_whitelist", INPUT_PROTOCOLS, "-i", _path(path)]


def _threads(settings: EncodeSettings) -> list[str]:
    return ["-threads", str(settings.threads)] if settings.threads > 0 else []


def _path(path: Path) -> str:
    text = os.fspath(path)
    return text if path.is_absolute() else os.path.join(os.curdir, text)
