"""Studio fixtures: the e2e coordinator (in this process), our runner with its real processors and input
cache, and tiny media made by the real ffmpeg: a main clip, intro/outro clips (one silent, one with sound,
neither of the main clip's shape), a solid watermark image, and a heavy intro for the download fault."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import coordinator_config, database_url, start_runner
from tuberunner.media.binaries import find_ffmpeg
from tuberunner.media.process import run_ffmpeg
from tuberunner.media.samples import make_sample_clip

# Fixtures of tests/e2e, used here as they are.
__all__ = ["StudioMedia", "coordinator_config", "database_url", "start_runner"]

MAIN_SIZE = (320, 180)
MAIN_DURATION_S = 3.0
WATERMARK_COLOR = (255, 0, 255)


@dataclass(frozen=True)
class StudioMedia:
    main: Path  # 320x180, 25 fps, 3 s, H.264 + AAC
    intro: Path  # 240x240 (square: fitted on black), 1 s, no audio (the silent-intro path)
    outro: Path  # 160x120, 1.5 s, with audio
    watermark: Path  # 64x32 magenta PNG
    heavy_intro: Path  # 1 s of nearly incompressible video (>1 MB): a download long enough to cut


@pytest.fixture(scope="session")
def studio_media(tmp_path_factory: pytest.TempPathFactory) -> StudioMedia:
    folder = tmp_path_factory.mktemp("studio-media")
    ffmpeg = find_ffmpeg()

    async def solid_image(out: Path) -> Path:
        red, green, blue = WATERMARK_COLOR
        color = f"0x{red:02x}{green:02x}{blue:02x}"
        args = ["-hide_banner", "-nostdin", "-y", "-f", "lavfi", "-i", f"color=c={color}:size=64x32:rate=1"]
        await run_ffmpeg(ffmpeg, [*args, "-frames:v", "1", "-update", "1", str(out)], duration_s=None)
        return out

    async def noise_clip(out: Path) -> Path:
        args = [
            "-hide_banner",
            "-nostdin",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "nullsrc=size=320x180:rate=25:duration=1",
        ]
        args += ["-vf", "geq=random(1)*255:128:128", "-c:v", "libx264", "-preset", "ultrafast", "-qp", "0"]
        await run_ffmpeg(ffmpeg, [*args, "-pix_fmt", "yuv420p", str(out)], duration_s=1.0)
        return out

    async def make() -> StudioMedia:
        width, height = MAIN_SIZE
        main, intro, outro, watermark, heavy = await asyncio.gather(
            make_sample_clip(
                ffmpeg, folder / "main.mp4", duration_s=MAIN_DURATION_S, width=width, height=height
            ),
            make_sample_clip(ffmpeg, folder / "intro.mp4", duration_s=1, width=240, height=240, audio=False),
            make_sample_clip(ffmpeg, folder / "outro.mp4", duration_s=1.5, width=160, height=120),
            solid_image(folder / "watermark.png"),
            noise_clip(folder / "heavy-intro.mp4"),
        )
        return StudioMedia(main, intro, outro, watermark, heavy)

    return asyncio.run(make())
