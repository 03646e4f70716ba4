"""Helpers of the ingest and completion tests (this module holds no test).

Tiny media made by the real ffmpeg, uploads through the ingest API, and a minimal runner that drives jobs
through the real runner API: request, accept, download its inputs, make real outputs with ffmpeg (stream
settings chosen for speed, not quality) and post them with `success`.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.servers import ADMIN_TOKEN, RunningCoordinator
from tuberunner.media.binaries import find_ffmpeg

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
RUNNERS = "/api/v1/runners"
FFMPEG = str(find_ffmpeg())
_QUIET = [FFMPEG, "-hide_banner", "-nostdin", "-loglevel", "error", "-y"]

# The files a `success` carries: field → (file name, bytes, MIME type); plus text payload fields.
Parts = dict[str, tuple[str, bytes, str]]
Produce = Callable[[dict[str, Any], dict[str, Path], Path], Awaitable[tuple[Parts, dict[str, str]]]]


@dataclass(frozen=True)
class Clips:
    video: Path  # 320x240, 25 fps, 3 s, H.264 + AAC
    short: Path  # 320x240, 25 fps, 2 s (too short for a storyboard)
    audio: Path  # 2 s AAC in .m4a
    text: Path  # not media at all


def make_clips(folder: Path) -> Clips:
    folder.mkdir(parents=True, exist_ok=True)

    def clip(out: Path, duration_s: int, *, video: bool = True) -> Path:
        args = [*_QUIET]
        if video:
            args += ["-f", "lavfi", "-i", f"testsrc2=size=320x240:rate=25:duration={duration_s}"]
        args += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={duration_s}"]
        if video:
            args += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-g", "25"]
        args += ["-c:a", "aac", "-b:a", "64k", "-t", str(duration_s), str(out)]
        subprocess.run(args, check=True)
        return out

    text = folder / "notes.mp4"
    text.write_bytes(b"these are not the frames you are looking for\n" * 200)
    return Clips(
        video=clip(folder / "clip.mp4", 3),
        short=clip(folder / "short.mp4", 2),
        audio=clip(folder / "tone.m4a", 2, video=False),
        text=text,
    )


async def upload(client: httpx.AsyncClient, path: Path, **fields: str) -> httpx.Response:
    files = {"videofile": (path.name, path.read_bytes(), "video/mp4")}
    return await client.post("/api/v1/videos", data=fields, files=files, headers=ADMIN)


async def upload_ok(client: httpx.AsyncClient, path: Path, **fields: str) -> str:
    response = await upload(client, path, **fields)
    assert response.status_code == 200, response.text
    video = response.json()["video"]
    assert isinstance(video["id"], int)
    uuid: str = video["uuid"]
    return uuid


async def video_json(client: httpx.AsyncClient, ident: str | int) -> dict[str, Any]:
    response = await client.get(f"/api/v1/videos/{ident}", headers=ADMIN)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def register(client: httpx.AsyncClient, running: RunningCoordinator, name: str = "test-runner") -> str:
    registration = await running.coordinator.runners.create_registration_token()
    response = await client.post(
        f"{RUNNERS}/register", json={"registrationToken": registration, "name": name}
    )
    response.raise_for_status()
    token: str = response.json()["runnerToken"]
    return token


async def ffmpeg(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        *_QUIET, *args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode(errors="replace")


async def produce_outputs(
    job: dict[str, Any], inputs: dict[str, Path], work: Path
) -> tuple[Parts, dict[str, str]]:
    """Real outputs of each job type from its downloaded inputs (what a runner would upload)."""
    payload = job["payload"]
    output = payload.get("output", {})
    encode = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
    kind = job["type"]
    if kind == "vod-web-video-transcoding":
        out = work / "web.mp4"
        scale = ["-vf", f"scale=-2:{output['resolution']}", "-r", str(output["fps"])]
        await ffmpeg(
            "-i", str(inputs["video"]), *scale, *encode, "-c:a", "aac", "-movflags", "faststart", str(out)
        )
        return {"payload[videoFile]": ("web.mp4", out.read_bytes(), "video/mp4")}, {}
    if kind == "vod-hls-transcoding":
        playlist, fragmented = work / "out.m3u8", work / "out-fragmented.mp4"
        resolution = output["resolution"]
        if resolution == 0:
            streams = ["-vn", "-c:a", "aac"]
        else:
            streams = ["-vf", f"scale=-2:{resolution}", "-r", str(output["fps"]), *encode]
            streams += ["-an"] if output["separatedAudio"] else ["-c:a", "aac"]
        hls = ["-f", "hls", "-hls_time", "1", "-hls_playlist_type", "vod", "-hls_segment_type", "fmp4"]
        hls += ["-hls_flags", "single_file", "-hls_segment_filename", str(fragmented)]
        await ffmpeg("-i", str(inputs["video"]), *streams, *hls, str(playlist))
        return {
            "payload[videoFile]": (fragmented.name, fragmented.read_bytes(), "video/mp4"),
            "payload[resolutionPlaylistFile]": (
                playlist.name,
                playlist.read_bytes(),
                "application/vnd.apple.mpegurl",
            ),
        }, {}
    if kind == "vod-audio-merge-transcoding":
        out = work / "merged.mp4"
        await ffmpeg(
            "-loop", "1", "-i", str(inputs["preview"]), "-i", str(inputs["audio"]),
            "-vf", "scale=trunc(iw/2)*2:trunc(ih/2)*2", "-r", str(output["fps"]), *encode,
            "-tune", "stillimage", "-c:a", "aac", "-shortest", str(out),
        )  # fmt: skip
        return {"payload[videoFile]": ("merged.mp4", out.read_bytes(), "video/mp4")}, {}
    if kind == "generate-video-storyboard":
        out = work / "storyboard.jpg"
        sprites = payload["sprites"]
        size = f"{sprites['size']['width']}:{sprites['size']['height']}"
        grid = f"{sprites['count']['width']}x{sprites['count']['height']}"
        await ffmpeg(
            "-i", str(inputs["video"]), "-vf", f"fps=1,scale={size},tile={grid}", "-frames:v", "1", str(out)
        )  # fmt: skip
        return {"payload[storyboardFile]": ("storyboard.jpg", out.read_bytes(), "image/jpeg")}, {}
    if kind == "video-transcription":
        vtt = b"WEBVTT\n\n00:00:00.000 --> 00:00:01.000\nA tone.\n"
        return {"payload[vttFile]": ("out.vtt", vtt, "text/vtt")}, {"payload[inputLanguage]": "en"}
    raise AssertionError(f"unexpected job type {kind}")


async def download_inputs(
    client: httpx.AsyncClient, job: dict[str, Any], tokens: dict[str, str], work: Path
) -> dict[str, Path]:
    urls = {
        "video": job["payload"]["input"].get("videoFileUrl"),
        "audio": job["payload"]["input"].get("audioFileUrl"),
        "preview": job["payload"]["input"].get("previewFileUrl"),
    }
    inputs: dict[str, Path] = {}
    for name, url in urls.items():
        if url is None:
            continue
        assert url.startswith("http://127.0.0.1:")  # absolute, built from our URL
        response = await client.post(url, json=tokens)
        assert response.status_code == 200, response.text
        path = work / f"input-{name}"
        path.write_bytes(response.content)
        inputs[name] = path
    return inputs


async def accept_next(client: httpx.AsyncClient, runner_token: str) -> dict[str, Any] | None:
    response = await client.post(f"{RUNNERS}/jobs/request", json={"runnerToken": runner_token})
    response.raise_for_status()
    available = response.json()["availableJobs"]
    if not available:
        return None
    response = await client.post(
        f"{RUNNERS}/jobs/{available[0]['uuid']}/accept", json={"runnerToken": runner_token}
    )
    response.raise_for_status()
    job: dict[str, Any] = response.json()["job"]
    return job


async def run_all_jobs(
    client: httpx.AsyncClient, runner_token: str, work: Path, produce: Produce = produce_outputs
) -> list[dict[str, Any]]:
    """Take and finish jobs until none is pending. `success` answers once completion is done, so the
    children of a finished job are pending when the next `request` is made: no waiting involved."""
    finished: list[dict[str, Any]] = []
    while (job := await accept_next(client, runner_token)) is not None:
        tokens = {"runnerToken": runner_token, "jobToken": job["jobToken"]}
        folder = work / job["uuid"]
        folder.mkdir(parents=True)
        inputs = await download_inputs(client, job, tokens, folder)
        parts, fields = await produce(job, inputs, folder)
        response = await client.post(
            f"{RUNNERS}/jobs/{job['uuid']}/success", data={**tokens, **fields}, files=parts
        )
        assert response.status_code == 204, response.text
        finished.append(job)
        assert len(finished) < 50
    return finished
