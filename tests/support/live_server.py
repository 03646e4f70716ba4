"""A small PeerTube for live fault tests: one live job, its RTMP stream, and `update` answers the test picks.

The real coordinator cannot be made to give some of PeerTube's answers at a chosen moment: 400
`runner_job_not_in_processing_state` "Session of this live ended", 404 to a job its runner still works on,
a 503, answers slower than the playlist window. This server gives them on request (`answer`), with
PeerTube's problem documents (spec §2.3, §3.6, §3.11); it serves the runner API only (request, accept,
update, success, error, abort) over real HTTP (Starlette under uvicorn on loopback).

An update counts as received once it is answered 204: its segment, playlist and master are stored then, and
checked as a player would need them (`problems`): a media playlist lists only segments received (in this
update or before), its sequence numbers never go back and always name the same segment, it has no end tag,
and the master names only playlists the server has.

The stream is real RTMP: the coordinator's relay (any number of players, each joining at the last
keyframe) with a policy that lets anyone publish and play, fed by an `ffmpeg -re` publisher.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tuberunner.coordinator.rtmp_relay import PlayGrant, PublishGrant, RtmpRelay
from tuberunner.media.live import MediaPlaylist

API = "/api/v1/runners"
LIVE_TYPE = "live-rtmp-hls-transcoding"
SESSION_ENDED = "Session of this live ended"
NOT_PROCESSING = "runner_job_not_in_processing_state"
_SEGMENT = re.compile(r"^[a-z0-9-]+\.ts$")
_PLAYLIST = re.compile(r"^[a-z0-9-]+\.m3u8$")


@dataclass(frozen=True)
class Update:
    kind: str
    chunk: str
    chunk_bytes: bytes | None
    playlist_name: str | None
    playlist: str | None
    master: str | None
    # Monotonic time the request arrived.
    at: float


@dataclass(frozen=True)
class Answer:
    """How the server answers one update: after `delay_s`, 204 (received) or a PeerTube problem."""

    status: int = 204
    detail: str = ""
    code: str | None = None
    delay_s: float = 0.0

    @classmethod
    def session_ended(cls) -> Answer:
        return cls(400, SESSION_ENDED, NOT_PROCESSING)

    @classmethod
    def unknown_job(cls) -> Answer:
        return cls(404, "Unknown runner job")


@dataclass
class LiveServer:
    runner_token: str
    rtmp_url: str
    to_transcode: list[dict[str, int]]
    segment_duration_s: float
    list_size: int
    url: str = ""
    job_uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))
    job_token: str = field(default_factory=lambda: secrets.token_hex(16))
    # Decides the answer to each update (default: received).
    answer: Callable[[Update], Answer] = lambda update: Answer()
    accepted: bool = False
    # Every update that arrived, and the answer it got.
    updates: list[tuple[Update, Answer]] = field(default_factory=list)
    # Segments received, in order, with the monotonic and wall-clock times each one was.
    received: dict[str, float] = field(default_factory=dict)
    wall_received: dict[str, float] = field(default_factory=dict)
    chunks: dict[str, bytes] = field(default_factory=dict)
    # Segments received again (an update sent again after its answer was lost).
    resent: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    playlists: dict[str, str] = field(default_factory=dict)
    master: str | None = None
    masters_received: int = 0
    # Per media playlist: the sequence numbers it started at, in order; what each sequence number named.
    first_sequences: dict[str, list[int]] = field(default_factory=dict)
    names: dict[str, dict[int, str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    # "success", "error: <message>", "abort: <reason>"
    ends: list[str] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    # ------------------------------------------------------------------ the test's side

    def job(self) -> dict[str, Any]:
        return {
            "uuid": self.job_uuid,
            "type": LIVE_TYPE,
            "state": {"id": 2, "label": "Processing"},
            "jobToken": self.job_token,
            "payload": {
                "input": {"rtmpUrl": self.rtmp_url},
                "output": {
                    "toTranscode": self.to_transcode,
                    "segmentDuration": self.segment_duration_s,
                    "segmentListSize": self.list_size,
                },
            },
        }

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Wait until `predicate()` holds, checked after each request."""
        try:
            async with asyncio.timeout(timeout_s):
                while not predicate():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}") from None

    def received_of(self, playlist: str) -> list[str]:
        prefix = playlist.removesuffix(".m3u8") + "-"
        return [name for name in self.received if name.startswith(prefix)]

    # ------------------------------------------------------------------ the runner's side

    def app(self) -> Starlette:
        routes = [
            Route(f"{API}/jobs/request", self._request, methods=["POST"]),
            Route(f"{API}/jobs/{{uuid}}/{{action}}", self._job_action, methods=["POST"]),
        ]
        return Starlette(routes=routes)

    async def _request(self, request: Request) -> Response:
        body = await request.json()
        self._changed.set()
        if body.get("runnerToken") != self.runner_token:
            return _problem(404, "Unknown runner token", "unknown_runner_token")
        offered = [] if self.accepted or self.ends else [self.job()]
        if LIVE_TYPE not in body.get("jobTypes", [LIVE_TYPE]):
            offered = []
        return JSONResponse({"availableJobs": offered})

    async def _job_action(self, request: Request) -> Response:
        action, job_uuid = request.path_params["action"], request.path_params["uuid"]
        try:
            if not _is_form(request):
                return await self._act(action, job_uuid, await request.json())
            async with request.form() as fields:  # closes the uploaded files' spools
                return await self._act(action, job_uuid, fields)
        except ClientDisconnect:  # the connection was cut during the request: nothing received
            return Response(status_code=400)
        finally:
            self._changed.set()

    async def _act(self, action: str, job_uuid: str, fields: Any) -> Response:
        if job_uuid != self.job_uuid or fields.get("runnerToken") != self.runner_token:
            return _problem(404, "Unknown runner job")
        if action == "accept":
            if self.accepted:
                return _problem(409, 'This job is not in "pending" state', "runner_job_not_in_pending_state")
            self.accepted = True
            return JSONResponse({"job": self.job()})
        if fields.get("jobToken") != self.job_token or not self.accepted:
            return _problem(404, "Unknown runner job")
        if self.ends:
            return _problem(400, 'Job is not in "processing" state', NOT_PROCESSING)
        if action == "update":
            return await self._update(fields)
        if action == "success":
            self.ends.append("success")
        elif action == "error":
            self.ends.append(f"error: {fields.get('message')}")
        elif action == "abort":
            self.ends.append(f"abort: {fields.get('reason')}")
        else:
            return _problem(404, "Not found")
        return Response(status_code=204)

    async def _update(self, fields: Any) -> Response:
        update = Update(
            kind=str(fields.get("payload[type]")),
            chunk=str(fields.get("payload[videoChunkFilename]")),
            chunk_bytes=await _read(fields.get("payload[videoChunkFile]")),
            playlist_name=fields.get("payload[resolutionPlaylistFilename]"),
            playlist=_text(await _read(fields.get("payload[resolutionPlaylistFile]"))),
            master=_text(await _read(fields.get("payload[masterPlaylistFile]"))),
            at=time.monotonic(),
        )
        answer = self.answer(update)
        self.updates.append((update, answer))
        if answer.delay_s:
            await asyncio.sleep(answer.delay_s)
        if answer.status != 204:
            return _problem(answer.status, answer.detail, answer.code)
        if not _SEGMENT.match(update.chunk) or update.kind not in ("add-chunk", "remove-chunk"):
            return _problem(400, "Payload is invalid")
        self._store(update)
        return Response(status_code=204)

    def _store(self, update: Update) -> None:
        """Received: what a player would see from now on must hold together."""
        if update.kind == "remove-chunk":
            if update.chunk not in self.received:
                self.problems.append(f"removal of {update.chunk}, never received")
            self.removed.append(update.chunk)
            return
        if update.chunk_bytes is None:
            self.problems.append(f"add-chunk {update.chunk} without its file")
            return
        if update.chunk in self.chunks:
            # A retry after a lost answer: harmless (PeerTube moves the file in place again) if the same.
            self.resent.append(update.chunk)
            if self.chunks[update.chunk] != update.chunk_bytes:
                self.problems.append(f"{update.chunk} sent again with other bytes")
        else:
            self.received[update.chunk] = time.monotonic()
            self.wall_received[update.chunk] = time.time()
        self.chunks[update.chunk] = update.chunk_bytes
        if update.playlist_name is not None and update.playlist is not None:
            self._check_playlist(update.playlist_name, update.playlist)
            self.playlists[update.playlist_name] = update.playlist
        if update.master is not None:
            self.masters_received += 1
            self.master = update.master
        if self.master is not None and update.master is not None:
            named = [line for line in self.master.splitlines() if line.endswith(".m3u8")]
            named += re.findall(r'URI="([^"]+)"', self.master)
            missing = [name for name in named if name not in self.playlists]
            if missing:
                self.problems.append(f"the master names {missing} before the server has them")

    def _check_playlist(self, name: str, text: str) -> None:
        if not _PLAYLIST.match(name):
            self.problems.append(f"playlist name {name!r}")
        playlist = MediaPlaylist.parse(text)
        if playlist.ended:
            self.problems.append(f"{name} sent with an end tag")
        not_received = [s.name for s in playlist.segments if s.name not in self.received]
        if not_received:
            self.problems.append(f"{name} lists {not_received}, not received")
        removed = [s.name for s in playlist.segments if s.name in self.removed]
        if removed:
            self.problems.append(f"{name} lists {removed}, removed before")
        if not playlist.segments:
            self.problems.append(f"{name} lists no segment")
            return
        firsts = self.first_sequences.setdefault(name, [])
        first = playlist.segments[0].sequence
        if firsts and first < firsts[-1]:
            self.problems.append(f"{name}: media sequence went back from {firsts[-1]} to {first}")
        firsts.append(first)
        known = self.names.setdefault(name, {})
        for segment in playlist.segments:
            if known.setdefault(segment.sequence, segment.name) != segment.name:
                self.problems.append(f"{name}: sequence {segment.sequence} named two segments")


def _problem(status: int, detail: str, code: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"status": status, "detail": detail, "error": detail}
    if code is not None:
        body["code"] = code
        body["type"] = f"https://docs.joinpeertube.org/api-rest-reference.html#section/Errors/{code}"
    return JSONResponse(body, status_code=status, media_type="application/problem+json")


def _is_form(request: Request) -> bool:
    content_type = request.headers.get("content-type", "")
    return content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded"))


async def _read(part: Any) -> bytes | None:
    if isinstance(part, UploadFile):
        return await part.read()
    return None


def _text(data: bytes | None) -> str | None:
    return data.decode() if data is not None else None


@asynccontextmanager
async def serving(server: LiveServer) -> AsyncIterator[LiveServer]:
    """`server` on a free loopback port (its `url` set) until the block ends."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    uvicorn_server = uvicorn.Server(
        uvicorn.Config(server.app(), log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
    )
    task = asyncio.create_task(uvicorn_server.serve(sockets=[sock]))
    while not uvicorn_server.started:
        if task.done():
            task.result()
            raise RuntimeError("the live server did not start")
        await asyncio.sleep(0.01)
    try:
        yield server
    finally:
        uvicorn_server.should_exit = True
        try:
            await asyncio.wait_for(task, 10)
        finally:
            sock.close()


class OpenRelay:
    """The relay's policy here: anyone publishes and plays any name under `live/`."""

    def __init__(self) -> None:
        self.publishing = asyncio.Event()

    async def authorize_publish(self, app: str, name: str, peer: str) -> PublishGrant | str:
        return PublishGrant(name)

    async def authorize_play(self, app: str, name: str, peer: str) -> PlayGrant | str:
        return PlayGrant(name, "runner")

    async def publish_started(self, stream: str) -> None:
        self.publishing.set()

    async def publish_ended(self, stream: str, cleanly: bool) -> None:
        self.publishing.clear()


@asynccontextmanager
async def rtmp_relay() -> AsyncIterator[tuple[RtmpRelay, OpenRelay]]:
    policy = OpenRelay()
    relay = RtmpRelay(policy, "127.0.0.1", 0)
    await relay.start()
    try:
        yield relay, policy
    finally:
        await relay.stop()
