"""`tuberunner live -o OUT`: an embedded coordinator with its RTMP server and a runner, for one live.

It prints the RTMP URL and stream key to publish to (OBS, ffmpeg), then mirrors the live HLS into OUT/ as a
viewer reads it (the coordinator's public playlists and segments over loopback HTTP): OUT/master.m3u8 and
the media playlists are the live ones while the publisher streams. When the live ends (the publisher stopped
and the runner delivered its last segments), the media playlists in OUT/ are rewritten as VOD playlists
listing every segment of the stream, so OUT/ holds a complete HLS of the whole stream.

Everything else lives in `OUT/.tuberunner/` (database, coordinator files, runner work folder).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx

from tuberunner.coordinator.config import CoordinatorConfig
from tuberunner.coordinator.embedded import Embedded, embedded_coordinator
from tuberunner.media.errors import FfmpegUnavailable
from tuberunner.oneshot.session import STATE_DIR, TranscodeError, _running, _start_runners
from tuberunner.protocol.jobs import JobType
from tuberunner.runner.config import RunnerConfig

log = logging.getLogger(__name__)

_POLL_S: Final = 0.5
_SEGMENT: Final = re.compile(r"^[a-z0-9-]+\.ts$")
_PLAYLIST: Final = re.compile(r"^[a-z0-9-]+\.m3u8$")
_MASTER: Final = "master.m3u8"


@dataclass(frozen=True)
class LiveOptions:
    output: Path
    resolutions: tuple[int, ...] | None = None
    rtmp_port: int = 1935
    name: str = "live"
    segment_duration_s: float = 2.0


@dataclass
class _Segment:
    name: str
    duration_s: float
    discontinuity: bool


@dataclass
class LiveResult:
    video_uuid: str
    playlists: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None


# Starts the runners that take the live job, given the embedded coordinator and the state folder.
RunnersStarter = Callable[[Embedded, Path], AbstractAsyncContextManager[None]]


@asynccontextmanager
async def embedded_runner(embedded: Embedded, state_dir: Path) -> AsyncIterator[None]:
    """One runner of this package, taking live jobs only."""
    from tuberunner.runner.daemon import processing_settings
    from tuberunner.runner.processors import PROCESSORS

    if JobType.LIVE_RTMP_HLS not in PROCESSORS:
        raise TranscodeError("this version's runner has no live processor", exit_code=2)
    config = RunnerConfig(
        concurrency=1,
        update_interval_s=1.0,
        poll_interval_s=2.0,
        shutdown_grace_s=0.0,
        ffmpeg_nice=0,
        min_free_disk_bytes=64 * 1024**2,
        enabled_job_types=frozenset({JobType.LIVE_RTMP_HLS}),
    )
    try:
        settings = await processing_settings(config)
    except FfmpegUnavailable as exc:
        raise TranscodeError(str(exc), exit_code=2) from exc
    supervisors = await _start_runners(embedded, config, settings, state_dir, 1)
    async with _running(supervisors):
        yield


async def run_live(
    options: LiveOptions,
    say: Callable[[str], None],
    stop: asyncio.Event,
    *,
    runners: RunnersStarter = embedded_runner,
) -> LiveResult:
    """Serve one live until its first session ends (or `stop`); OUT/ gets its HLS."""
    out = options.output
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise TranscodeError(f"cannot write to {out}: {exc.strerror or exc}", exit_code=2) from exc
    state_dir = out / STATE_DIR
    admin_token = "tra-" + secrets.token_urlsafe(24)
    config = CoordinatorConfig(
        data_dir=state_dir / "coordinator",
        admin_token=admin_token,
        ping_debounce_s=0.01,
        rtmp_port=options.rtmp_port,
        live_segment_duration_s=options.segment_duration_s,
    )
    async with AsyncExitStack() as stack:
        try:
            embedded = await stack.enter_async_context(embedded_coordinator(config))
        except (OSError, RuntimeError) as exc:
            raise TranscodeError(
                f"cannot start (is RTMP port {options.rtmp_port} taken? --rtmp-port picks another): {exc}",
                exit_code=2,
            ) from exc
        http = await stack.enter_async_context(
            httpx.AsyncClient(
                base_url=embedded.url,
                headers={"Authorization": f"Bearer {admin_token}"},
                timeout=httpx.Timeout(30.0, connect=5.0),
            )
        )
        await stack.enter_async_context(runners(embedded, state_dir))
        body: dict[str, Any] = {"name": options.name}
        if options.resolutions:
            body["resolutions"] = ",".join(str(r) for r in options.resolutions)
        answer = await http.post("/api/v1/videos/live", json=body)
        if answer.status_code != 200:
            raise TranscodeError(f"cannot create the live: {answer.text}")
        created = answer.json()
        live = created["live"]
        say(f"publish to:  {live['rtmpUrl']}")
        say(f"stream key:  {live['streamKey']}")
        say(f"(ffmpeg: -f flv {live['rtmpUrl']}/{live['streamKey']})")
        say(f"live HLS:    {out / _MASTER} (and {live['hlsUrl']} while this runs)")
        mirror = _Mirror(http, live["hlsUrl"].rsplit("/", 1)[0], out)
        result = LiveResult(created["video"]["uuid"])
        announced = False
        while True:
            state = (await http.get(f"/api/v1/videos/live/{result.video_uuid}")).json()
            if state["state"] == "live" and not announced:
                say("live: a publisher is streaming")
                announced = True
            await mirror.pull()
            if state["state"] == "ended":
                result.error = state.get("error")
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _POLL_S)
            if stop.is_set():
                raise TranscodeError("interrupted", exit_code=130)
        result.playlists = mirror.finish()
    return result


class _Mirror:
    """Copies the live HLS as a viewer reads it, and keeps every segment for the final VOD playlists."""

    def __init__(self, http: httpx.AsyncClient, base: str, out: Path) -> None:
        self.http = http
        self.base = base
        self.out = out
        self.master: str | None = None
        self.segments: dict[str, list[_Segment]] = {}
        self.target_s: dict[str, int] = {}

    async def pull(self) -> None:
        if self.master is None:
            answer = await self.http.get(f"{self.base}/{_MASTER}")
            if answer.status_code != 200:
                return
            self.master = answer.text
        for name in _playlists_of(self.master):
            answer = await self.http.get(f"{self.base}/{name}")
            if answer.status_code != 200:
                continue
            text = answer.text
            listed = _parse(text)
            target = re.search(r"#EXT-X-TARGETDURATION:(\d+)", text)
            if target:
                self.target_s[name] = max(self.target_s.get(name, 0), int(target.group(1)))
            known = self.segments.setdefault(name, [])
            have = {s.name for s in known}
            for segment in listed:
                if segment.name in have:
                    continue
                data = await self.http.get(f"{self.base}/{segment.name}")
                if data.status_code != 200:
                    log.warning("segment %s could not be read (%d)", segment.name, data.status_code)
                    continue
                _write(self.out / segment.name, data.content)
                known.append(segment)
            _write(self.out / name, text.encode())
        _write(self.out / _MASTER, self.master.encode())

    def finish(self) -> dict[str, list[str]]:
        """Every media playlist as a VOD playlist of the whole stream."""
        for name, segments in self.segments.items():
            if not segments:
                continue
            target = max([self.target_s.get(name, 1), *(math.ceil(s.duration_s) for s in segments)])
            lines = [
                "#EXTM3U",
                "#EXT-X-VERSION:6",
                "#EXT-X-PLAYLIST-TYPE:VOD",
                f"#EXT-X-TARGETDURATION:{target}",
                "#EXT-X-MEDIA-SEQUENCE:0",
                "#EXT-X-INDEPENDENT-SEGMENTS",
            ]
            for index, segment in enumerate(segments):
                if segment.discontinuity and index > 0:
                    lines.append("#EXT-X-DISCONTINUITY")
                lines += [f"#EXTINF:{segment.duration_s:.6f},", segment.name]
            lines.append("#EXT-X-ENDLIST")
            _write(self.out / name, ("\n".join(lines) + "\n").encode())
        return {name: [s.name for s in segments] for name, segments in self.segments.items()}


def _playlists_of(master: str) -> list[str]:
    names = [line.strip() for line in master.splitlines() if line.strip() and not line.startswith("#")]
    names += re.findall(r'URI="([^"]+)"', master)
    return [n for n in dict.fromkeys(names) if _PLAYLIST.match(n)]


def _parse(text: str) -> list[_Segment]:
    found: list[_Segment] = []
    duration: float | None = None
    discontinuity = False
    for raw in text.splitlines():
        line = raw.strip()
        if line == "#EXT-X-DISCONTINUITY":
            discontinuity = True
        elif line.startswith("#EXTINF:"):
            with contextlib.suppress(ValueError):
                duration = float(line[len("#EXTINF:") :].split(",", 1)[0])
        elif line and not line.startswith("#"):
            if duration is not None and _SEGMENT.match(line):
                found.append(_Segment(line, duration, discontinuity))
            duration, discontinuity = None, False
    return found


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
