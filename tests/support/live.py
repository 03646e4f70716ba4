"""Live test helpers: a publisher (`ffmpeg -re` to RTMP) and a protocol-level live runner.

`LiveRunner` does over HTTP what a runner does for a `live-rtmp-hls-transcoding` job, with real ffmpeg and
nothing else of the runner: accept, pull the stream from `input.rtmpUrl` into HLS (stream copy: the
published test stream has a keyframe every second), and post each segment with the playlist cut just after
it (and the master, once) as soon as ffmpeg lists it; `success` when ffmpeg ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.protocol import RUNNERS, admin_headers
from tuberunner.media.binaries import find_ffmpeg

MASTER = "#EXTM3U\n#EXT-X-VERSION:6\n#EXT-X-STREAM-INF:BANDWIDTH=800000,RESOLUTION=320x240\n0.m3u8\n"


def publish_args(url: str, seconds: float, *, size: str = "320x240", rate: int = 25) -> list[str]:
    """A generated stream with a frame counter burnt in, a keyframe every second, published in real time."""
    return [
        str(find_ffmpeg()),
        "-hide_banner",
        "-loglevel",
        "error",
        "-re",
        "-f",
        "lavfi",
        "-i",
        f"testsrc2=size={size}:rate={rate}",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:sample_rate=44100",
        "-t",
        str(seconds),
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-tune",
        "zerolatency",
        "-g",
        str(rate),
        "-c:a",
        "aac",
        "-f",
        "flv",
        url,
    ]


@contextlib.asynccontextmanager
async def publishing(url: str, seconds: float, **kwargs: Any) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        *publish_args(url, seconds, **kwargs), stdin=asyncio.subprocess.DEVNULL
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def create_live(client: httpx.AsyncClient, name: str = "a live", **fields: Any) -> dict[str, Any]:
    response = await client.post(
        "/api/v1/videos/live", json={"name": name, **fields}, headers=admin_headers()
    )
    response.raise_for_status()
    created: dict[str, Any] = response.json()
    return created


async def live_of(client: httpx.AsyncClient, video_uuid: str) -> dict[str, Any]:
    response = await client.get(f"/api/v1/videos/live/{video_uuid}", headers=admin_headers())
    response.raise_for_status()
    found: dict[str, Any] = response.json()
    return found


async def wait_for(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    """Poll an async predicate until it returns something truthy (a state visible only over HTTP)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)


async def request_live_job(
    client: httpx.AsyncClient, runner_token: str, timeout_s: float = 10
) -> dict[str, Any]:
    async def offered() -> dict[str, Any] | None:
        response = await client.post(
            f"{RUNNERS}/jobs/request",
            json={"runnerToken": runner_token, "jobTypes": ["live-rtmp-hls-transcoding"]},
        )
        response.raise_for_status()
        jobs: list[dict[str, Any]] = response.json()["availableJobs"]
        return jobs[0] if jobs else None

    found: dict[str, Any] = await wait_for(offered, timeout_s, "a live job")
    return found


@dataclass
class LiveRunner:
    client: httpx.AsyncClient
    runner_token: str
    work: Path
    job: dict[str, Any] = field(default_factory=dict)
    answers: list[int] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)
    ffmpeg: asyncio.subprocess.Process | None = None
    # A hung runner: ffmpeg goes on, nothing is sent.
    paused: bool = False
    success_status: int | None = None

    async def accept(self, job_uuid: str) -> dict[str, Any]:
        response = await self.client.post(
            f"{RUNNERS}/jobs/{job_uuid}/accept", json={"runnerToken": self.runner_token}
        )
        response.raise_for_status()
        self.job = response.json()["job"]
        return self.job

    @property
    def tokens(self) -> dict[str, str]:
        return {"runnerToken": self.runner_token, "jobToken": self.job["jobToken"]}

    async def update(
        self,
        chunk: str,
        *,
        kind: str = "add-chunk",
        chunk_bytes: bytes | None = None,
        playlist: tuple[str, str] | None = None,
        master: str | None = None,
    ) -> httpx.Response:
        data = {**self.tokens, "payload[type]": kind, "payload[videoChunkFilename]": chunk}
        files: dict[str, tuple[str, bytes, str]] = {}
        if chunk_bytes is not None:
            files["payload[videoChunkFile]"] = (chunk, chunk_bytes, "video/mp2t")
        if playlist is not None:
            data["payload[resolutionPlaylistFilename]"] = playlist[0]
            files["payload[resolutionPlaylistFile]"] = (
                playlist[0],
                playlist[1].encode(),
                "application/vnd.apple.mpegurl",
            )
        if master is not None:
            files["payload[masterPlaylistFile]"] = (
                "master.m3u8",
                master.encode(),
                "application/vnd.apple.mpegurl",
            )
        response = await self.client.post(f"{RUNNERS}/jobs/{self.job['uuid']}/update", data=data, files=files)
        self.answers.append(response.status_code)
        return response

    async def success(self) -> httpx.Response:
        return await self.client.post(f"{RUNNERS}/jobs/{self.job['uuid']}/success", json=self.tokens)

    async def run(self, *, send_success: bool = True) -> None:
        """Pull, segment and upload until the stream ends (or an update is refused), then `success`."""
        self.work.mkdir(parents=True, exist_ok=True)
        url = self.job["payload"]["input"]["rtmpUrl"]
        duration = self.job["payload"]["output"]["segmentDuration"]
        self.ffmpeg = await asyncio.create_subprocess_exec(
            str(find_ffmpeg()),
            "-hide_banner",
            "-loglevel",
            "error",
            "-i",
            url,
            "-map",
            "0:v",
            "-map",
            "0:a",
            "-c",
            "copy",
            "-f",
            "hls",
            "-hls_time",
            str(duration),
            "-hls_list_size",
            "0",
            "-hls_flags",
            "program_date_time+independent_segments",
            "-hls_segment_filename",
            str(self.work / "0-%06d.ts"),
            str(self.work / "0.m3u8"),
            stdin=asyncio.subprocess.DEVNULL,
        )
        refused = False
        try:
            while not refused:
                ended = self.ffmpeg.returncode is not None
                refused = not await self._send_new()
                if ended:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.ffmpeg.wait(), 0.1)
        finally:
            if self.ffmpeg.returncode is None:
                self.ffmpeg.send_signal(signal.SIGKILL)
            await self.ffmpeg.wait()
        if send_success and not refused and not self.paused:
            self.success_status = (await self.success()).status_code

    async def _send_new(self) -> bool:
        playlist = self.work / "0.m3u8"
        if self.paused or not playlist.exists():
            return True
        text = playlist.read_text()
        for line in text.splitlines():
            name = line.strip()
            if not name.endswith(".ts") or name in self.sent:
                continue
            cut = text[: text.index(name) + len(name)] + "\n"
            answer = await self.update(
                name,
                chunk_bytes=(self.work / name).read_bytes(),
                playlist=("0.m3u8", cut),
                master=MASTER if not self.sent else None,
            )
            if answer.status_code != 204:
                return False
            self.sent.append(name)
        return True
