"""Real, tiny result files of every job type, as a runner would upload them (made once per session)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from tuberunner.media.binaries import find_ffmpeg
from tuberunner.protocol.jobs import JobType


def make_result_files(folder: Path) -> dict[str, Path]:
    ffmpeg = str(find_ffmpeg())
    folder.mkdir(parents=True, exist_ok=True)
    mp4 = folder / "out.mp4"
    base = [ffmpeg, "-hide_banner", "-loglevel", "error", "-y"]
    subprocess.run(
        [
            *base,
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=160x90:rate=25",
            "-f",
            "lavfi",
            "-i",
            "sine",
            "-t",
            "1",
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
            "-movflags",
            "faststart",
            str(mp4),
        ],
        check=True,
    )
    subprocess.run(
        [
            *base,
            "-i",
            str(mp4),
            "-c",
            "copy",
            "-f",
            "hls",
            "-hls_segment_type",
            "fmp4",
            "-hls_flags",
            "single_file",
            "-hls_playlist_type",
            "vod",
            "-hls_segment_filename",
            str(folder / "frag.mp4"),
            str(folder / "out.m3u8"),
        ],
        check=True,
    )
    subprocess.run([*base, "-i", str(mp4), "-frames:v", "1", str(folder / "out.jpg")], check=True)
    vtt = folder / "out.vtt"
    vtt.write_text("WEBVTT\n\n00:00:00.000 --> 00:00:00.900\nhello\n")
    return {
        "mp4": mp4,
        "frag": folder / "frag.mp4",
        "m3u8": folder / "out.m3u8",
        "jpg": folder / "out.jpg",
        "vtt": vtt,
    }


def result_parts(job_type: JobType, files: dict[str, Path]) -> dict[str, Any]:
    """The multipart file parts of a valid `success` of `job_type`."""

    def part(name: str, key: str, mime: str) -> tuple[str, tuple[str, bytes, str]]:
        return f"payload[{name}]", (files[key].name, files[key].read_bytes(), mime)

    table = {
        JobType.VOD_WEB_VIDEO: [part("videoFile", "mp4", "video/mp4")],
        JobType.VOD_AUDIO_MERGE: [part("videoFile", "mp4", "video/mp4")],
        JobType.STUDIO: [part("videoFile", "mp4", "video/mp4")],
        JobType.VOD_HLS: [
            part("videoFile", "frag", "video/mp4"),
            part("resolutionPlaylistFile", "m3u8", "application/vnd.apple.mpegurl"),
        ],
        JobType.TRANSCRIPTION: [part("vttFile", "vtt", "text/vtt")],
        JobType.STORYBOARD: [part("storyboardFile", "jpg", "image/jpeg")],
    }
    return dict(table[job_type])
