"""Runner-facing endpoints (spec §3): paths, checks in PeerTube's order, exact answers."""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import uuid as uuidlib
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import unquote, urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tuberunner.coordinator.bodies import Body, UploadedFile, read_body
from tuberunner.coordinator.context import Coordinator, base_url_of, coordinator_of
from tuberunner.coordinator.file_responses import redirect_response, stored_file_response
from tuberunner.coordinator.models import Job, JobResult
from tuberunner.coordinator.problems import BadRequest, Conflict, Forbidden, NotFound, invalid_params
from tuberunner.coordinator.runners import RunnerAuth
from tuberunner.coordinator.storage import StorageError, result_key
from tuberunner.coordinator.videos import VideoFile
from tuberunner.protocol.errors import ErrorCode, Message
from tuberunner.protocol.jobs import (
    FEATURES_HEADER,
    JOBS_TAKEN_BACK_EVENT,
    PUSHES_HEADER,
    RAW_UPLOAD_BODY,
    RAW_UPLOAD_FEATURE,
    REQUIRED_SUCCESS_FILES,
    SUCCESS_FILE_FIELDS,
    UPDATE_FILE_FIELDS,
    JobState,
    JobType,
)

log = logging.getLogger(__name__)
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_SEMVER = re.compile(r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")
_TASK_FILENAME = re.compile(r"^[a-z0-9-]+\.[a-z0-9]{1,8}$")
# PeerTube's `isIdOrUUIDValid` after `toCompleteUUID`: validator.js `isInt` and `isUUID(value, 4)`; short
# UUIDs are base 58 (the flickr alphabet of the `short-uuid` package), 22 characters long.
_INTEGER = re.compile(r"[+-]?[0-9]+")
_UUID_V4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", re.IGNORECASE)
_BASE58 = "123456789abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ"
_SHORT_UUID_LENGTH = 22
_MAX_ROW_ID = 2**31 - 1
_NO_CONTENT = 204
# Extension of a stored result, by field: never taken from the client's file name.
_RESULT_SUFFIX = {
    "videoFile": ".mp4",
    "resolutionPlaylistFile": ".m3u8",
    "vttFile": ".vtt",
    "storyboardFile": ".jpg",
}


def _string(fields: Mapping[str, Any], name: str, max_len: int, *, required: bool = True) -> str | None:
    """PeerTube's `isSafe…` checks: a string of 1..max_len characters (or absent when optional)."""
    value = fields.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= max_len:
        raise invalid_params([name])
    return value


def _check_strings(fields: Mapping[str, Any], *names: str) -> list[str]:
    bad = [n for n in names if not (isinstance(fields.get(n), str) and 1 <= len(fields[n]) <= 1000)]
    if bad:
        raise invalid_params(bad)
    return [fields[n] for n in names]


def _job_uuid(request: Request) -> str:
    value = request.path_params["job_uuid"]
    # Only the canonical lower-case form: that is how job UUIDs are stored and sent.
    if not _UUID.match(value):
        raise invalid_params(["jobUUID"])
    return str(value)


def _client_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


def _body(request: Request, file_fields: frozenset[str] = frozenset()) -> AbstractAsyncContextManager[Body]:
    c = coordinator_of(request)
    return read_body(
        request,
        uploads_dir=c.uploads_dir,
        max_json_bytes=c.config.max_json_body_bytes,
        max_upload_bytes=c.config.max_upload_bytes,
        file_fields=file_fields,
    )


async def _runner(c: Coordinator, token: str, request: Request) -> RunnerAuth:
    auth = await c.runners.by_token(token)
    if auth is None:
        raise NotFound(Message.UNKNOWN_RUNNER_TOKEN, code=ErrorCode.UNKNOWN_RUNNER_TOKEN)
    c.runners.touch(auth.runner.id, _client_ip(request))
    return auth


async def _job_of_runner(c: Coordinator, request: Request, body: Body, allowed: frozenset[JobState]) -> Job:
    """Spec §3.11: parameters, then this job with this token of this runner (404), then its state."""
    return await _job_held(c, _job_uuid(request), body.fields, allowed, _client_ip(request))


async def _job_held(
    c: Coordinator, job_uuid: str, fields: Mapping[str, Any], allowed: frozenset[JobState], ip: str | None
) -> Job:
    runner_token, job_token = _check_strings(fields, "runnerToken", "jobToken")
    auth = await c.runners.by_token(runner_token)
    job = await c.jobs.job_of_runner(job_uuid, auth.runner.id if auth else None, job_token)
    if job.state not in allowed:
        raise BadRequest(Message.JOB_NOT_PROCESSING, code=ErrorCode.JOB_NOT_IN_PROCESSING_STATE)
    if auth is not None:
        c.runners.touch(auth.runner.id, ip)
    return job


_PROCESSING = frozenset({JobState.PROCESSING})


async def _known_runner(c: Coordinator, fields: Mapping[str, Any]) -> RunnerAuth | None:
    """The runner of a well-formed `runnerToken`, for the one-statement happy paths; None sends the call
    down the usual path, which gives the exact answer in PeerTube's order."""
    token = fields.get("runnerToken")
    if not (isinstance(token, str) and 1 <= len(token) <= 1000):
        return None
    return await c.runners.by_token(token)


def _well_formed_job_token(fields: Mapping[str, Any]) -> str | None:
    token = fields.get("jobToken")
    return token if isinstance(token, str) and 1 <= len(token) <= 1000 else None


async def register(request: Request) -> Response:
    c = coordinator_of(request)
    async with _body(request) as body:
        f = body.fields
        bad = []
        if not (isinstance(f.get("registrationToken"), str) and 1 <= len(f["registrationToken"]) <= 1000):
            bad.append("registrationToken")
        if not (isinstance(f.get("name"), str) and 1 <= len(f["name"]) <= 100):
            bad.append("name")
        if (
            "description" in f
            and f["description"] is not None
            and not (isinstance(f["description"], str) and 1 <= len(f["description"]) <= 1000)
        ):
            bad.append("description")
        version = f.get("version")
        if version is not None and not (
            isinstance(version, str) and len(version) <= 100 and _SEMVER.match(version)
        ):
            bad.append("version")
        if bad:
            raise invalid_params(bad)
        runner_id, token = await c.runners.register(
            f["registrationToken"], f["name"], f.get("description"), version, _client_ip(request)
        )
    return JSONResponse({"id": runner_id, "runnerToken": token})


async def unregister(request: Request) -> Response:
    c = coordinator_of(request)
    async with _body(request) as body:
        token = _string(body.fields, "runnerToken", 1000)
        assert token is not None
        auth = await c.runners.by_token(token)
        if auth is None:
            raise NotFound(Message.UNKNOWN_RUNNER_TOKEN, code=ErrorCode.UNKNOWN_RUNNER_TOKEN)
        await c.runners.remove([auth.runner.id])
    return Response(status_code=_NO_CONTENT)


async def request_jobs(request: Request) -> Response:
    c = coordinator_of(request)
    async with _body(request) as body:
        f = body.fields
        token = _string(f, "runnerToken", 1000)
        assert token is not None
        job_types = f.get("jobTypes")
        if job_types is not None and not (
            isinstance(job_types, list) and all(isinstance(t, str) for t in job_types)
        ):
            raise invalid_params(["jobTypes"])
        version = f.get("version")
        if version is not None and not (isinstance(version, str) and 1 <= len(version) <= 100):
            raise invalid_params(["version"])
        auth = await _runner(c, token, request)
        if version is not None and version != auth.version:
            await c.runners.set_version(auth, version)
            c.claims.forget([auth.runner.id])  # another program: what the old one took tells nothing
    declared = frozenset(job_types) if job_types is not None else None
    offered = declared if declared is not None else c.claims.offer_types(auth.runner.id)
    answer = await c.jobs.available_jobs(base_url_of(request), offered)
    c.claims.asked(auth.runner.id, declared, answer.offered)
    return Response(answer.body, media_type="application/json", headers=_pushes(c))


def _pushes(c: Coordinator) -> dict[str, str]:
    """Tell our runners that a job taken back reaches them through the socket: they need not check it
    often (PeerTube sends no such event, and no such header)."""
    return {PUSHES_HEADER: JOBS_TAKEN_BACK_EVENT} if c.jobs.on_taken_back is not None else {}


async def accept(request: Request) -> Response:
    c = coordinator_of(request)
    async with _body(request) as body:
        job_uuid = _job_uuid(request)
        known = await _known_runner(c, body.fields)
        if known is not None:
            taken = await c.jobs.try_accept(job_uuid, known.runner.id)
            if taken is not None:
                c.runners.touch(known.runner.id, _client_ip(request))
                c.claims.tried(known.runner.id, job_uuid, taken.type, accepted=True)
                return await _accepted(request, taken, known)
        job = await c.jobs.get(job_uuid)
        if job is None:
            raise NotFound(Message.UNKNOWN_RUNNER_JOB)
        if known is not None:
            c.claims.tried(known.runner.id, job_uuid, job.type, accepted=False)
        if job.state != JobState.PENDING:
            # Taken by another runner: that is a lost race, always 409 with its code. Other states
            # answer PeerTube's 400, with the code too so that clients branching on codes ignore it.
            if job.state in (JobState.PROCESSING, JobState.COMPLETING):
                raise Conflict(Message.JOB_NOT_PENDING_ANYMORE, code=ErrorCode.JOB_NOT_IN_PENDING_STATE)
            raise BadRequest(Message.JOB_NOT_PENDING, code=ErrorCode.JOB_NOT_IN_PENDING_STATE)
        token = _string(body.fields, "runnerToken", 1000)
        assert token is not None
        auth = await _runner(c, token, request)
        accepted = await c.jobs.accept(job, auth.runner.id)
        c.claims.tried(auth.runner.id, job_uuid, accepted.type, accepted=True)
    return await _accepted(request, accepted, auth)


async def _accepted(request: Request, job: Job, auth: RunnerAuth) -> Response:
    base_url = base_url_of(request)
    job_json = job.as_json(base_url, auth.runner)
    job_json["jobToken"] = job.processing_job_token
    if RAW_UPLOAD_FEATURE in request.headers.get(FEATURES_HEADER, "").replace(" ", "").split(","):
        await _offer_direct_uploads(coordinator_of(request), job, job_json)
    if job.type == JobType.LIVE_RTMP_HLS:
        # Only this acceptance can pull the stream (live.py).
        job_json["payload"]["input"]["rtmpUrl"] = coordinator_of(request).live.pull_url(job, base_url)
    return JSONResponse({"job": job_json}, headers=_pushes(coordinator_of(request)))


async def _offer_direct_uploads(c: Coordinator, job: Job, job_json: dict[str, Any]) -> None:
    """With object storage, a runner that PUTs raw files gets a presigned URL per result file
    (`output.<field>CustomUpload`) and sends `success` without them; the keys follow from the job token,
    so any coordinator process finds the files. Without a signing store, nothing is offered."""
    output = job_json["payload"].get("output")
    token = job.processing_job_token
    if not isinstance(output, dict) or token is None:
        return
    for name in REQUIRED_SUCCESS_FILES[job.type]:
        key = direct_result_key(job.uuid, token, name)
        try:
            url = await c.storage.presigned_put(key, expires_s=c.config.presigned_put_s)
        except StorageError as exc:  # the runner then uploads through us, as the official runner does
            log.warning("no direct upload offered for job %s: %s", job.uuid, exc)
            return
        if url is None:
            return
        output[f"{name}CustomUpload"] = {"url": url, "method": "PUT", "body": RAW_UPLOAD_BODY}


def direct_result_key(job_uuid: str, job_token: str, name: str) -> str:
    """Where a result file of this accept (`job_token`) may be put instead of sent with `success` (a
    presigned upload, or a runner of this process): `success` takes the file from there."""
    # One folder per accept (a job token), named by a digest: the token itself never appears in a URL.
    nonce = "direct-" + hashlib.sha256(job_token.encode()).hexdigest()[:16]
    return result_key(job_uuid, nonce, f"{name}{_RESULT_SUFFIX.get(name, '.bin')}")


async def abort(request: Request) -> Response:
    c = coordinator_of(request)
    async with _body(request) as body:
        job_uuid = _job_uuid(request)
        known, job_token = await _known_runner(c, body.fields), _well_formed_job_token(body.fields)
        reason = body.fields.get("reason")
        if (
            known is not None
            and job_token is not None
            and isinstance(reason, str)
            and 1 <= len(reason) <= 5000
            and await c.jobs.try_abort(job_uuid, known.runner.id, job_token)
        ):
            c.runners.touch(known.runner.id, _client_ip(request))
            return Response(status_code=_NO_CONTENT)
        job = await _job_of_runner(c, request, body, _PROCESSING)
        _string(body.fields, "reason", 5000)
        await c.jobs.abort(job)
    return Response(status_code=_NO_CONTENT)


async def error(request: Request) -> Response:
    c = coordinator_of(request)
    async with _body(request) as body:
        job = await _job_of_runner(c, request, body, _PROCESSING)
        message = _string(body.fields, "message", 5000)
        assert message is not None
        await c.jobs.error(job, message)
    return Response(status_code=_NO_CONTENT)


def _progress(fields: Mapping[str, Any]) -> int | None:
    if "progress" not in fields:
        return None
    value = fields["progress"]
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise invalid_params(["progress"])
    return value


def _progress_is_valid(fields: Mapping[str, Any]) -> bool:
    try:
        _progress(fields)
    except BadRequest:
        return False  # answered on the usual path, in PeerTube's order
    return True


async def update_job(request: Request) -> Response:
    c = coordinator_of(request)
    async with _body(request, UPDATE_FILE_FIELDS) as body:
        job_uuid = _job_uuid(request)
        known, job_token = await _known_runner(c, body.fields), _well_formed_job_token(body.fields)
        if (
            known is not None
            and job_token is not None
            and not body.files
            and body.fields.get("payload") in (None, {}, "")
            and _progress_is_valid(body.fields)
            and await c.jobs.try_update(job_uuid, known.runner.id, job_token, _progress(body.fields))
        ):
            c.runners.touch(known.runner.id, _client_ip(request))
            return Response(status_code=_NO_CONTENT)
        job = await _job_of_runner(
            c, request, body, frozenset({JobState.PROCESSING, JobState.COMPLETING, JobState.COMPLETED})
        )
        progress = _progress(body.fields)
        payload = body.fields.get("payload")
        if job.type != JobType.LIVE_RTMP_HLS and (payload not in (None, {}, "") or body.files):
            raise BadRequest(Message.PAYLOAD_INVALID)
        if job.type == JobType.LIVE_RTMP_HLS and not await c.live.update(job, body.fields, body.files):
            return Response(status_code=_NO_CONTENT)  # completing or completed: nothing to do (spec §3.6)
        await c.jobs.update(job, progress)
    return Response(status_code=_NO_CONTENT)


async def success(request: Request) -> Response:
    c = coordinator_of(request)
    async with _body(request, SUCCESS_FILE_FIELDS) as body:
        job_uuid = _job_uuid(request)
        runner_token, job_token = _check_strings(body.fields, "runnerToken", "jobToken")
        auth = await c.runners.by_token(runner_token)
        job = await c.jobs.job_of_runner(job_uuid, auth.runner.id if auth else None, job_token)
        if auth is not None:
            c.runners.touch(auth.runner.id, _client_ip(request))
        if c.jobs.is_retried_success(job):
            return Response(status_code=_NO_CONTENT)
        if job.state != JobState.PROCESSING:
            raise BadRequest(Message.JOB_NOT_PROCESSING, code=ErrorCode.JOB_NOT_IN_PROCESSING_STATE)
        result = await _store_result(c, job, body)
        await c.jobs.success(job, result)
    return Response(status_code=_NO_CONTENT)


async def _store_result(c: Coordinator, job: Job, body: Body) -> JobResult:
    """The result files into storage: those in the body under a fresh nonce, and those the runner PUT
    to its presigned URLs where they are (any process finds them there)."""
    payload = body.fields.get("payload")
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise BadRequest(Message.PAYLOAD_INVALID)
    files_by_name: dict[str, UploadedFile] = {}
    for field_name, upload in body.files.items():
        files_by_name[field_name[len("payload[") : -1]] = upload
    required = REQUIRED_SUCCESS_FILES[job.type]
    if set(files_by_name) - set(required):
        raise BadRequest(Message.PAYLOAD_INVALID)
    stored: dict[str, str] = {}
    for name in required:
        if name in files_by_name:
            continue
        token = job.processing_job_token
        key = direct_result_key(job.uuid, token, name) if token else None
        if key is None or not await c.storage.exists(key):
            raise BadRequest(Message.PAYLOAD_INVALID)
        stored[name] = key
    if job.type == JobType.TRANSCRIPTION:
        language = payload.get("inputLanguage")
        if language is not None and not (isinstance(language, str) and 1 <= len(language) <= 100):
            raise BadRequest(Message.PAYLOAD_INVALID)
    fields = {k: v for k, v in payload.items() if isinstance(v, str | int | float | bool)}
    nonce = secrets.token_hex(8)
    for name, upload in files_by_name.items():
        key = result_key(job.uuid, nonce, f"{name}{_RESULT_SUFFIX.get(name, '.bin')}")
        await c.storage.put_file(key, upload.path)
        upload.claimed = True
        stored[name] = key
    return JobResult(files=stored, fields=fields)


async def download(request: Request) -> Response:
    c = coordinator_of(request)
    async with _body(request) as body:
        job = await _job_of_runner(c, request, body, _PROCESSING)
    filename = request.path_params.get("filename")
    file = await _input_of(c, job, str(request.path_params["video_id"]), _kind_of(request.url.path), filename)
    # With object storage: 302 to a presigned GET (the runner follows with a GET, Range kept), once the
    # file is known to be there (else a 404 problem naming it, not the bucket's own answer).
    await c.storage.stat(file.path)
    url = await c.storage.presigned_get(file.path, expires_s=c.config.presigned_get_s)
    if url is not None:
        return redirect_response(url)
    return await stored_file_response(c.storage, file.path, request.headers.get("range"))


async def runner_input(c: Coordinator, url: str, runner_token: str, job_token: str) -> VideoFile:
    """The stored file an input URL of a job (spec §3.9) serves to the runner holding it, after the very
    checks of the download endpoint (a Problem otherwise): for a runner of this process, which reads it
    where it lies instead of downloading it (the one-shot mode)."""
    match = _INPUT_URL.match(unquote(urlsplit(url).path))
    if match is None:
        raise NotFound(Message.VIDEO_NOT_FOUND)
    fields = {"runnerToken": runner_token, "jobToken": job_token}
    job = await _job_held(c, match["job"], fields, _PROCESSING, "127.0.0.1")
    path = match["path"]
    return await _input_of(c, job, match["video"], _kind_of(path), _filename_of(path))


async def _input_of(c: Coordinator, job: Job, video_id: str, which: str, filename: str | None) -> VideoFile:
    """Spec §3.9's checks after the job's: the video, that it is the job's, the file asked for."""
    ident = _video_ident(video_id)
    if ident is None:
        raise invalid_params(["videoId"])
    if isinstance(ident, int):
        video = await c.videos.by_id(ident) if 1 <= ident <= _MAX_ROW_ID else None
    else:
        video = await c.videos.by_uuid(ident)
    if video is None:
        raise NotFound(Message.VIDEO_NOT_FOUND)
    if job.private_payload.get("videoUUID") != video.uuid:
        raise Forbidden(Message.JOB_NOT_OF_VIDEO)
    if which == "task-file":
        if filename is None or not _TASK_FILENAME.match(filename):
            raise invalid_params(["filename"])
        task_urls = [
            str(task.get("options", {}).get("file", ""))
            for task in job.payload.get("tasks", [])
            if isinstance(task, dict)
        ]
        if not any(url.rsplit("/", 1)[-1] == filename for url in task_urls):
            raise BadRequest(Message.FILE_NOT_OF_TASK)
        file = await c.videos.task_file(video.id, filename)
    else:
        file = await c.videos.input_file(video.id, which)
    if file is None:
        raise NotFound(Message.VIDEO_NOT_FOUND)
    return file


def _video_ident(value: str) -> int | str | None:
    """PeerTube's `videoId` parameter: a short UUID (22 characters) made whole, then an integer id or a
    version 4 UUID (lower-cased: PostgreSQL's uuid type ignores case); None when it is neither."""
    if len(value) == _SHORT_UUID_LENGTH:
        number = 0
        for char in value:
            digit = _BASE58.find(char)
            if digit < 0:
                return None
            number = number * len(_BASE58) + digit
        if number >= 1 << 128:
            return None
        value = str(uuidlib.UUID(int=number))
    if _INTEGER.fullmatch(value):
        return int(value) if len(value) <= 12 else 0  # 0: beyond any row id, so not found
    if _UUID_V4.fullmatch(value):
        return value.lower()
    return None


def _kind_of(path: str) -> str:
    if path.endswith("/max-quality/audio"):
        return "audio"
    if path.endswith("/previews/max-quality"):
        return "preview"
    if "/studio/task-files/" in path:
        return "task-file"
    return "video"


def _filename_of(path: str) -> str | None:
    """The task file a `/studio/task-files/<name>` path names (None for the other inputs)."""
    head, found, name = path.rpartition("/studio/task-files/")
    return name if found and head else None


_FILES = "/api/v1/runners/jobs/{job_uuid}/files/videos/{video_id}"
# The same paths, for `runner_input`.
_INPUT_URL = re.compile(
    r"^/api/v1/runners/jobs/(?P<job>[^/]+)/files/videos/(?P<video>[^/]+)"
    r"(?P<path>/max-quality|/max-quality/audio|/previews/max-quality|/studio/task-files/[^/]+)$"
)

routes = [
    Route("/api/v1/runners/register", register, methods=["POST"]),
    Route("/api/v1/runners/unregister", unregister, methods=["POST"]),
    Route("/api/v1/runners/jobs/request", request_jobs, methods=["POST"]),
    Route("/api/v1/runners/jobs/{job_uuid}/accept", accept, methods=["POST"]),
    Route("/api/v1/runners/jobs/{job_uuid}/abort", abort, methods=["POST"]),
    Route("/api/v1/runners/jobs/{job_uuid}/update", update_job, methods=["POST"]),
    Route("/api/v1/runners/jobs/{job_uuid}/error", error, methods=["POST"]),
    Route("/api/v1/runners/jobs/{job_uuid}/success", success, methods=["POST"]),
    Route(_FILES + "/max-quality", download, methods=["POST"]),
    Route(_FILES + "/max-quality/audio", download, methods=["POST"]),
    Route(_FILES + "/previews/max-quality", download, methods=["POST"]),
    Route(_FILES + "/studio/task-files/{filename}", download, methods=["POST"]),
]
