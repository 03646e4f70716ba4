"""Live videos: stream keys, sessions, the live job, the runner's chunk updates, the end and the replay.

A live video is a `videos` row plus a `lives` row (stream key, settings, state). Its life:

    waiting ──publish──▶ live ──session ends──▶ ended        (permanent: back to waiting)

* **Publish.** A publisher connects to the RTMP server (`rtmp_relay`) with the stream key: a new session
  starts (its HLS files are reset) and, as soon as the stream's metadata tells its size and frame rate, a
  `live-rtmp-hls-transcoding` job is created (priority 0: before any VOD job). A wrong key is refused and
  logged.
* **Pull.** The accept answer's `input.rtmpUrl` names the job and a secret derived from its job token: only
  the runner holding this acceptance can play the stream, and a new acceptance makes the old URL useless
  (its players are disconnected).
* **Chunks.** `update` calls store segments and playlists (`live_files`, PeerTube's validation and order);
  viewers read the HLS at `/static/streaming-playlists/hls/<uuid>/master.m3u8` (playlists not cached,
  segments immutable).
* **A job ends while the publisher is still there** (its runner was lost: the 30 s live lease expired; it
  errored; its input broke): another job is created at once and the session goes on; the next runner
  starts from the relay's last keyframe and the playlists continue after a discontinuity, so players keep
  playing. After 5 failed jobs in a row with no segment between them the live ends with an error. An admin
  cancelling the job, or deleting it or the video, ends the live (the publisher is disconnected).
* **The publisher leaves.** The runner's ffmpeg sees the end of its input, delivers the last segments and
  sends `success`; then the session ends (playlists get their end tag). A publisher that closed its stream
  cleanly ends the session as soon as the job is done; one that dropped (or was cut by a coordinator
  restart) has `live_reconnect_grace_s` to come back into the same session. A runner that does not finish
  within twice the segment duration plus 10 s after that has its job cancelled.
* **Restart of the coordinator.** Sessions open in the database are taken up again as if their publisher
  had dropped: a publisher reconnecting within the grace continues the same session (new job, continuous
  playlists), else the session ends. PeerTube cancels every live at its start instead.
* **Replay.** With save-replay, what the publisher sent is recorded (`live_files.FlvRecorder`); when the
  session ends the recording becomes a new video (remuxed to MP4) with the usual VOD jobs.

The RTMP server runs in the process that has `rtmp_port`; runner updates may reach any process sharing the
data folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import time
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import RowMapping

from tuberunner.coordinator import rtmp_wire as wire
from tuberunner.coordinator.bodies import UploadedFile
from tuberunner.coordinator.job_graph import GraphOptions, build_job_graph
from tuberunner.coordinator.live_files import (
    MASTER_NAME,
    PLAYLIST_NAME,
    SEGMENT_NAME,
    LiveFiles,
    LiveSessionEnded,
    LiveUpdate,
    LiveUpdateRefused,
)
from tuberunner.coordinator.models import Job, JobSpec
from tuberunner.coordinator.problems import BadRequest
from tuberunner.coordinator.rtmp_relay import PlayGrant, PublishGrant, RtmpRelay
from tuberunner.coordinator.schema import lives, videos
from tuberunner.coordinator.storage import StorageError, video_key, video_prefix
from tuberunner.media.binaries import find_ffmpeg
from tuberunner.media.errors import MediaError
from tuberunner.media.probe import probe
from tuberunner.media.process import run_ffmpeg
from tuberunner.media.profiles import compute_output_fps, to_even
from tuberunner.protocol.errors import ErrorCode, Message
from tuberunner.protocol.jobs import JobState, JobType

if TYPE_CHECKING:
    from tuberunner.coordinator.config import CoordinatorConfig
    from tuberunner.coordinator.database import Database
    from tuberunner.coordinator.jobs import JobService
    from tuberunner.coordinator.storage import Storage
    from tuberunner.coordinator.videos import VideoStore

log = logging.getLogger(__name__)

RTMP_APP: Final = "live"
PRIORITY_LIVE: Final = 0
SESSION_ENDED: Final = "Session of this live ended"
LIVE_STATES: Final = ("waiting", "live", "ended")
# Consecutive jobs of one session that may end without delivering a segment before the live gives up.
_MAX_FAILED_JOBS: Final = 5
_CHECK_INTERVAL_S: Final = 0.5
# How long a session waits for the stream's metadata before creating its job with defaults.
_METADATA_WAIT_S: Final = 2.0
_DEFAULT_FPS: Final = 30.0
_PULL_NAME: Final = re.compile(
    r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})-([0-9a-f]{32})$"
)
_REMUX_TIMEOUT_S: Final = 600.0
# Live lag buckets (seconds), for /metrics.
LAG_BUCKETS: Final = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 20.0)


@dataclass(frozen=True)
class Live:
    id: int
    video_id: int
    video_uuid: str
    name: str
    stream_key: str
    state: str
    permanent: bool
    save_replay: bool
    resolutions: tuple[int, ...]
    session: int
    attempts: int
    job_uuid: str | None
    replays: tuple[str, ...]
    error: str | None
    started_at: float | None
    ended_at: float | None

    @classmethod
    def from_row(cls, row: RowMapping) -> Live:
        return cls(
            id=row["id"],
            video_id=row["video_id"],
            video_uuid=row["uuid"],
            name=row["name"],
            stream_key=row["stream_key"],
            state=row["state"],
            permanent=bool(row["permanent"]),
            save_replay=bool(row["save_replay"]),
            resolutions=tuple(int(r) for r in row["resolutions"]),
            session=row["session"],
            attempts=row["attempts"],
            job_uuid=row["job_uuid"],
            replays=tuple(row["replays"] or ()),
            error=row["error"],
            started_at=row["started_at"],
            ended_at=row["ended_at"],
        )


@dataclass
class _Session:
    """An open session as this process follows it."""

    video_uuid: str
    number: int
    publisher: bool = True
    # When the publisher left (monotonic), and whether it said goodbye (deleteStream) or dropped.
    left_at: float | None = None
    left_cleanly: bool = False
    connected_at: float = field(default_factory=time.monotonic)
    failed_jobs: int = 0
    # The last job counted in `failed_jobs`: a failed job stays the session's job until a new one is made
    # (or the grace runs out), and every check sees it again.
    counted_failure: str | None = None
    creating: bool = False
    # The job of this session, once one was created (its row gone means an admin deleted it).
    job_uuid: str | None = None


@dataclass
class LiveCounters:
    sessions_started: int = 0
    sessions_ended: int = 0
    jobs_created: int = 0
    segments_received: int = 0
    updates_refused: int = 0
    replays_created: int = 0
    lag_buckets: list[int] = field(default_factory=lambda: [0] * (len(LAG_BUCKETS) + 1))
    lag_sum_s: float = 0.0
    lag_count: int = 0
    last_lag_s: dict[str, float] = field(default_factory=dict)

    def observe_lag(self, video_uuid: str, lag_s: float) -> None:
        self.last_lag_s[video_uuid] = lag_s
        self.lag_sum_s += lag_s
        self.lag_count += 1
        for index, bound in enumerate(LAG_BUCKETS):
            if lag_s <= bound:
                self.lag_buckets[index] += 1
                return
        self.lag_buckets[-1] += 1


def pull_secret(job_token: str) -> str:
    """The per-acceptance secret of a pull URL: derived from the job token (a new acceptance, a new
    token, a new secret), and no way back to the token from it."""
    return hashlib.sha256(b"tuberunner-live-pull\0" + job_token.encode()).hexdigest()[:32]


def host_of(url: str) -> str:
    host = urlsplit(url).hostname or "127.0.0.1"
    return f"[{host}]" if ":" in host else host


class LiveService:
    def __init__(
        self,
        db: Database,
        config: CoordinatorConfig,
        jobs_service: JobService,
        video_store: VideoStore,
        storage: Storage,
        files: LiveFiles,
    ) -> None:
        self.db = db
        self.config = config
        self.jobs = jobs_service
        self.videos = video_store
        self.storage = storage
        self.files = files
        self.counters = LiveCounters()
        self.relay: RtmpRelay | None = None
        if config.rtmp_port != 0:
            self.relay = RtmpRelay(self, config.rtmp_host, config.rtmp_port or 0)
        self.sessions: dict[str, _Session] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._replays: set[asyncio.Task[None]] = set()

    @property
    def enabled(self) -> bool:
        return self.relay is not None

    # ---------------------------------------------------------------- lifetime

    async def start(self) -> None:
        now = time.monotonic()
        for live in await self._lives(lives.c.state == "live"):
            # The last process died with the publisher's connection: as if it had dropped.
            self.sessions[live.video_uuid] = _Session(
                live.video_uuid, live.session, publisher=False, left_at=now, job_uuid=live.job_uuid
            )
            log.warning(
                "live %s was streaming when the coordinator stopped; waiting for its publisher",
                live.video_uuid,
            )
        if self.relay is not None:
            await self.relay.start()
        self._task = asyncio.create_task(self._watch(), name="live-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.relay is not None:
            await self.relay.stop()
        for task in list(self._replays):
            task.cancel()
        await asyncio.gather(*self._replays, return_exceptions=True)

    def poke(self) -> None:
        self._wakeup.set()

    # ---------------------------------------------------------------- creation and reads

    async def create(
        self, name: str, resolutions: tuple[int, ...] | None, *, save_replay: bool, permanent: bool
    ) -> Live:
        now = time.time()
        video_uuid = str(uuidlib.uuid4())
        async with self.db.write() as conn:
            inserted = await conn.execute(
                insert(videos).values(
                    uuid=video_uuid,
                    name=name,
                    state="live",
                    options={"live": True},
                    source=None,
                    error=None,
                    created_at=now,
                    updated_at=now,
                )
            )
            key = inserted.inserted_primary_key
            assert key is not None
            await conn.execute(
                insert(lives).values(
                    video_id=int(key[0]),
                    stream_key=str(uuidlib.uuid4()),
                    state="waiting",
                    permanent=permanent,
                    save_replay=save_replay,
                    resolutions=list(resolutions or self.config.live_resolutions),
                    session=0,
                    attempts=0,
                    replays=[],
                    created_at=now,
                    updated_at=now,
                )
            )
        created = await self.by_video_uuid(video_uuid)
        assert created is not None
        log.info("live %s (%s) created", video_uuid, name)
        return created

    async def by_video_uuid(self, video_uuid: str) -> Live | None:
        found = await self._lives(videos.c.uuid == video_uuid)
        return found[0] if found else None

    async def of_videos(self, video_ids: list[int]) -> dict[int, Live]:
        if not video_ids:
            return {}
        return {live.video_id: live for live in await self._lives(lives.c.video_id.in_(video_ids))}

    async def _lives(self, *where: Any) -> list[Live]:
        statement = (
            select(lives, videos.c.uuid, videos.c.name)
            .join(videos, videos.c.id == lives.c.video_id)
            .where(*where)
        )
        async with self.db.read() as conn:
            rows = (await conn.execute(statement)).mappings().all()
        return [Live.from_row(row) for row in rows]

    def rtmp_base_url(self, request_base_url: str | None) -> str:
        """`rtmp://host:port/live`: the host runners and publishers reached us at, unless configured."""
        host = self.config.rtmp_public_host
        if host is None:
            source = self.config.public_url or request_base_url
            host = host_of(source) if source else self.config.rtmp_host
        port = self.relay.port if self.relay is not None else self.config.rtmp_port
        return f"rtmp://{host}:{port}/{RTMP_APP}"

    def describe(self, live: Live, base_url: str) -> dict[str, Any]:
        """The `live` part of a video's JSON (admin API: the stream key is in it)."""
        session = self.sessions.get(live.video_uuid)
        relay = self.relay
        return {
            "state": live.state,
            "rtmpUrl": self.rtmp_base_url(base_url),
            "streamKey": live.stream_key,
            "permanentLive": live.permanent,
            "saveReplay": live.save_replay,
            "resolutions": list(live.resolutions),
            "hlsUrl": f"{base_url}/static/streaming-playlists/hls/{live.video_uuid}/{MASTER_NAME}",
            "session": live.session,
            "jobUuid": live.job_uuid,
            "publisherConnected": bool(relay and relay.is_publishing(live.video_uuid)),
            "viewersPulling": relay.players_of(live.video_uuid) if relay else 0,
            "lagSeconds": self.counters.last_lag_s.get(live.video_uuid) if session else None,
            "replays": list(live.replays),
            "error": live.error,
            "startedAt": live.started_at,
            "endedAt": live.ended_at,
        }

    # ---------------------------------------------------------------- RTMP policy

    async def authorize_publish(self, app: str, name: str, peer: str) -> PublishGrant | str:
        key = name.partition("?")[0]
        found = await self._lives(lives.c.stream_key == key) if app == RTMP_APP and key else []
        if not found:
            log.warning("RTMP publish refused from %s: unknown stream key (app %r)", peer, app[:40])
            return "unknown stream key"
        live = found[0]
        if live.state == "ended":
            log.warning("RTMP publish refused from %s: live %s has ended", peer, live.video_uuid)
            return "this live has ended"
        session = live.session if live.state == "live" else live.session + 1
        recorder = self.files.recorder(live.video_uuid, session) if live.save_replay else None
        return PublishGrant(live.video_uuid, recorder)

    async def publish_started(self, stream: str) -> None:
        live = await self.by_video_uuid(stream)
        if live is None:
            return
        current = self.sessions.get(stream)
        if live.state == "live" and current is not None and current.number == live.session:
            current.publisher, current.left_at, current.connected_at = True, None, time.monotonic()
            log.info("live %s: publisher back in session %d", stream, live.session)
            self.poke()
            return
        number = live.session + 1
        self.files.begin_session(
            stream, number, self.config.live_segment_list_size, self.config.live_segment_duration_s
        )
        now = time.time()
        async with self.db.write() as conn:
            await conn.execute(
                update(lives)
                .where(lives.c.id == live.id)
                .values(
                    state="live", session=number, started_at=now, ended_at=None, error=None, updated_at=now
                )
            )
        self.sessions[stream] = _Session(stream, number)
        self.counters.sessions_started += 1
        log.info("live %s: session %d started", stream, number)
        self.poke()

    async def publish_ended(self, stream: str, cleanly: bool) -> None:
        session = self.sessions.get(stream)
        if session is not None:
            session.publisher, session.left_at, session.left_cleanly = False, time.monotonic(), cleanly
            log.info("live %s: publisher %s", stream, "ended its stream" if cleanly else "disconnected")
        self.poke()

    async def authorize_play(self, app: str, name: str, peer: str) -> PlayGrant | str:
        match = _PULL_NAME.match(name) if app == RTMP_APP else None
        job = await self.jobs.get(match.group(1)) if match else None
        if (
            match is None
            or job is None
            or job.type != JobType.LIVE_RTMP_HLS
            or job.state != JobState.PROCESSING
            or job.processing_job_token is None
            or not hmac.compare_digest(match.group(2), pull_secret(job.processing_job_token))
        ):
            return "not the pull URL of a job this runner holds"
        return PlayGrant(str(job.private_payload["videoUUID"]), match.group(2))

    # ---------------------------------------------------------------- runner side

    def pull_url(self, job: Job, request_base_url: str) -> str:
        assert job.processing_job_token is not None
        return f"{self.rtmp_base_url(request_base_url)}/{job.uuid}-{pull_secret(job.processing_job_token)}"

    async def update(self, job: Job, fields: Mapping[str, Any], files: Mapping[str, UploadedFile]) -> bool:
        """A live `update` (spec §7.4): checked, then applied unless the job is already past processing.
        True when it was applied (the caller renews the lease).

        An update with no payload and no file is a heartbeat: refused by PeerTube, taken here from runners
        that know this coordinator pushes take-backs (ours), which renew a live's lease with it before its
        first segment and ask with it whether a stuck live is still theirs."""
        payload = fields.get("payload")
        # Nothing named payload at all (an urlencoded `payload[type]` stays a flat key, as on PeerTube).
        heartbeat = (
            payload in (None, {}, "") and not files and not any(k.startswith("payload") for k in fields)
        )
        checked = None if heartbeat else _checked_update(payload, files)
        if job.state != JobState.PROCESSING:
            return False
        video_uuid = str(job.private_payload.get("videoUUID"))
        live = await self.by_video_uuid(video_uuid)
        if (
            live is None
            or live.state != "live"
            or str(live.session) != str(job.private_payload.get("sessionId"))
        ):
            raise BadRequest(SESSION_ENDED, code=ErrorCode.JOB_NOT_IN_PROCESSING_STATE)
        if checked is None:
            return True
        attempt = int(job.private_payload.get("attempt", 0))
        try:
            published = self.files.apply(video_uuid, attempt, checked)
        except LiveSessionEnded:
            raise BadRequest(SESSION_ENDED, code=ErrorCode.JOB_NOT_IN_PROCESSING_STATE) from None
        except LiveUpdateRefused as exc:
            self.counters.updates_refused += 1
            raise BadRequest(f"{Message.PAYLOAD_INVALID}: {exc}") from None
        if published:
            self.counters.segments_received += len(published)
            session = self.sessions.get(video_uuid)
            if session is not None:
                session.failed_jobs = 0
            now = time.time()
            for item in published:
                lag = _lag_s(item.segment.date, item.segment.duration_s, now)
                if lag is not None:
                    self.counters.observe_lag(video_uuid, lag)
        return True

    # ---------------------------------------------------------------- the watch loop

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), _CHECK_INTERVAL_S)
            self._wakeup.clear()
            for video_uuid in list(self.sessions):
                try:
                    await self._check(video_uuid)
                except Exception:
                    log.exception("live %s: check failed; trying again", video_uuid)

    async def _check(self, video_uuid: str) -> None:
        session = self.sessions[video_uuid]
        live = await self.by_video_uuid(video_uuid)
        if live is None or live.state != "live" or live.session != session.number:
            # Deleted, or ended by another process: nothing of it may go on here.
            self.sessions.pop(video_uuid, None)
            if self.relay is not None:
                self.relay.end_stream(video_uuid)
            return
        job = await self.jobs.get(session.job_uuid) if session.job_uuid else None
        now = time.monotonic()
        gone_for = now - session.left_at if session.left_at is not None else None
        over = gone_for is not None and (
            session.left_cleanly or gone_for >= self.config.live_reconnect_grace_s
        )
        if job is None:
            if session.job_uuid is not None:
                await self._end(live, session, "the live job was deleted")
            elif over:
                await self._end(live, session, None)
            elif session.publisher and not session.creating and self._metadata_ready(session, now):
                await self._new_job(live, session)
            return
        if job.state == JobState.CANCELLED:
            await self._end(live, session, "the live job was cancelled")
        elif job.state.is_final:
            if job.state != JobState.COMPLETED and session.counted_failure != job.uuid:
                session.failed_jobs += 1
                session.counted_failure = job.uuid
            if session.failed_jobs >= _MAX_FAILED_JOBS:
                await self._end(
                    live, session, f"{session.failed_jobs} live jobs in a row failed: {job.error}"
                )
            elif session.publisher:
                log.warning(
                    "live %s: job %s ended (%s) while streaming; a new job takes over",
                    video_uuid,
                    job.uuid,
                    job.state.label,
                )
                await self._new_job(live, session)
            elif over:
                await self._end(live, session, None)
        elif job.state == JobState.PENDING and over:
            await self._end(live, session, None)
        elif job.state == JobState.PROCESSING:
            if self.relay is not None and job.processing_job_token is not None:
                dropped = self.relay.drop_players(video_uuid, pull_secret(job.processing_job_token))
                if dropped:
                    log.info("live %s: %d pull(s) of an earlier acceptance disconnected", video_uuid, dropped)
            deadline = self.config.live_reconnect_grace_s + 2 * self.config.live_segment_duration_s + 10
            if over and gone_for is not None and gone_for > deadline:
                await self._end(live, session, "the runner did not deliver the end of the live in time")

    def _metadata_ready(self, session: _Session, now: float) -> bool:
        if self.relay is None:
            return False
        stream = self.relay.streams.get(session.video_uuid)
        return stream is not None and (
            stream.metadata is not None or now - session.connected_at >= _METADATA_WAIT_S
        )

    async def _new_job(self, live: Live, session: _Session) -> None:
        session.creating = True
        try:
            attempt = live.attempts + 1
            job_uuid = str(uuidlib.uuid4())
            to_transcode = self._renditions(live)
            payload = {
                "input": {"rtmpUrl": f"{self.rtmp_base_url(None)}/{job_uuid}"},
                "output": {
                    "toTranscode": to_transcode,
                    "segmentDuration": _number(self.config.live_segment_duration_s),
                    "segmentListSize": self.config.live_segment_list_size,
                },
            }
            private = {
                "videoUUID": live.video_uuid,
                "masterPlaylistName": MASTER_NAME,
                "outputDirectory": "live",
                "sessionId": str(session.number),
                "attempt": attempt,
            }
            spec = JobSpec(job_uuid, JobType.LIVE_RTMP_HLS, PRIORITY_LIVE, payload, private)
            await self.jobs.create(live.video_id, [spec])
            async with self.db.write() as conn:
                await conn.execute(
                    update(lives)
                    .where(lives.c.id == live.id)
                    .values(attempts=attempt, job_uuid=job_uuid, updated_at=time.time())
                )
            session.job_uuid = job_uuid
            self.counters.jobs_created += 1
            log.info(
                "live %s: job %s created (session %d, renditions %s)",
                live.video_uuid,
                job_uuid,
                session.number,
                ", ".join(f"{r['resolution']}p{r['fps']}" for r in to_transcode),
            )
        finally:
            session.creating = False

    def _renditions(self, live: Live) -> list[dict[str, int]]:
        """PeerTube's `toTranscode`: the asked resolutions up to the input's, or the input's own when none
        fits; frame rates as PeerTube computes them for live."""
        height, fps = 0, _DEFAULT_FPS
        stream = self.relay.streams.get(live.video_uuid) if self.relay is not None else None
        if stream is not None and stream.metadata is not None:
            height, fps = _size_and_fps(stream.metadata)
        resolutions = [r for r in live.resolutions if height == 0 or r <= height]
        if not resolutions:
            resolutions = [to_even(height)]
        return [
            {"resolution": r, "fps": compute_output_fps(fps, r, r == height, 60)}
            for r in sorted(set(resolutions), reverse=True)
        ]

    async def _end(self, live: Live, session: _Session, error: str | None) -> None:
        video_uuid = live.video_uuid
        self.sessions.pop(video_uuid, None)
        self.files.finish(video_uuid)
        state = "waiting" if live.permanent else "ended"
        now = time.time()
        async with self.db.write() as conn:
            await conn.execute(
                update(lives)
                .where(lives.c.id == live.id, lives.c.session == session.number)
                .values(state=state, ended_at=now, error=error, updated_at=now)
            )
        job = await self.jobs.get(session.job_uuid) if session.job_uuid else None
        if job is not None and not job.state.is_final and job.state != JobState.COMPLETING:
            with contextlib.suppress(BadRequest):
                await self.jobs.cancel(job)
        if self.relay is not None:
            self.relay.end_stream(video_uuid)
        self.counters.sessions_ended += 1
        self.counters.last_lag_s.pop(video_uuid, None)
        if error:
            log.warning("live %s: session %d ended: %s", video_uuid, session.number, error)
        else:
            log.info("live %s: session %d ended", video_uuid, session.number)
        if live.save_replay:
            task = asyncio.create_task(self._save_replay(live, session.number), name=f"replay-{video_uuid}")
            self._replays.add(task)
            task.add_done_callback(self._replays.discard)

    async def wait_replays(self) -> None:
        while self._replays:
            await asyncio.gather(*self._replays, return_exceptions=True)

    # ---------------------------------------------------------------- replay

    async def _save_replay(self, live: Live, session: int) -> None:
        recordings = self.files.recordings(live.video_uuid, session)
        if not recordings:
            log.warning("live %s: session %d left no recording; no replay", live.video_uuid, session)
            return
        replay_uuid = str(uuidlib.uuid4())
        work = self.files.replay_folder(live.video_uuid)
        source = work / f"{replay_uuid}.mp4"
        video_id: int | None = None
        try:
            await _remux(recordings, source)
            info = await probe(source)
            options = GraphOptions(resolutions=tuple(sorted(set(live.resolutions), reverse=True)))
            specs = build_job_graph(replay_uuid, info, options)
            stored = await self.storage.put_file(video_key(replay_uuid, "source.mp4"), source)
            now = time.time()
            name = f"{live.name} (replay {datetime.now().strftime('%Y-%m-%d %H:%M')})"[:255]
            async with self.db.write() as conn:
                inserted = await conn.execute(
                    insert(videos).values(
                        uuid=replay_uuid,
                        name=name,
                        state="processing",
                        options={"resolutions": list(options.resolutions), "replayOf": live.video_uuid},
                        source={
                            "filename": "source.mp4",
                            "size": info.size_bytes,
                            "durationS": info.duration_s,
                        },
                        error=None,
                        created_at=now,
                        updated_at=now,
                    )
                )
                key = inserted.inserted_primary_key
                assert key is not None
                video_id = int(key[0])
            await self.videos.put_file(
                video_id,
                "source",
                "source.mp4",
                stored,
                resolution=info.video.short_side if info.video else None,
                fps=round(info.video.fps) if info.video else None,
            )
            await self.jobs.create(video_id, specs)
            async with self.db.write() as conn:
                await conn.execute(
                    update(lives)
                    .where(lives.c.id == live.id)
                    .values(replays=[*live.replays, replay_uuid], updated_at=time.time())
                )
        except (MediaError, StorageError, ValueError, OSError) as exc:
            log.error(
                "live %s: the replay of session %d could not be made: %s", live.video_uuid, session, exc
            )
            if video_id is not None:
                async with self.db.write() as conn:
                    await conn.execute(delete(videos).where(videos.c.id == video_id))
            with contextlib.suppress(StorageError):
                await self.storage.delete_prefix(video_prefix(replay_uuid))
            return
        finally:
            source.unlink(missing_ok=True)
        self.files.drop_recordings(live.video_uuid, session)
        self.counters.replays_created += 1
        log.info(
            "live %s: replay of session %d is video %s (%d jobs)",
            live.video_uuid,
            session,
            replay_uuid,
            len(specs),
        )

    # ---------------------------------------------------------------- metrics

    async def count_by_state(self) -> dict[str, int]:
        from sqlalchemy import func

        async with self.db.read() as conn:
            rows = (await conn.execute(select(lives.c.state, func.count()).group_by(lives.c.state))).all()
        return {str(state): int(count) for state, count in rows}


async def _remux(recordings: list[Path], dest: Path) -> None:
    """The publisher's FLV recording(s), one after the other, into one MP4 (no re-encoding)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = ["-hide_banner", "-nostdin", "-y", "-loglevel", "error"]
    if len(recordings) == 1:
        inputs = ["-i", str(recordings[0])]
    else:
        listing = dest.with_name("recordings.txt")
        listing.write_text("".join(f"file '{p.as_posix()}'\n" for p in recordings))
        inputs = ["-f", "concat", "-safe", "0", "-i", str(listing)]
    try:
        await run_ffmpeg(
            find_ffmpeg(),
            [
                *prefix,
                *inputs,
                "-map",
                "0:v?",
                "-map",
                "0:a?",
                "-c",
                "copy",
                "-movflags",
                "+faststart",
                str(dest),
            ],
            duration_s=None,
            max_duration_s=_REMUX_TIMEOUT_S,
        )
    finally:
        dest.with_name("recordings.txt").unlink(missing_ok=True)


def _checked_update(payload: Any, files: Mapping[str, UploadedFile]) -> LiveUpdate:
    """PeerTube's `isRunnerJobLiveRTMPHLSUpdatePayloadValid`, and nothing else: 400 `Payload is invalid`."""
    if not isinstance(payload, dict):
        raise BadRequest(Message.PAYLOAD_INVALID)
    kind = payload.get("type")
    chunk_name = payload.get("videoChunkFilename")
    playlist_name = payload.get("resolutionPlaylistFilename")
    chunk = files.get("payload[videoChunkFile]")
    playlist = files.get("payload[resolutionPlaylistFile]")
    master = files.get("payload[masterPlaylistFile]")
    valid = (
        kind in ("add-chunk", "remove-chunk")
        and isinstance(chunk_name, str)
        and bool(SEGMENT_NAME.match(chunk_name))
        and (kind == "remove-chunk" or chunk is not None)
        and (playlist_name is None or playlist is not None)
        and (
            playlist is None or (isinstance(playlist_name, str) and bool(PLAYLIST_NAME.match(playlist_name)))
        )
    )
    if not valid:
        raise BadRequest(Message.PAYLOAD_INVALID)
    return LiveUpdate(
        type=str(kind),
        chunk_name=str(chunk_name),
        chunk_file=chunk.path if chunk is not None and kind == "add-chunk" else None,
        playlist_name=str(playlist_name) if playlist is not None else None,
        playlist_file=playlist.path if playlist is not None else None,
        master_file=master.path if master is not None else None,
    )


def _size_and_fps(metadata: bytes) -> tuple[int, float]:
    """The short side and frame rate an onMetaData announces (0 / 30 when it does not say)."""
    try:
        values = wire.amf0_decode(metadata)
    except wire.RtmpError:
        return 0, _DEFAULT_FPS
    info = values[1] if len(values) > 1 and isinstance(values[1], dict) else {}

    def number(*keys: str) -> float:
        for key in keys:
            value = info.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
                return float(value)
        return 0.0

    width, height = number("width"), number("height")
    fps = number("framerate", "videoframerate", "fps") or _DEFAULT_FPS
    short = int(min(width, height)) if width and height else int(height)
    return short, fps


def _lag_s(date: str | None, duration_s: float, now: float) -> float | None:
    """Wall clock now minus the wall-clock end of a segment as its runner stamped it."""
    if not date:
        return None
    try:
        start = datetime.fromisoformat(date.replace("Z", "+00:00"))
    except ValueError:
        return None
    if start.tzinfo is None:
        return None
    return max(0.0, now - (start.timestamp() + duration_s))


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value
