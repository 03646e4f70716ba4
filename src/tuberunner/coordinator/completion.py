"""What happens to a job's result files once its `success` is accepted (type by type).

    vod-web-video-transcoding    videoFile → <uuid>-<res>.mp4                          kind web-video
    vod-audio-merge-transcoding  (the same)
    vod-hls-transcoding          videoFile → <uuid>-<res>-fragmented.mp4              kind hls-video
                                 resolutionPlaylistFile → <uuid>-<res>.m3u8 (URIs rewritten)  hls-playlist
                                 then master.m3u8 is rebuilt                           kind hls-master
    video-transcription          vttFile → <uuid>-<lang>.vtt                          kind caption
    generate-video-storyboard    storyboardFile → <uuid>-storyboard.jpg               kind storyboard
    video-studio-transcoding     videoFile → the new source of the video              kind source
                                 (old outputs and task files removed; the edited video's jobs created)

Every result is checked before it is kept: media files are probed (a file that is not the media its job
promised raises, and the job becomes errored with the reason), playlists and captions are parsed.

Every handler is idempotent: after a crash it runs again from the start on the same stored result. Each
file is validated first (media are probed on a local copy: `Storage.local_file`), then moved in storage,
so a re-run either finds the result file still under its result key or finds it already at its
destination, and recording a row replaces any row of the same kind and name. A storage that cannot be
reached raises StorageUnavailable out of here: the job stays completing and is completed again later.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Final

from sqlalchemy import delete, insert, select

from tuberunner.coordinator.config import CoordinatorConfig
from tuberunner.coordinator.job_graph import GraphOptions, build_job_graph, graph_options_from_json
from tuberunner.coordinator.models import Job, JobResult
from tuberunner.coordinator.schema import jobs, video_files
from tuberunner.coordinator.storage import Storage, StorageError, StoredObject, check_key, video_key
from tuberunner.coordinator.video_outputs import (
    MASTER_PLAYLIST_NAME,
    MAX_PLAYLIST_BYTES,
    Rendition,
    build_master_playlist,
    caption_name,
    hls_playlist_name,
    hls_video_name,
    playlist_bandwidth,
    rewrite_media_playlist,
    storyboard_name,
    web_video_name,
)
from tuberunner.coordinator.videos import Video, VideoFile, VideoStore
from tuberunner.media.probe import MediaInfo, hls_codecs_string, probe
from tuberunner.protocol.jobs import JobState, JobType

log = logging.getLogger(__name__)

_MAX_CAPTION_BYTES: Final = 32 * 1024 * 1024
# ISO 639-1/-3 with optional subtags (`pt-BR`); anything else (PeerTube's `toto`) names no language.
_LANGUAGE = re.compile(r"^[a-z]{2,3}(?:-[A-Za-z0-9]{2,8})*$")
UNKNOWN_LANGUAGE: Final = "und"
# What a studio edit makes obsolete: everything derived from the old content, and the edit's own files.
_REPLACED_BY_STUDIO: Final = frozenset(
    {"web-video", "hls-video", "hls-playlist", "hls-master", "storyboard", "caption", "task-file"}
)
# Only for options a video's record lacks (every upload records them all).
_DEFAULT_GRAPH_OPTIONS: Final = GraphOptions(resolutions=CoordinatorConfig.resolutions)

_Handler = Callable[[Job, JobResult, Video], Awaitable[None]]


class ResultError(ValueError):
    """A result that cannot be kept: missing, or not what its job type promised."""


class VideoCompleter:
    def __init__(self, videos: VideoStore, storage: Storage) -> None:
        self.videos = videos
        self.storage = storage
        self._locks: weakref.WeakValueDictionary[int, asyncio.Lock] = weakref.WeakValueDictionary()
        self._handlers: dict[JobType, _Handler] = {
            JobType.VOD_WEB_VIDEO: self._web_video,
            JobType.VOD_AUDIO_MERGE: self._web_video,
            JobType.VOD_HLS: self._hls,
            JobType.TRANSCRIPTION: self._caption,
            JobType.STORYBOARD: self._storyboard,
            JobType.STUDIO: self._studio,
            JobType.LIVE_RTMP_HLS: self._nothing,
        }

    async def __call__(self, job: Job, result: JobResult) -> None:
        video = await self._video_of(job)
        await self._handlers[job.type](job, result, video)
        log.info("job %s completed (%s) for video %s", job.uuid, job.type, video.uuid)

    # ---------------------------------------------------------------- per type

    async def _web_video(self, job: Job, result: JobResult, video: Video) -> None:
        resolution = int(job.payload["output"]["resolution"])
        name = web_video_name(video.uuid, resolution)
        info, stored = await self._take_media(
            job, result, "videoFile", video_key(video.uuid, name), need_video=True
        )
        assert info.video is not None
        if info.video.short_side != resolution and job.type == JobType.VOD_WEB_VIDEO:
            log.warning("job %s asked for %dp and got %dp", job.uuid, resolution, info.video.short_side)
        await self.videos.put_file(
            video.id,
            "web-video",
            name,
            stored,
            resolution=info.video.short_side,
            fps=round(info.video.fps),
            extra=_media_extra(info),
        )

    async def _hls(self, job: Job, result: JobResult, video: Video) -> None:
        resolution = int(job.payload["output"]["resolution"])
        storage = self.storage
        video_name = hls_video_name(video.uuid, resolution)
        playlist_name = hls_playlist_name(video.uuid, resolution)
        playlist_dest = video_key(video.uuid, playlist_name)
        # The playlist is checked before anything moves; it is written after its media file.
        playlist_src = self._result_key(job, result, "resolutionPlaylistFile")
        from_result = await storage.exists(playlist_src)
        if from_result:
            text = await _read_text(storage, playlist_src, MAX_PLAYLIST_BYTES)
            playlist = rewrite_media_playlist(text, video_name)
        elif await storage.exists(playlist_dest):
            playlist = await _read_text(storage, playlist_dest, MAX_PLAYLIST_BYTES)
        else:
            raise ResultError(f"result file resolutionPlaylistFile of job {job.uuid} is missing")

        info, stored_video = await self._take_media(
            job,
            result,
            "videoFile",
            video_key(video.uuid, video_name),
            need_video=resolution > 0,
            need_audio=resolution == 0,
        )
        if from_result:
            stored_playlist = await storage.put_bytes(playlist_dest, playlist.encode())
            await storage.delete(playlist_src)
        else:
            stored_playlist = await storage.stat(playlist_dest)

        measured = playlist_bandwidth(playlist)
        fallback = info.bit_rate or (info.video.bit_rate if info.video else None) or 0
        peak, average = measured if measured else (fallback, fallback)
        rendition = Rendition(
            resolution=resolution,
            playlist=playlist_name,
            width=info.video.display_width if info.video and resolution > 0 else 0,
            height=info.video.display_height if info.video and resolution > 0 else 0,
            fps=info.video.fps if info.video and resolution > 0 else 0.0,
            codecs=hls_codecs_string(info),
            bandwidth=peak,
            average_bandwidth=average,
        )
        await self.videos.put_file(
            video.id,
            "hls-video",
            video_name,
            stored_video,
            resolution=resolution,
            fps=round(rendition.fps),
            extra=rendition.as_extra(),
        )
        await self.videos.put_file(
            video.id, "hls-playlist", playlist_name, stored_playlist, resolution=resolution
        )
        async with self._lock(video.id):
            await self._rebuild_master(video)
            if job.private_payload.get("deleteWebVideoFiles"):
                await self._drop_web_videos_when_hls_is_done(job, video)

    async def _caption(self, job: Job, result: JobResult, video: Video) -> None:
        language = _language(result.fields.get("inputLanguage"), job.private_payload.get("language"))
        name = caption_name(video.uuid, language)
        dest = video_key(video.uuid, name)
        src = self._result_key(job, result, "vttFile")
        source = await self._source_of(job, "vttFile", src, dest)
        text = await _read_text(self.storage, source, _MAX_CAPTION_BYTES)
        if not text.lstrip("\ufeff").startswith("WEBVTT"):
            raise ResultError("the caption file is not WebVTT (no WEBVTT header)")
        stored = await self.storage.move(src, dest) if source == src else await self.storage.stat(dest)
        await self.videos.put_file(video.id, "caption", name, stored, extra={"language": language})

    async def _storyboard(self, job: Job, result: JobResult, video: Video) -> None:
        name = storyboard_name(video.uuid)
        info, stored = await self._take_media(
            job, result, "storyboardFile", video_key(video.uuid, name), need_video=True
        )
        assert info.video is not None
        await self.videos.put_file(
            video.id,
            "storyboard",
            name,
            stored,
            extra={
                "sprites": job.payload.get("sprites"),
                "width": info.video.width,
                "height": info.video.height,
            },
        )

    async def _studio(self, job: Job, result: JobResult, video: Video) -> None:
        """The edited video becomes the source (PeerTube's `onVideoStudioEnded`): what the old content made
        (web videos, HLS, storyboard, captions) and the task files go, and the video's job graph is built
        anew from the edited file, its root a child of this job (released when this job completes)."""
        name = f"source-studio-{job.uuid}.mp4"
        info, stored = await self._take_media(
            job, result, "videoFile", video_key(video.uuid, name), need_video=True
        )
        await self.videos.put_file(
            video.id,
            "source",
            name,
            stored,
            resolution=info.video.short_side if info.video else None,
            fps=round(info.video.fps) if info.video else None,
            extra=_media_extra(info),
        )
        stale = [
            f
            for f in await self.videos.files(video.id)
            if (f.kind == "source" and f.name != name) or f.kind in _REPLACED_BY_STUDIO
        ]
        await self._forget(stale)
        await self._retranscode(job, video, info)

    async def _retranscode(self, job: Job, video: Video, edited: MediaInfo) -> None:
        """Create the jobs of the edited video, all waiting for `job` (once: a re-run finds them)."""
        try:
            options = graph_options_from_json(video.options, _DEFAULT_GRAPH_OPTIONS)
            specs = build_job_graph(video.uuid, edited, options)
        except ValueError as exc:
            raise ResultError(f"the edited video cannot be transcoded: {exc}") from exc
        now = time.time()
        async with self.videos.db.write() as conn:
            existing = await conn.execute(select(jobs.c.id).where(jobs.c.parent_id == job.id).limit(1))
            if existing.first() is not None:
                return
            ids = {job.uuid: job.id}
            for spec in specs:
                inserted = await conn.execute(
                    insert(jobs).values(
                        uuid=spec.uuid,
                        type=str(spec.type),
                        state=JobState.WAITING_FOR_PARENT_JOB,
                        priority=spec.priority,
                        payload=spec.payload,
                        private_payload=spec.private_payload,
                        failures=0,
                        lease_expiries=0,
                        parent_id=ids[spec.parent_uuid or job.uuid],
                        video_id=video.id,
                        created_at=now,
                        updated_at=now,
                    )
                )
                key = inserted.inserted_primary_key
                assert key is not None
                ids[spec.uuid] = int(key[0])
        log.info("video %s: %d job(s) will transcode the edited video", video.uuid, len(specs))

    async def _nothing(self, job: Job, result: JobResult, video: Video) -> None:
        return None

    # ---------------------------------------------------------------- HLS assembly

    async def _rebuild_master(self, video: Video) -> None:
        """Write master.m3u8 from the recorded renditions. Each completion records its rendition before
        rebuilding and checks after writing that no rendition appeared meanwhile (another process may
        complete a sibling job), so the last writer always includes every rendition."""
        key = video_key(video.uuid, MASTER_PLAYLIST_NAME)
        for _ in range(10):
            files = await self.videos.files(video.id)
            before = _hls_signature(files)
            playlists = {f.name for f in files if f.kind == "hls-playlist"}
            renditions = [
                r
                for f in files
                if f.kind == "hls-video"
                and (r := Rendition.from_file(f)) is not None
                and r.playlist in playlists
            ]
            stored = await self.storage.put_bytes(key, build_master_playlist(renditions).encode())
            await self.videos.put_file(video.id, "hls-master", MASTER_PLAYLIST_NAME, stored)
            if _hls_signature(await self.videos.files(video.id)) == before:
                return
        log.warning("master playlist of video %s kept changing; left as last written", video.uuid)

    async def _drop_web_videos_when_hls_is_done(self, job: Job, video: Video) -> None:
        """HLS-only mode: once every HLS job of the video has delivered, its web videos go."""
        async with self.videos.db.read() as conn:
            states = list(
                (
                    await conn.execute(
                        select(jobs.c.state).where(
                            jobs.c.video_id == video.id,
                            jobs.c.type == str(JobType.VOD_HLS),
                            jobs.c.id != job.id,
                        )
                    )
                ).scalars()
            )
        if any(state not in (JobState.COMPLETED, JobState.COMPLETING) for state in states):
            return
        web = [f for f in await self.videos.files(video.id) if f.kind == "web-video"]
        if web:
            log.info("video %s: HLS renditions are complete; removing %d web video(s)", video.uuid, len(web))
        await self._forget(web)

    # ---------------------------------------------------------------- helpers

    async def _video_of(self, job: Job) -> Video:
        video = await self.videos.by_id(job.video_id) if job.video_id is not None else None
        if video is None and isinstance(job.private_payload.get("videoUUID"), str):
            video = await self.videos.by_uuid(job.private_payload["videoUUID"])
        if video is None:
            raise ResultError(f"the video of job {job.uuid} no longer exists")
        return video

    def _result_key(self, job: Job, result: JobResult, field: str) -> str:
        key = result.files.get(field)
        if key is None:
            raise ResultError(f"the result of job {job.uuid} has no {field}")
        try:
            return check_key(key)
        except ValueError as exc:
            raise ResultError(f"the result of job {job.uuid} has a bad key for {field}") from exc

    async def _source_of(self, job: Job, field: str, src: str, dest: str) -> str:
        """The result file, or (on a re-run) the file it was already moved to."""
        if await self.storage.exists(src):
            return src
        if await self.storage.exists(dest):
            return dest
        raise ResultError(f"result file {field} of job {job.uuid} is missing")

    async def _take_media(
        self,
        job: Job,
        result: JobResult,
        field: str,
        dest: str,
        *,
        need_video: bool = False,
        need_audio: bool = False,
    ) -> tuple[MediaInfo, StoredObject]:
        """Probe the result file (or, on a re-run, the file already moved to `dest`), check it holds what
        the job promised, then move it to `dest`. Raises ProbeError / ResultError with the reason."""
        src = self._result_key(job, result, field)
        source = await self._source_of(job, field, src, dest)
        async with self.storage.local_file(source) as path:
            info = await probe(path)
        if need_video and info.video is None:
            raise ResultError(f"{field} of job {job.uuid} has no video stream")
        if need_audio and info.audio is None:
            raise ResultError(f"{field} of job {job.uuid} has no audio stream")
        if info.video is None and info.audio is None:
            raise ResultError(f"{field} of job {job.uuid} has no audio or video stream")
        stored = await self.storage.move(src, dest) if source == src else await self.storage.stat(dest)
        return info, stored

    async def _forget(self, files: list[VideoFile]) -> None:
        """Remove rows first, then files: a row never points at a missing file."""
        if not files:
            return
        async with self.videos.db.write() as conn:
            await conn.execute(delete(video_files).where(video_files.c.id.in_([f.id for f in files])))
        for file in files:
            try:
                await self.storage.delete(file.path)
            except (StorageError, ValueError) as exc:
                log.warning("could not remove %s: %s", file.path, exc)

    def _lock(self, video_id: int) -> asyncio.Lock:
        lock = self._locks.get(video_id)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[video_id] = lock
        return lock


async def _read_text(storage: Storage, key: str, limit: int) -> str:
    data = await storage.read_bytes(key, limit)
    name = key.rsplit("/", 1)[-1]
    if len(data) > limit:
        raise ResultError(f"{name} is larger than {limit} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ResultError(f"{name} is not UTF-8 text") from exc


def _language(detected: Any, asked: Any) -> str:
    for value in (detected, asked):
        if isinstance(value, str) and _LANGUAGE.match(value.strip()):
            return value.strip()
    return UNKNOWN_LANGUAGE


def _media_extra(info: MediaInfo) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "durationS": info.duration_s,
        "bitRate": info.bit_rate,
        "codecs": hls_codecs_string(info),
    }
    if info.video is not None:
        extra["width"] = info.video.display_width
        extra["height"] = info.video.display_height
    return extra


def _hls_signature(files: list[VideoFile]) -> frozenset[tuple[str, str, int]]:
    return frozenset((f.kind, f.name, f.id) for f in files if f.kind in ("hls-video", "hls-playlist"))
