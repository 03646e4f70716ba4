"""Ingest API: submit a video, follow its jobs, fetch its outputs.

Admin endpoints (bearer admin token):

    POST   /api/v1/videos              multipart upload → 200 {"video": {"id", "uuid"}}
    GET    /api/v1/videos              ?start&count&sort=(-)createdAt → {"total", "data": [video…]}
    GET    /api/v1/videos/{id|uuid}    the video JSON (state, jobs, source, outputs)
    DELETE /api/v1/videos/{id|uuid}    its jobs (cancelled first), rows and files → 204

Upload fields: `videofile` (the file), and optional `name`, `resolutions` (comma list), `hls`, `webVideo`,
`splitAudio`, `storyboard` (booleans), `transcription` (boolean or a language code), `previewfile` (an
image; an audio upload without one gets a generated still). The upload is streamed to disk, probed, and
refused with 400 and the probe's reason when it is not media; nothing is kept then.

Studio edits (PeerTube's video studio, applied before anything is transcoded): `cutStart`, `cutEnd`
(seconds), `introfile`, `outrofile` (videos), `watermarkfile` (an image). With any of them the video's
first job is one `video-studio-transcoding` job on the original (tasks in the order cut, intro, outro,
watermark); its completion makes the edited file the source and creates the usual job graph for it. The
files are kept as the video's task files, served to that job only, and removed once it completes.

Public static files (no token, like PeerTube's): see `video_outputs` for the URL of each kind. A URL only
ever reaches a file recorded for that video, of that kind, inside that video's folder.

A video's state is derived from the jobs that make what it plays (web videos, HLS, audio merge, studio),
as PeerTube publishes a video once its transcoding is done: `processing` while one is not final, then
`failed` when one errored (or its parent did), `cancelled` when one was cancelled, else `published`.
Storyboard and caption jobs never hold a video back: they are listed under `attachments` (pending, done,
failed or cancelled, with `unclaimedSince` while no connected runner takes them, see `claims`) and their
files join the outputs when they are done.
A live video (`live_api`) has its live's state instead (`waiting`, `live`, `ended`), a `live` object,
and its HLS files are served from the live's folder (`live_files`).
"""

from __future__ import annotations

import logging
import math
import re
import time
import uuid as uuidlib
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from sqlalchemy import delete, func, insert, select
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tuberunner.coordinator.bodies import Body, UploadedFile, read_body
from tuberunner.coordinator.config import CoordinatorConfig
from tuberunner.coordinator.context import Coordinator, base_url_of, coordinator_of
from tuberunner.coordinator.file_responses import redirect_response, stored_file_response
from tuberunner.coordinator.job_graph import (
    GraphOptions,
    StudioEdits,
    build_job_graph,
    is_audio_upload,
    studio_job,
)
from tuberunner.coordinator.live import Live
from tuberunner.coordinator.live_api import live_file_response
from tuberunner.coordinator.models import Job, iso
from tuberunner.coordinator.problems import BadRequest, NotFound, PayloadTooLarge, invalid_params
from tuberunner.coordinator.schema import jobs, video_files, videos
from tuberunner.coordinator.storage import (
    Storage,
    StorageError,
    StoredObject,
    result_prefix,
    video_key,
    video_prefix,
)
from tuberunner.coordinator.video_outputs import STATIC_FOLDERS, outputs_json
from tuberunner.coordinator.videos import Video, VideoFile
from tuberunner.media.binaries import find_ffmpeg
from tuberunner.media.errors import MediaError, ProbeError
from tuberunner.media.probe import MediaInfo, probe
from tuberunner.media.process import run_ffmpeg
from tuberunner.media.profiles import VOD_RESOLUTIONS
from tuberunner.protocol.errors import Message
from tuberunner.protocol.jobs import JobState, JobType

log = logging.getLogger(__name__)

_STUDIO_FILE_FIELDS: Final = {"introfile": "intro", "outrofile": "outro", "watermarkfile": "watermark"}
_FILE_FIELDS: Final = frozenset({"videofile", "previewfile", *_STUDIO_FILE_FIELDS})
# Room for the multipart framing and text fields around the file(s) in a declared Content-Length.
_MULTIPART_OVERHEAD_BYTES: Final = 1024 * 1024
_BOOLEANS: Final = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False}
_LANGUAGE: Final = re.compile(r"^[a-z]{2,3}(?:-[A-Za-z0-9]{2,8})*$")
_SUFFIX: Final = re.compile(r"^\.[a-z0-9]{1,8}$")
_STATIC_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
_WEB_VIDEO_NAME: Final = re.compile(r"^([0-9a-f-]{36})-\d{1,5}\.mp4$")
_NAME_MAX: Final = 255
# ASCII digits only (`str.isdigit` also takes '²', which `int` refuses), bounded for `int`.
_DIGITS: Final = re.compile(r"^[0-9]{1,18}$")
# The still an audio upload is merged with when it brings none: 854x480 keeps the merged video at 480p.
_PREVIEW_SIZE: Final = "854x480"
_PREVIEW_COLOR: Final = "0x202020"
_FFMPEG_TIMEOUT_S: Final = 60.0
# A cut may end a little past the probed duration (container and stream durations differ slightly).
_CUT_SLACK_S: Final = 0.1
_MAX_ROW_ID: Final = 2**31 - 1
_DEFAULT_COUNT: Final = 15
_MAX_COUNT: Final = 100

# Internal JobState names → the keys of the `jobs.byState` summary.
_STATE_KEYS: Final = {state: state.name.lower() for state in JobState}


# ------------------------------------------------------------------------------------------ upload


async def upload_video(request: Request) -> Response:
    c = coordinator_of(request)
    c.admin.check(request)
    limit = c.config.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and _DIGITS.match(declared) and int(declared) > limit + _MULTIPART_OVERHEAD_BYTES:
        raise PayloadTooLarge(f"Upload is larger than {limit} bytes")
    async with read_body(
        request,
        uploads_dir=c.config.uploads_dir,
        max_json_bytes=c.config.max_json_body_bytes,
        max_upload_bytes=limit,
        file_fields=_FILE_FIELDS,
    ) as body:
        video_id, video_uuid = await ingest(c, body)
    return JSONResponse({"video": {"id": video_id, "uuid": video_uuid}})


async def ingest(c: Coordinator, body: Body) -> tuple[int, str]:
    """A new video (id, uuid) from the fields and files of an upload (files spooled in the uploads folder:
    those kept are claimed); a Problem (400 naming what is wrong) otherwise. The one-shot mode calls this
    with its input file (`bodies.local_body`), the upload endpoint with what it received."""
    upload = body.files.get("videofile")
    if upload is None:
        raise invalid_params(["videofile"], {"videofile": "A video or audio file is required"})
    options = parse_options(c.config, body.fields)
    name = _video_name(body.fields, upload.filename)
    info = await _probe_upload(upload.path, "videofile")
    preview = body.files.get("previewfile")
    preview_info = await _probe_upload(preview.path, "previewfile") if preview is not None else None
    if preview_info is not None and preview_info.video is None:
        raise BadRequest("previewfile is not an image")
    edits, task_files = await _studio_request(body.fields, body.files, info)
    video_uuid = str(uuidlib.uuid4())
    try:
        specs = build_job_graph(video_uuid, info, options)
    except ValueError as exc:
        raise BadRequest(f"Cannot transcode this file: {exc}") from exc
    if edits.any:
        # The graph above is made again from the edited file when the studio job completes.
        specs = [studio_job(video_uuid, edits)]
    video_id = await _store(
        c, video_uuid, name, upload, info, preview, options, specs, edits=edits, task_files=task_files
    )
    log.info("video %s (%s) ingested with %d job(s)", video_uuid, name, len(specs))
    return video_id, video_uuid


async def _probe_upload(path: Path, field: str) -> MediaInfo:
    try:
        info = await probe(path)
    except ProbeError as exc:
        reason = str(exc).split(": ", 1)[-1] if str(exc).startswith(path.name) else str(exc)
        raise BadRequest(f"{field} is not a usable video or audio file: {reason}") from exc
    if field == "videofile" and info.audio is None and (info.video is None or info.duration_s <= 0):
        raise BadRequest(f"{field} is not a usable video or audio file: a still image has no duration")
    return info


async def _store(
    c: Coordinator,
    video_uuid: str,
    name: str,
    upload: UploadedFile,
    info: MediaInfo,
    preview: UploadedFile | None,
    options: GraphOptions,
    specs: Sequence[Any],
    *,
    edits: StudioEdits | None = None,
    task_files: Mapping[str, UploadedFile] | None = None,
) -> int:
    """Put the files in storage, insert the rows, create the jobs; on any failure undo all of it."""
    storage = c.storage
    video_id: int | None = None
    preview_file: Path | None = None
    try:
        source_name = f"source{_safe_suffix(upload.filename)}"
        preview_name = ""
        if preview is not None:
            preview_file, preview_name = preview.path, f"preview{_safe_suffix(preview.filename, '.jpg')}"
        elif is_audio_upload(info):
            # Made from the upload while it is still a local file, before it goes into storage.
            preview_name = "preview.jpg"
            preview_file = await _make_preview(upload.path, info, c.config.uploads_dir)
        source = await _put(storage, video_key(video_uuid, source_name), upload)
        stored_preview = None
        if preview_file is not None:
            stored_preview = await storage.put_file(video_key(video_uuid, preview_name), preview_file)
            if preview is not None:
                preview.claimed = True
        stored_tasks = [
            (task_name, await _put(storage, video_key(video_uuid, task_name), task_upload))
            for task_name, task_upload in (task_files or {}).items()
        ]
        stored_options = _options_json(options)
        if edits is not None and edits.any:
            stored_options["studio"] = edits.as_json()
        now = time.time()
        async with c.db.write() as conn:
            inserted = await conn.execute(
                insert(videos).values(
                    uuid=video_uuid,
                    name=name,
                    state="processing",
                    options=stored_options,
                    source=_source_json(info, upload),
                    error=None,
                    created_at=now,
                    updated_at=now,
                )
            )
            key = inserted.inserted_primary_key
            assert key is not None
            video_id = int(key[0])
        short_side = info.video.short_side if info.video is not None and not is_audio_upload(info) else None
        await c.videos.put_file(
            video_id,
            "source",
            source_name,
            source,
            resolution=short_side,
            fps=round(info.video.fps) if short_side is not None and info.video is not None else None,
        )
        if stored_preview is not None:
            await c.videos.put_file(video_id, "preview", preview_name, stored_preview)
        for task_name, stored_task in stored_tasks:
            await c.videos.put_file(video_id, "task-file", task_name, stored_task)
        await c.jobs.create(video_id, specs)
    except BaseException:
        if video_id is not None:
            async with c.db.write() as conn:
                await conn.execute(delete(videos).where(videos.c.id == video_id))
        await _delete_quietly(storage.delete_prefix(video_prefix(video_uuid)), video_uuid)
        raise
    finally:
        if preview is None and preview_file is not None:
            preview_file.unlink(missing_ok=True)  # a generated still that did not reach storage
    return video_id


async def _put(storage: Storage, key: str, upload: UploadedFile) -> StoredObject:
    stored = await storage.put_file(key, upload.path)
    upload.claimed = True
    return stored


async def _delete_quietly(deletion: Awaitable[None], what: str) -> None:
    """Files left behind by a failure or a deletion are garbage, not a reason to fail the answer."""
    try:
        await deletion
    except StorageError as exc:
        log.warning("files of %s were left in storage: %s", what, exc)


async def _make_preview(source: Path, info: MediaInfo, folder: Path) -> Path:
    """The cover art of an audio file when it has one, else a plain dark still (a new file in `folder`)."""
    out = folder / f"preview-{uuidlib.uuid4().hex}.jpg"
    ffmpeg = find_ffmpeg()
    prefix = ["-hide_banner", "-nostdin", "-y", "-loglevel", "error"]
    still = ["-frames:v", "1", "-q:v", "3", "-update", "1", str(out)]
    if info.video is not None:
        try:
            await run_ffmpeg(
                ffmpeg,
                [*prefix, "-protocol_whitelist", "file,pipe", "-i", str(source), "-map", "0:v:0", *still],
                duration_s=None,
                max_duration_s=_FFMPEG_TIMEOUT_S,
            )
            return out
        except MediaError as exc:
            log.warning("cannot extract the cover art of %s (%s); using a plain still", source, exc)
    await run_ffmpeg(
        ffmpeg,
        [*prefix, "-f", "lavfi", "-i", f"color=c={_PREVIEW_COLOR}:size={_PREVIEW_SIZE}:rate=1", *still],
        duration_s=None,
        max_duration_s=_FFMPEG_TIMEOUT_S,
    )
    return out


async def _studio_request(
    fields: Mapping[str, Any], files: Mapping[str, UploadedFile], info: MediaInfo
) -> tuple[StudioEdits, dict[str, UploadedFile]]:
    """The studio edits asked for, checked (400 naming every bad field), and their files by served name."""
    bad: dict[str, str] = {}

    def seconds(name: str) -> float | None:
        value = fields.get(name)
        if value is None or value == "":
            return None
        try:
            number = float(value) if isinstance(value, str) and len(value) <= 32 else math.nan
        except ValueError:
            number = math.nan
        if not math.isfinite(number) or number < 0:
            bad[name] = "a number of seconds, 0 or more"
            return None
        return number

    start, end = seconds("cutStart"), seconds("cutEnd")
    if start is not None and start >= info.duration_s:
        bad["cutStart"] = f"before the end of the video ({info.duration_s:.3f} s)"
    if end is not None and (end <= (start or 0.0) or end > info.duration_s + _CUT_SLACK_S):
        bad["cutEnd"] = f"after cutStart and at most the duration of the video ({info.duration_s:.3f} s)"
    names: dict[str, str | None] = {"intro": None, "outro": None, "watermark": None}
    task_files: dict[str, UploadedFile] = {}
    for field, kind in _STUDIO_FILE_FIELDS.items():
        upload = files.get(field)
        if upload is None:
            continue
        try:
            task_info = await probe(upload.path)
        except ProbeError:
            task_info = None
        if kind == "watermark":
            if task_info is None or task_info.video is None:
                bad[field] = "an image (PNG or JPEG)"
                continue
        elif task_info is None or task_info.video is None or task_info.duration_s <= 0:
            bad[field] = "a video file"
            continue
        default = ".png" if kind == "watermark" else ".mp4"
        served = f"{kind}-{uuidlib.uuid4().hex[:12]}{_safe_suffix(upload.filename, default)}"
        names[kind] = served
        task_files[served] = upload
    edits = StudioEdits(
        cut_start_s=start,
        cut_end_s=end,
        intro=names["intro"],
        outro=names["outro"],
        watermark=names["watermark"],
    )
    if not bad and edits.any and (is_audio_upload(info) or info.video is None):
        bad["videofile"] = "a video with a picture: studio edits cannot apply to an audio upload"
    if bad:
        raise invalid_params(list(bad), bad)
    return edits, task_files


def _safe_suffix(filename: str, default: str = "") -> str:
    """The client's extension if it is a plain one (`.mp4`), else `default`: a hint for humans and
    for ffmpeg's demuxer guess, never a path component."""
    suffix = Path(filename).suffix.lower() if filename else ""
    return suffix if _SUFFIX.match(suffix) else default


def _video_name(fields: Mapping[str, Any], filename: str) -> str:
    value = fields.get("name")
    if value is None or value == "":
        # The client's file name may hold anything multipart allows; NUL is no text a database stores.
        stem = Path(filename).stem.replace("\x00", "").strip() if filename else ""
        return (stem or "video")[:_NAME_MAX]
    if not isinstance(value, str) or not value.strip() or len(value) > _NAME_MAX:
        raise invalid_params(["name"], {"name": f"A name of 1 to {_NAME_MAX} characters"})
    return value.strip()


def parse_options(config: CoordinatorConfig, fields: Mapping[str, Any]) -> GraphOptions:
    """Upload fields → graph options; defaults from the configuration; 400 naming every bad field."""
    bad: dict[str, str] = {}

    def boolean(name: str, default: bool) -> bool:
        value = fields.get(name)
        if value is None or value == "":
            return default
        if isinstance(value, str) and value.strip().lower() in _BOOLEANS:
            return _BOOLEANS[value.strip().lower()]
        bad[name] = "true or false"
        return default

    resolutions = config.resolutions
    raw = fields.get("resolutions")
    if raw is not None and raw != "":
        allowed = {r for r in VOD_RESOLUTIONS if r > 0}
        try:
            if not isinstance(raw, str):
                raise ValueError(raw)
            parsed = tuple(sorted({int(part) for part in raw.split(",") if part.strip()}, reverse=True))
            if not parsed or not set(parsed) <= allowed:
                raise ValueError(raw)
            resolutions = parsed
        except ValueError:
            bad["resolutions"] = "comma-separated values among " + ",".join(map(str, sorted(allowed)))

    transcription, language = False, None
    raw = fields.get("transcription")
    if isinstance(raw, str) and raw.strip().lower() in _BOOLEANS:
        transcription = _BOOLEANS[raw.strip().lower()]
    elif isinstance(raw, str) and _LANGUAGE.match(raw.strip()):
        transcription, language = True, raw.strip()
    elif raw is not None and raw != "":
        bad["transcription"] = "true, false or a language code"

    options = GraphOptions(
        resolutions=resolutions,
        hls=boolean("hls", config.hls),
        web_video=boolean("webVideo", config.web_video),
        split_audio=boolean("splitAudio", config.split_audio),
        transcription=transcription,
        transcription_language=language,
        storyboard=boolean("storyboard", True),
    )
    if not bad and not (options.hls or options.web_video):
        bad["hls"] = bad["webVideo"] = "at least one of hls and webVideo must be true"
    if bad:
        raise invalid_params(list(bad), bad)
    return options


def _options_json(options: GraphOptions) -> dict[str, Any]:
    return {
        "resolutions": list(options.resolutions),
        "hls": options.hls,
        "webVideo": options.web_video,
        "splitAudio": options.split_audio,
        "transcription": options.transcription,
        "transcriptionLanguage": options.transcription_language,
        "storyboard": options.storyboard,
    }


def _source_json(info: MediaInfo, upload: UploadedFile) -> dict[str, Any]:
    return {
        "filename": (upload.filename or "")[:_NAME_MAX],
        "size": info.size_bytes,
        "formatName": info.format_name,
        "durationS": info.duration_s,
        "bitRate": info.bit_rate,
        "audioOnly": is_audio_upload(info),
        "video": asdict(info.video) if info.video is not None else None,
        "audio": asdict(info.audio) if info.audio is not None else None,
    }


# ------------------------------------------------------------------------------------------ reads


async def get_video(request: Request) -> Response:
    c = coordinator_of(request)
    c.admin.check(request)
    video = await _find_video(c, request.path_params["video_id"])
    rows = await _jobs_of(c, [video.id])
    files = await c.videos.files(video.id)
    base_url = base_url_of(request)
    live = await c.live.of_videos([video.id])
    body = video_json(
        base_url,
        video,
        rows.get(video.id, []),
        files,
        details=True,
        unclaimed_since=c.claims.unclaimed_since,
    )
    return JSONResponse(with_live(c, body, live.get(video.id), base_url))


async def list_videos(request: Request) -> Response:
    c = coordinator_of(request)
    c.admin.check(request)
    start, count, descending = _pagination(request)
    async with c.db.read() as conn:
        total = (await conn.execute(select(func.count()).select_from(videos))).scalar_one()
        order = (
            (videos.c.created_at.desc(), videos.c.id.desc())
            if descending
            else (videos.c.created_at, videos.c.id)
        )
        page = [
            Video.from_row(r)
            for r in (
                await conn.execute(select(videos).order_by(*order).offset(start).limit(count))
            ).mappings()
        ]
        ids = [v.id for v in page]
        file_rows = (
            (
                await conn.execute(
                    select(video_files).where(video_files.c.video_id.in_(ids)).order_by(video_files.c.id)
                )
            )
            .mappings()
            .all()
            if ids
            else []
        )
    files: dict[int, list[VideoFile]] = {}
    for row in file_rows:
        files.setdefault(row["video_id"], []).append(VideoFile.from_row(row))
    job_rows = await _jobs_of(c, ids)
    base_url = base_url_of(request)
    live = await c.live.of_videos(ids)
    data = [
        with_live(
            c,
            video_json(
                base_url,
                v,
                job_rows.get(v.id, []),
                files.get(v.id, []),
                details=False,
                unclaimed_since=c.claims.unclaimed_since,
            ),
            live.get(v.id),
            base_url,
        )
        for v in page
    ]
    return JSONResponse({"total": total, "data": data})


def _pagination(request: Request) -> tuple[int, int, bool]:
    params = request.query_params
    bad = []
    start, count = 0, _DEFAULT_COUNT
    if "start" in params:
        start = int(params["start"]) if _DIGITS.match(params["start"]) else -1
        if start < 0:
            bad.append("start")
    if "count" in params:
        count = int(params["count"]) if _DIGITS.match(params["count"]) else -1
        if not 0 <= count <= _MAX_COUNT:
            bad.append("count")
    sort = params.get("sort", "-createdAt")
    if sort not in ("createdAt", "-createdAt"):
        bad.append("sort")
    if bad:
        raise invalid_params(bad)
    return start, count, sort.startswith("-")


async def _find_video(c: Coordinator, ident: str) -> Video:
    video: Video | None = None
    if _DIGITS.match(ident) and int(ident) <= _MAX_ROW_ID:
        video = await c.videos.by_id(int(ident))
    elif _is_uuid(ident):
        video = await c.videos.by_uuid(ident)
    if video is None:
        raise NotFound(Message.VIDEO_NOT_FOUND)
    return video


async def _jobs_of(c: Coordinator, video_ids: list[int]) -> dict[int, list[Job]]:
    if not video_ids:
        return {}
    async with c.db.read() as conn:
        rows = (
            (await conn.execute(select(jobs).where(jobs.c.video_id.in_(video_ids)).order_by(jobs.c.id)))
            .mappings()
            .all()
        )
    found: dict[int, list[Job]] = {}
    for row in rows:
        job = Job.from_row(row)
        assert job.video_id is not None
        found.setdefault(job.video_id, []).append(job)
    return found


_PLAYABLE_KINDS = frozenset({"web-video", "hls-master"})
# Jobs whose files attach to a video without holding its publication back, by the name of what they make.
ATTACHMENT_KINDS: Final = {JobType.STORYBOARD: "storyboard", JobType.TRANSCRIPTION: "captions"}
_ATTACHMENT_STATES: Final = {
    JobState.COMPLETED: "done",
    JobState.ERRORED: "failed",
    JobState.PARENT_ERRORED: "failed",
    JobState.CANCELLED: "cancelled",
    JobState.PARENT_CANCELLED: "cancelled",
}


def video_state(states: Sequence[JobState], *, playable: bool) -> str:
    if any(not s.is_final for s in states):
        return "processing"
    if any(s in (JobState.ERRORED, JobState.PARENT_ERRORED) for s in states):
        return "failed"
    if any(s in (JobState.CANCELLED, JobState.PARENT_CANCELLED) for s in states):
        return "cancelled"
    # Every job done, yet nothing to play: an admin deleted the jobs that would have made it (a
    # deletion cancels first, and the cancelled rows went with it).
    return "published" if playable else "cancelled"


def video_json(
    base_url: str,
    video: Video,
    video_jobs: list[Job],
    files: list[VideoFile],
    *,
    details: bool,
    unclaimed_since: Callable[[Job], float | None],
) -> dict[str, Any]:
    by_id = {j.id: j for j in video_jobs}
    errors = [
        {"job": j.uuid, "type": str(j.type), "message": j.error}
        for j in video_jobs
        if j.state == JobState.ERRORED and j.error
    ]
    summary: dict[str, Any] = {
        "total": len(video_jobs),
        "byState": dict(Counter(_STATE_KEYS[j.state] for j in video_jobs)),
    }
    if details:
        summary["list"] = [_job_json(j, by_id, unclaimed_since(j)) for j in video_jobs]
    publishing = [j.state for j in video_jobs if j.type not in ATTACHMENT_KINDS]
    attachments = [
        {
            "kind": ATTACHMENT_KINDS[j.type],
            "job": j.uuid,
            "state": _ATTACHMENT_STATES.get(j.state, "pending"),
            "unclaimedSince": iso(unclaimed_since(j)),
        }
        for j in video_jobs
        if j.type in ATTACHMENT_KINDS
    ]
    return {
        "id": video.id,
        "uuid": video.uuid,
        "name": video.name,
        "state": video_state(publishing, playable=any(f.kind in _PLAYABLE_KINDS for f in files)),
        "error": "; ".join(e["message"] for e in errors) or None,
        "errors": errors,
        "createdAt": iso(video.created_at),
        "updatedAt": iso(max([video.updated_at, *(j.updated_at for j in video_jobs)])),
        "options": video.options,
        "source": video.source,
        "jobs": summary,
        "attachments": attachments,
        "outputs": outputs_json(base_url, video.uuid, files),
    }


def with_live(c: Coordinator, body: dict[str, Any], live: Live | None, base_url: str) -> dict[str, Any]:
    """A live video's state is its live's (waiting, live, ended); its HLS is the live's."""
    if live is not None:
        body["live"] = c.live.describe(live, base_url)
        body["state"] = live.state
        if body["outputs"]["hls"] is None and live.session > 0:
            body["outputs"]["hls"] = {"masterPlaylistUrl": body["live"]["hlsUrl"], "renditions": []}
    return body


def _job_json(job: Job, by_id: Mapping[int, Job], unclaimed_since: float | None) -> dict[str, Any]:
    output = job.payload.get("output")
    parent = by_id.get(job.parent_id) if job.parent_id is not None else None
    return {
        "uuid": job.uuid,
        "type": str(job.type),
        "state": job.state.as_json(),
        "priority": job.priority,
        "progress": job.progress,
        "failures": job.failures,
        "error": job.error,
        "resolution": output.get("resolution") if isinstance(output, dict) else None,
        "fps": output.get("fps") if isinstance(output, dict) else None,
        "parentUuid": parent.uuid if parent else None,
        "startedAt": iso(job.started_at),
        "finishedAt": iso(job.finished_at),
        "unclaimedSince": iso(unclaimed_since),
    }


# ------------------------------------------------------------------------------------------ delete


async def delete_video(request: Request) -> Response:
    c = coordinator_of(request)
    c.admin.check(request)
    video = await _find_video(c, request.path_params["video_id"])
    video_jobs = (await _jobs_of(c, [video.id])).get(video.id, [])
    ids = {j.id for j in video_jobs}
    # Deleting a root cancels it (runners holding it get 404) and its descendants go by cascade.
    for job in video_jobs:
        if job.parent_id is None or job.parent_id not in ids:
            await c.jobs.delete(job)
    async with c.db.write() as conn:
        await conn.execute(delete(videos).where(videos.c.id == video.id))
    for job in video_jobs:
        await _delete_quietly(c.storage.delete_prefix(result_prefix(job.uuid)), f"job {job.uuid}")
    await _delete_quietly(c.storage.delete_prefix(video_prefix(video.uuid)), f"video {video.uuid}")
    c.live.files.remove(video.uuid)  # a live's HLS (none for other videos)
    log.info("video %s deleted with %d job(s)", video.uuid, len(video_jobs))
    return Response(status_code=204)


# ------------------------------------------------------------------------------------------ static


def _is_uuid(value: str) -> bool:
    try:
        return str(uuidlib.UUID(value)) == value
    except ValueError:
        return False


def _static(folder: str) -> Any:
    async def serve(request: Request) -> Response:
        c = coordinator_of(request)
        filename = str(request.path_params["filename"])
        video_uuid = _static_video_uuid(folder, filename, request.path_params.get("video_uuid"))
        video = await c.videos.by_uuid(video_uuid) if video_uuid else None
        if video is None:
            raise NotFound("File not found")
        if folder == "streaming-playlists/hls" and video.options.get("live"):
            return live_file_response(c, video.uuid, filename, request)
        file = await _recorded_file(c, video, folder, filename)
        if file is None:
            raise NotFound("File not found")
        response = await _output_response(c, file.path, request.headers.get("range"))
        response.headers["access-control-allow-origin"] = "*"
        if file.path.endswith(".m3u8"):
            response.headers["cache-control"] = "no-cache"
        return response

    return serve


def _static_video_uuid(folder: str, filename: str, from_path: object) -> str | None:
    """The video a static URL names (in the web video's file name, else in the path), if well formed."""
    if folder == "web-videos":
        match = _WEB_VIDEO_NAME.match(filename)
        video_uuid = match.group(1) if match else ""
    else:
        video_uuid = str(from_path)
    if not (_is_uuid(video_uuid) and _STATIC_NAME.match(filename) and ".." not in filename):
        return None
    return video_uuid


async def _recorded_file(c: Coordinator, video: Video, folder: str, filename: str) -> VideoFile | None:
    """The file of `video` a static URL serves: recorded, of a kind that folder serves, in its folder."""
    kinds = STATIC_FOLDERS[folder]
    files = await c.videos.files(video.id)
    file = next((f for f in files if f.kind in kinds and f.name == filename), None)
    if file is None or not file.path.startswith(video_prefix(video.uuid)):
        return None
    return file


async def published_file(c: Coordinator, url: str) -> VideoFile | None:
    """The recorded file that the public URL `url` (`/static/...`, see `video_outputs`) serves; None when
    it serves none (a live's HLS files are not recorded files)."""
    path = urlsplit(url).path
    for folder in STATIC_FOLDERS:
        prefix = f"/static/{folder}/"
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix) :].split("/")
        filename, from_path = (parts[0], None) if folder == "web-videos" else (parts[-1], parts[0])
        if len(parts) != (1 if folder == "web-videos" else 2):
            return None
        video_uuid = _static_video_uuid(folder, filename, from_path)
        video = await c.videos.by_uuid(video_uuid) if video_uuid else None
        if video is None or video.options.get("live"):
            return None
        return await _recorded_file(c, video, folder, filename)
    return None


async def _output_response(c: Coordinator, key: str, range_header: str | None) -> Response:
    """A redirect to a presigned URL when the store signs them and the operator did not ask for streaming;
    playlists are always streamed (small, and their relative URIs must resolve against our URL)."""
    if c.config.serve_outputs == "redirect" and not key.endswith(".m3u8"):
        url = await c.storage.presigned_get(key, expires_s=c.config.presigned_get_s)
        if url is not None:
            await c.storage.stat(key)  # a missing file is our 404 problem, naming it
            return redirect_response(url)
    return await stored_file_response(c.storage, key, range_header)


routes: list[BaseRoute] = [
    Route("/api/v1/videos", upload_video, methods=["POST"]),
    Route("/api/v1/videos", list_videos, methods=["GET"]),
    Route("/api/v1/videos/{video_id}", get_video, methods=["GET"]),
    Route("/api/v1/videos/{video_id}", delete_video, methods=["DELETE"]),
    Route("/static/web-videos/{filename}", _static("web-videos"), methods=["GET"]),
    *(
        Route(f"/static/{folder}/{{video_uuid}}/{{filename}}", _static(folder), methods=["GET"])
        for folder in STATIC_FOLDERS
        if folder != "web-videos"
    ),
]
