"""Small generated media files for `make demo` and for tests: ffmpeg's lavfi test sources, no downloads."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from tuberunner.media.process import run_ffmpeg

_SAMPLE_STALL_TIMEOUT_S = 30.0


async def make_sample_clip(
    ffmpeg: Path,
    out: Path,
    *,
    duration_s: float = 5.0,
    width: int = 640,
    height: int = 360,
    fps: int = 25,
    audio: bool = True,
    audio_only: bool = False,
) -> Path:
    """Write a test clip: `testsrc2` picture (H.264 High, yuv420p) and a 440 Hz stereo tone (AAC 128k).

    `audio_only` writes only the tone (use an `.m4a` or `.mp4` name). The container follows `out`'s suffix.
    """
    if audio_only and not audio:
        raise ValueError("an audio-only clip needs audio")
    args = ["-hide_banner", "-nostdin", "-y", "-progress", "pipe:1", "-nostats"]
    if not audio_only:
        args += ["-f", "lavfi", "-i", f"testsrc2=size={width}x{height}:rate={fps}:duration={duration_s}"]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={duration_s}"]
    if not audio_only:
        args += ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-g", str(fps * 2)]
    if audio:
        args += ["-c:a", "aac", "-b:a", "128k", "-ac", "2"]
    args += ["-t", f"{duration_s}", str(out)]
    await run_ffmpeg(ffmpeg, args, duration_s=duration_s, stall_timeout_s=_SAMPLE_STALL_TIMEOUT_S)
    return out


async def make_still_image(ffmpeg: Path, out: Path, *, width: int = 640, height: int = 360) -> Path:
    """Write one `testsrc2` frame as an image (JPEG for a `.jpg` name, PNG for `.png`), any dimensions."""
    args = [
        "-hide_banner",
        "-nostdin",
        "-y",
        "-progress",
        "pipe:1",
        "-nostats",
        "-f",
        "lavfi",
        "-i",
        # RGB, because testsrc2's default 4:2:0 would silently round odd dimensions down to even.
        f"testsrc2=size={width}x{height}:rate=1,format=rgb24",
        "-frames:v",
        "1",
        "-q:v",
        "3",
        # One picture, not an image sequence: no "%d" pattern needed in the name.
        "-update",
        "1",
        str(out),
    ]
    await run_ffmpeg(ffmpeg, args, duration_s=None, stall_timeout_s=_SAMPLE_STALL_TIMEOUT_S)
    return out


# ---------------------------------------------------------------------------------------------------------
# Frame counters: which source frames a transcoded stream holds (live tests and benchmarks)

_COUNTER_BITS = 16


def frame_counter_filter() -> str:
    """A `-vf` filter burning each frame's number (0, 1, ...) into the picture as a bar code: 16 blocks
    across the top tenth, white for a 1 bit (least significant on the left), black for a 0. It survives
    scaling and lossy encodes; `frame_counters` reads it back."""
    bit = f"mod(floor(N/pow(2,floor(X*{_COUNTER_BITS}/W))),2)"
    return (
        f"geq=lum='if(lt(Y,H/10),16+219*{bit},lum(X,Y))'"
        ":cb='if(lt(Y,H/10),128,cb(X,Y))':cr='if(lt(Y,H/10),128,cr(X,Y))'"
    )


async def frame_counters(ffmpeg: Path, segments: list[bytes]) -> list[int]:
    """The frame numbers `frame_counter_filter` burnt into the video of `segments` (MPEG-TS, in order), one
    per decoded frame: each block of the bar code averaged over the middle of the strip, then thresholded."""
    process = await asyncio.create_subprocess_exec(
        os.fspath(ffmpeg),
        "-hide_banner",
        "-loglevel",
        "error",
        "-f",
        "mpegts",
        "-i",
        "pipe:0",
        "-map",
        "0:v:0",
        "-vf",
        f"crop=iw:ih/20:0:ih/40,scale={_COUNTER_BITS}:1:flags=area",
        "-fps_mode",
        "passthrough",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "gray",
        "pipe:1",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate(b"".join(segments))
    if process.returncode != 0:
        raise RuntimeError(f"cannot read the frame counters: {stderr.decode(errors='replace').strip()}")
    return [
        sum(1 << bit for bit, value in enumerate(stdout[at : at + _COUNTER_BITS]) if value > 128)
        for at in range(0, len(stdout) - _COUNTER_BITS + 1, _COUNTER_BITS)
    ]
