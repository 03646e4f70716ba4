"""Copy a published video's outputs into the output folder and describe them in `summary.json`.

OUT/
  <name>-<res>p.mp4        web videos (progressive MP4, faststart)
  hls/master.m3u8          HLS master playlist, variant playlists and their fragmented MP4s
  storyboard.jpg           sprite sheet (with --storyboard)
  <name>-<lang>.vtt        WebVTT caption in the detected (or asked) language (with --transcribe)
(with --cut/--intro/--outro/--watermark, every output is of the edited video)
  summary.json             what was produced, durations, sizes, encode speed

The coordinator's files are on this machine's disk: each output is hard-linked (else copied) from there
when `local` finds it, and downloaded from its URL otherwise. Nothing is ever written into a linked
file (the master playlist is rewritten as a new file), so the coordinator's copies never change.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from tuberunner.media.probe import probe

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class ExportResult:
    files: list[Path] = field(default_factory=list)
    summary_path: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def _safe_name(text: str) -> str:
    return _SAFE.sub("-", text).strip("-.") or "video"


# The stored file a URL serves, on this machine's disk (yields None when it has none: then it is fetched).
LocalFiles = Callable[[str], AbstractAsyncContextManager[Path | None]]


async def _download(http: httpx.AsyncClient, url: str, dest: Path, local: LocalFiles | None = None) -> Path:
    """Write to a temporary name, then rename: a half-written output is never visible."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
    try:
        if not await _linked(local, url, tmp):
            async with http.stream("GET", url) as answer:
                answer.raise_for_status()
                with tmp.open("wb") as handle:
                    async for chunk in answer.aiter_bytes(1024 * 1024):
                        handle.write(chunk)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


async def _linked(local: LocalFiles | None, url: str, tmp: Path) -> bool:
    if local is None:
        return False
    async with local(url) as path:
        if path is None:
            return False
        try:
            os.link(path, tmp)
        except OSError:  # another file system, or links not allowed: a copy (in the kernel) instead
            await asyncio.to_thread(shutil.copyfile, path, tmp)
    return True


def _basename(url: str) -> str:
    return urlsplit(url).path.rsplit("/", 1)[-1]


async def export_outputs(
    http: httpx.AsyncClient, video: dict[str, Any], out: Path, local: LocalFiles | None = None
) -> ExportResult:
    result = ExportResult()
    outputs = video["outputs"]
    name = _safe_name(video.get("name") or video["uuid"])

    # Files are fetched and probed side by side: each probe is a child process that mostly starts up.
    async def web_video(item: dict[str, Any]) -> tuple[list[Path], dict[str, Any]]:
        dest = await _download(http, item["url"], out / f"{name}-{item['resolution']}p.mp4", local)
        return [dest], await _describe(dest, out, resolution=item["resolution"], fps=item["fps"])

    web_videos = []
    for files, described in await asyncio.gather(*map(web_video, outputs.get("webVideos", []))):
        result.files += files
        web_videos.append(described)
    hls: dict[str, Any] | None = None
    if outputs.get("hls") and outputs["hls"].get("masterPlaylistUrl"):
        folder = out / "hls"
        # Names are kept: the playlists refer to each other and to the fragmented MP4s by these names.
        master = await _download(http, outputs["hls"]["masterPlaylistUrl"], folder / "master.m3u8", local)
        result.files.append(master)

        async def rendition(item: dict[str, Any]) -> tuple[list[Path], dict[str, Any]]:
            files = [await _download(http, item["videoUrl"], folder / _basename(item["videoUrl"]), local)]
            if playlist_url := item.get("playlistUrl"):
                files.append(await _download(http, playlist_url, folder / _basename(playlist_url), local))
            return files, await _describe(files[0], out, resolution=item["resolution"], fps=item["fps"])

        renditions = []
        for files, described in await asyncio.gather(*map(rendition, outputs["hls"]["renditions"])):
            result.files += files
            renditions.append(described)
        _point_master_at_local_names(master, outputs["hls"])
        hls = {"master": master.relative_to(out).as_posix(), "renditions": renditions}
    storyboards = []
    for index, item in enumerate(outputs.get("storyboards", [])):
        suffix = f"-{index + 1}" if index else ""
        dest = await _download(http, item["url"], out / f"storyboard{suffix}.jpg", local)
        result.files.append(dest)
        storyboards.append(
            {"file": dest.name, "sprites": item.get("sprites"), "sizeBytes": dest.stat().st_size}
        )
    captions = []
    for item in outputs.get("captions", []):
        dest = await _download(http, item["url"], out / f"{name}-{item.get('language') or 'und'}.vtt", local)
        result.files.append(dest)
        captions.append({"file": dest.name, "language": item.get("language")})
    result.summary = {
        "video": {"uuid": video["uuid"], "name": video.get("name"), "state": video["state"]},
        "source": video.get("source"),
        # The studio edits made before transcoding (cut, intro/outro/watermark task file names), if any.
        "studio": (video.get("options") or {}).get("studio"),
        "webVideos": web_videos,
        "hls": hls,
        "storyboards": storyboards,
        "captions": captions,
        "jobs": _jobs_summary(video),
    }
    result.summary_path = out / "summary.json"
    result.summary_path.write_text(json.dumps(result.summary, indent=2) + "\n")
    return result


def _point_master_at_local_names(master: Path, hls: dict[str, Any]) -> None:
    """The master names its variants as the coordinator serves them; the same names are used here, so
    only absolute URLs (if any) need to become bare names."""
    text = master.read_text()
    for item in hls["renditions"]:
        for key in ("playlistUrl", "videoUrl"):
            if item.get(key):
                text = text.replace(item[key], _basename(item[key]))
    # A new file, renamed over the old: `master` may be a link to the coordinator's own copy.
    tmp = master.with_name(f".{master.name}.{secrets.token_hex(4)}.part")
    try:
        tmp.write_text(text)
        os.replace(tmp, master)
    finally:
        tmp.unlink(missing_ok=True)


async def _describe(path: Path, out: Path, *, resolution: int, fps: int | None) -> dict[str, Any]:
    info = await probe(path)
    return {
        "file": path.relative_to(out).as_posix(),
        "resolution": resolution,
        "fps": fps,
        "durationS": round(info.duration_s, 3),
        "sizeBytes": info.size_bytes,
        "videoCodec": info.video.codec if info.video else None,
        "audioCodec": info.audio.codec if info.audio else None,
        "width": info.video.display_width if info.video else None,
        "height": info.video.display_height if info.video else None,
    }


def _jobs_summary(video: dict[str, Any]) -> list[dict[str, Any]]:
    duration = float((video.get("source") or {}).get("durationS") or 0)
    jobs = []
    for job in video["jobs"].get("list", []):
        seconds = None
        if job.get("startedAt") and job.get("finishedAt"):
            seconds = (
                datetime.fromisoformat(job["finishedAt"]) - datetime.fromisoformat(job["startedAt"])
            ).total_seconds()
        jobs.append(
            {
                "type": job["type"],
                "resolution": job.get("resolution"),
                "state": job["state"]["label"],
                "seconds": round(seconds, 3) if seconds is not None else None,
                # How many seconds of video one second of work produced.
                "speed": round(duration / seconds, 2) if seconds and duration else None,
            }
        )
    return jobs
