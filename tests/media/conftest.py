"""Media fixtures: the ffmpeg binary and tiny clips generated once per session (320x180, a few seconds)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from tuberunner.media.binaries import check_ffmpeg, find_ffmpeg
from tuberunner.media.samples import make_sample_clip, make_still_image

CLIP_DURATION_S = 3.0
CLIP_WIDTH = 320
CLIP_HEIGHT = 180
CLIP_FPS = 25


@pytest.fixture(scope="session")
def ffmpeg_path() -> Path:
    return find_ffmpeg()


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")


# Session fixtures are synchronous and run the generator on their own short-lived loop: they are created
# outside any test's event loop, so no loop has to outlive a test.


@pytest.fixture(scope="session")
def sample_clip(ffmpeg_path: Path, media_dir: Path) -> Path:
    """3 s, 320x180, 25 fps, H.264 High + stereo AAC 128k."""
    return asyncio.run(
        make_sample_clip(
            ffmpeg_path,
            media_dir / "clip.mp4",
            duration_s=CLIP_DURATION_S,
            width=CLIP_WIDTH,
            height=CLIP_HEIGHT,
            fps=CLIP_FPS,
        )
    )


@pytest.fixture(scope="session")
def detailed_clip(ffmpeg_path: Path, media_dir: Path) -> Path:
    """3 s at 640x360 (about 0.8 Mbit/s): read at real speed, ffmpeg reads it several times a second."""
    return asyncio.run(
        make_sample_clip(ffmpeg_path, media_dir / "detailed.mp4", duration_s=3.0, width=640, height=360)
    )


@pytest.fixture(scope="session")
def video_only_clip(ffmpeg_path: Path, media_dir: Path) -> Path:
    return asyncio.run(
        make_sample_clip(
            ffmpeg_path,
            media_dir / "video-only.mp4",
            duration_s=2.0,
            width=CLIP_WIDTH,
            height=CLIP_HEIGHT,
            fps=CLIP_FPS,
            audio=False,
        )
    )


@pytest.fixture(scope="session")
def audio_only_clip(ffmpeg_path: Path, media_dir: Path) -> Path:
    return asyncio.run(
        make_sample_clip(ffmpeg_path, media_dir / "audio.m4a", duration_s=2.0, audio_only=True)
    )


@pytest.fixture(scope="session")
def still_image(ffmpeg_path: Path, media_dir: Path) -> Path:
    """Odd dimensions on purpose: the audio merge must round them down to even."""
    return asyncio.run(make_still_image(ffmpeg_path, media_dir / "still.jpg", width=321, height=181))


@pytest.fixture(scope="session")
def rotated_clip(ffmpeg_path: Path, media_dir: Path, sample_clip: Path) -> Path:
    """The sample clip with a 90° display rotation: stored 320x180, shown 180x320 (portrait)."""
    out = media_dir / "rotated.mp4"
    release = asyncio.run(check_ffmpeg(ffmpeg_path)).release
    # Both write the same display matrix: the `rotate` tag until ffmpeg 6.0 gave -display_rotation (input
    # side) and later releases ignore the tag.
    if release is None or release >= (6, 0):
        rotate_input, rotate_output = ["-display_rotation", "90"], []
    else:
        rotate_input, rotate_output = [], ["-metadata:s:v:0", "rotate=90"]
    subprocess.run(
        [
            str(ffmpeg_path),
            "-hide_banner",
            "-nostdin",
            "-y",
            *rotate_input,
            "-i",
            str(sample_clip),
            "-c",
            "copy",
            *rotate_output,
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return out
