"""When an HLS rendition can be packaged from its input as it is, instead of encoded again.

PeerTube copies codecs for its own HLS jobs when the input is already what the profile makes
(`canDoQuickVideoTranscode`: H.264, yuv420p, 2-`maxFPS` fps, bit rate under the *maximum* theoretical rate),
and runner 0.4+ does when the server says so. Here the runner decides, and more strictly: the copy must be
what the encode would have produced, in every property a player or the server looks at:

* H.264 in a profile browsers play (Constrained Baseline, Baseline, Main, High), level at most 5.1,
  yuv420p (not the full-range yuvj420p), no rotation (the encode would turn the picture upright);
* exactly the job's resolution (the short side, both sides even: the encode's scale would keep them) and
  frame rate;
* a keyframe first and then at most every 2 s (the encode's GOP), so the 4 s segments cut where the encoded
  ones would;
* a bit rate within the job's cap: the `-maxrate` the encode would get (PeerTube's target bit rate; its
  quick transcode accepts up to the larger *maximum* rate);
* audio, when the rendition carries it, that the AAC rule copies (`profiles.can_copy_audio`) in mono or
  stereo (HLS encodes force stereo: other layouts break playback in Chrome), from the same file: video and
  audio are always copied together. The audio-only rendition is copied on this rule alone (PeerTube copies
  it too when it copies codecs).

Anything else, or anything unknown (no bit rate, no level), answers a reason, and the job encodes as before.
"""

from __future__ import annotations

from typing import Final

from tuberunner.media.probe import KeyframeSpacing, MediaInfo
from tuberunner.media.profiles import (
    AUDIO_ONLY_RESOLUTION,
    can_copy_audio,
    target_bitrate,
    video_aspect_ratio,
)

__all__ = ["GOP_S", "hls_copy_problem"]

# The encode's keyframe interval (`-g fps*2`).
GOP_S: Final = 2.0
_PLAYABLE_PROFILES: Final = frozenset({"Constrained Baseline", "Baseline", "Main", "High"})
_MAX_LEVEL: Final = 51


def hls_copy_problem(
    info: MediaInfo,
    keyframes: KeyframeSpacing | None,
    *,
    resolution: int,
    fps: int,
    with_audio: bool,
) -> str | None:
    """None when `info` can be packaged as the HLS rendition (`resolution`, `fps`) with `-c copy`;
    otherwise why not. `keyframes=None` (not read yet) checks everything else."""
    video = info.video
    if resolution == AUDIO_ONLY_RESOLUTION:
        return "no audio stream" if info.audio is None else _audio_problem(info)
    if video is None:
        return "no video stream"
    if video.codec != "h264":
        return f"video codec {video.codec}, not h264"
    if video.profile not in _PLAYABLE_PROFILES:
        return f"H.264 profile {video.profile or 'unknown'}"
    if video.level is None or video.level > _MAX_LEVEL:
        return f"H.264 level {video.level or 'unknown'}"
    if video.pix_fmt != "yuv420p":
        return f"pixel format {video.pix_fmt or 'unknown'}"
    if video.rotation:
        return f"rotated by {video.rotation}°"
    if video.short_side != resolution or video.width % 2 or video.height % 2:
        return f"{video.width}x{video.height}, not {resolution}p"
    if abs(video.fps - fps) > 0.01:
        return f"{video.fps:g} fps, not {fps}"
    bit_rate = video.bit_rate or info.bit_rate
    if not bit_rate:
        return "unknown bit rate"
    cap = target_bitrate(resolution, fps, video_aspect_ratio(video), info.input_bitrate)
    if bit_rate > cap:
        return f"bit rate {bit_rate} above the cap {cap}"
    if with_audio and info.audio is not None and (problem := _audio_problem(info)):
        return problem
    if keyframes is not None:
        if not keyframes.starts_with_keyframe or keyframes.max_interval_s is None:
            return "does not start with a keyframe"
        # One frame of slack: timestamps of a 2 s GOP land on 2 s plus rounding.
        if keyframes.max_interval_s > GOP_S + 1.0 / fps + 0.001:
            return f"keyframes up to {keyframes.max_interval_s:.2f} s apart (more than {GOP_S:g} s)"
    return None


def _audio_problem(info: MediaInfo) -> str | None:
    audio = info.audio
    if audio is None:
        return None
    if not can_copy_audio(audio) or audio.channels > 2 or audio.channel_layout not in ("mono", "stereo"):
        return f"{audio.codec} audio ({audio.channel_layout or 'unknown layout'}) that the profile re-encodes"
    return None
