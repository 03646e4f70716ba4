"""The runner's side of the wire (protocol spec §3): the only module that builds URLs, reads statuses and
problem documents.

One `InstanceClient` talks to one instance with one runner token. Every method makes exactly one attempt
(plus, for `success`, the custom uploads it needs) within explicit deadlines and raises only the classes of
`tuberunner.runner.errors`; callers decide about retries with `RetryPolicy`, because only they know what a
retry means (a retried `success` answered "not in processing state" is a success, a retried `accept` is a
lost race).

Deadlines: every call has the connect/read/write/pool phases of `Deadlines`; API calls without files also
have a whole-call deadline (`call_timeout_s`). Uploads and downloads have no whole-call deadline (their
length depends on the size), but a stalled transfer hits the read or write phase; the answer to `success`
may take `success_timeout_s` (PeerTube 6.3 completes the job inside that request).

Result files are streamed from disk in chunks with an exact `Content-Length` (proxies such as nginx
reject chunked uploads more often than sized ones); they are never read whole into memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import httpx

from tuberunner.protocol.jobs import (
    FEATURES_HEADER,
    JOBS_TAKEN_BACK_EVENT,
    PUSHES_HEADER,
    RAW_UPLOAD_BODY,
    RAW_UPLOAD_FEATURE,
    JobType,
)
from tuberunner.runner.config import RunnerConfig
from tuberunner.runner.errors import (
    JobFailed,
    RequestRejected,
    TransientError,
    error_from_response,
    translated,
)
from tuberunner.runner.job import AcceptedJob, JobOutput, LiveChunkUpdate
from tuberunner.runner.retry import Deadlines
from tuberunner.runner.shared_disk import SharedDisk
from tuberunner.runner.transfers import result_content_type

log = logging.getLogger(__name__)

API = "/api/v1/runners"
# PeerTube's limit for `error` messages and `abort` reasons (spec §3.5, §3.7).
MAX_MESSAGE_CHARS = 5000
UPLOAD_CHUNK_BYTES = 1024 * 1024
# At most this much of an error body is read to classify it.
_ERROR_BODY_BYTES = 64 * 1024

# Result parts need realistic file names (spec §3.10): a file without suffix gets its field's.
_FIELD_SUFFIX = {
    "videoFile": ".mp4",
    "resolutionPlaylistFile": ".m3u8",
    "masterPlaylistFile": ".m3u8",
    "vttFile": ".vtt",
    "storyboardFile": ".jpg",
    "videoChunkFile": ".ts",
}


@dataclass(frozen=True)
class AvailableJob:
    """One entry of `jobs/request`; `type` stays a string: servers may offer types we do not know."""

    uuid: str
    type: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class Registration:
    runner_id: int
    runner_token: str


def clip_message(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """1..limit characters: empty becomes a placeholder; a long one keeps its start and its end (where
    ffmpeg's last stderr lines are)."""
    text = message.strip() or "Unknown error (no message)"
    if len(text) <= limit:
        return text
    marker = "\n[…]\n"
    head = limit // 4
    return text[:head] + marker + text[-(limit - head - len(marker)) :]


def _short_url(url: str) -> str:
    """A URL for messages: no query string (signed upload URLs carry secrets there)."""
    return url.split("?", 1)[0]


# ------------------------------------------------------------------------------------------ multipart


@dataclass(frozen=True)
class _FilePart:
    name: str
    filename: str
    content_type: str
    path: Path
    size: int
    # The bytes themselves, for a small part made in memory (a live playlist): `path` only names it.
    data: bytes | None = None


def _text_part(name: str, filename: str, text: str) -> _FilePart:
    """A file part from text in memory (nothing written to a disk that may be full)."""
    data = text.encode("utf-8")
    path = Path(filename)
    return _FilePart(name, filename, result_content_type(name, path), path, len(data), data)


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\r", " ").replace("\n", " ")


class MultipartBody:
    """A multipart/form-data body streamed from disk, with its exact length known up front."""

    def __init__(self, fields: list[tuple[str, str]], files: list[_FilePart]) -> None:
        self.boundary = secrets.token_hex(16)
        self._fields = fields
        self._files = files
        length = sum(len(self._field_bytes(n, v)) for n, v in fields)
        length += sum(len(self._file_head(f)) + f.size + 2 for f in files)
        self.content_length = length + len(self._closing())

    @property
    def headers(self) -> dict[str, str]:
        return {
            "Content-Type": f"multipart/form-data; boundary={self.boundary}",
            "Content-Length": str(self.content_length),
        }

    def _field_bytes(self, name: str, value: str) -> bytes:
        return (
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{_quoted(name)}"\r\n\r\n{value}\r\n'
        ).encode()

    def _file_head(self, part: _FilePart) -> bytes:
        return (
            f"--{self.boundary}\r\n"
            f'Content-Disposition: form-data; name="{_quoted(part.name)}"; '
            f'filename="{_quoted(part.filename)}"\r\n'
            f"Content-Type: {part.content_type}\r\n\r\n"
        ).encode()

    def _closing(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode()

    async def stream(self) -> AsyncIterator[bytes]:
        for name, value in self._fields:
            yield self._field_bytes(name, value)
        for part in self._files:
            yield self._file_head(part)
            async for chunk in _read_file(part):
                yield chunk
            yield b"\r\n"
        yield self._closing()


async def _read_file(part: _FilePart) -> AsyncIterator[bytes]:
    """The file's bytes in chunks read off the event loop; exactly the size announced."""
    if part.data is not None:
        yield part.data
        return
    try:
        handle: IO[bytes] = await asyncio.to_thread(part.path.open, "rb")
    except OSError as exc:
        raise JobFailed(f"cannot read result file {part.path.name}: {exc.strerror or exc}") from exc
    try:
        remaining = part.size
        while remaining > 0:
            chunk = await asyncio.to_thread(handle.read, min(UPLOAD_CHUNK_BYTES, remaining))
            if not chunk:
                raise JobFailed(f"result file {part.path.name} shrank while it was being uploaded")
            remaining -= len(chunk)
            yield chunk
    except OSError as exc:
        raise JobFailed(f"cannot read result file {part.path.name}: {exc.strerror or exc}") from exc
    finally:
        handle.close()


def file_part(name: str, path: Path, field_name: str) -> _FilePart:
    """A file part with a realistic file name and type; JobFailed when the file cannot be read."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise JobFailed(
            f"result file {path.name} for {field_name} is missing: {exc.strerror or exc}"
        ) from exc
    filename = path.name if path.suffix else f"{path.name}{_FIELD_SUFFIX.get(field_name, '')}"
    content_type = result_content_type(field_name, Path(filename))
    return _FilePart(name=name, filename=filename, content_type=content_type, path=path, size=size)


# ------------------------------------------------------------------------------------------ client


class InstanceClient:
    """The runner API of one instance, for one runner token."""

    def __init__(
        self,
        url: str,
        runner_token: str = "",
        *,
        deadlines: Deadlines | None = None,
        call_timeout_s: float = 60.0,
        success_timeout_s: float = 300.0,
        transport: httpx.AsyncBaseTransport | None = None,
        user_agent: str = "tuberunner",
        shared_disk: SharedDisk | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        # Results go there rather than in the `success` body when the coordinator takes them (one-shot).
        self.shared_disk = shared_disk
        self.runner_token = runner_token
        self.deadlines = deadlines or Deadlines()
        self.call_timeout_s = call_timeout_s
        self.success_timeout_s = success_timeout_s
        # Whether the server said, on its last `jobs/request` or `accept` answer, that it sends
        # `tuberunner-jobs-taken-back` when it takes a job back (a Tuberunner coordinator; never PeerTube).
        self.pushes_taken_back = False
        self._http = httpx.AsyncClient(
            timeout=self.deadlines.timeout(),
            transport=transport,
            follow_redirects=False,
            headers={"User-Agent": user_agent, FEATURES_HEADER: RAW_UPLOAD_FEATURE},
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> InstanceClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    # -------------------------------------------------------------------- helpers

    @contextmanager
    def _deadline(self, context: str, timeout_s: float | None) -> Iterator[None]:
        """Transport failures → TransientError; a whole-call deadline → TransientError too."""
        try:
            with translated(context):
                yield
        except TimeoutError as exc:
            raise TransientError(f"{context}: no complete answer within {timeout_s:g} s") from exc

    async def _call(
        self,
        method: str,
        url: str,
        *,
        context: str,
        json_body: Mapping[str, Any] | None = None,
        multipart: MultipartBody | None = None,
        raw_file: _FilePart | None = None,
        phases: httpx.Timeout | None = None,
        whole_call_s: float | None = None,
    ) -> httpx.Response:
        """One request; raises a taxonomy error for anything but a 2xx answer."""
        kwargs: dict[str, Any] = {}
        if json_body is not None:
            kwargs["json"] = json_body
        if multipart is not None:
            kwargs["content"] = multipart.stream()
            kwargs["headers"] = multipart.headers
        if raw_file is not None:
            kwargs["content"] = _read_file(raw_file)
            kwargs["headers"] = {"Content-Type": raw_file.content_type, "Content-Length": str(raw_file.size)}
        if phases is not None:
            kwargs["timeout"] = phases
        with self._deadline(context, whole_call_s):
            async with asyncio.timeout(whole_call_s):
                response = await self._http.request(method, url, **kwargs)
        await self._raise_for_answer(response, context)
        return response

    @staticmethod
    async def _raise_for_answer(response: httpx.Response, context: str) -> None:
        status = response.status_code
        if status < 300:
            return
        if status < 400:
            target = _short_url(response.headers.get("location", "?"))
            raise RequestRejected(
                f"{context}: {status} redirect to {target}; use the final URL of the instance", status=status
            )
        if not response.is_stream_consumed:
            # Classify from the start of the body only: an error page can be big.
            body = bytearray()
            with translated(context):
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) >= _ERROR_BODY_BYTES:
                        break
            # Already decoded: the rebuilt answer must not claim an encoding or a length any more.
            headers = {
                k: v
                for k, v in response.headers.items()
                if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")
            }
            response = httpx.Response(status, headers=headers, content=bytes(body))
        raise error_from_response(response, context=context)

    @staticmethod
    def _json_object(response: httpx.Response, context: str) -> dict[str, Any]:
        try:
            value = json.loads(response.content)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise RequestRejected(
                f"{context}: {response.status_code} answer is not a JSON object (content type "
                f"{response.headers.get('content-type', 'none')!r}); is this a PeerTube instance?",
                status=response.status_code,
            )
        return value

    def _job_url(self, job_uuid: str, action: str) -> str:
        return f"{self.url}{API}/jobs/{quote(job_uuid, safe='')}/{action}"

    def _job_body(self, job: AcceptedJob, **extra: Any) -> dict[str, Any]:
        return {"runnerToken": self.runner_token, "jobToken": job.job_token, **extra}

    async def _post(self, url: str, body: Mapping[str, Any], context: str) -> httpx.Response:
        return await self._call(
            "POST", url, json_body=body, context=context, whole_call_s=self.call_timeout_s
        )

    # -------------------------------------------------------------------- registration

    async def register(
        self, registration_token: str, name: str, description: str | None = None, version: str | None = None
    ) -> Registration:
        """`POST /register`: a new runner on this instance; its token is not stored here."""
        context = f"register {name!r} on {self.url}"
        body: dict[str, Any] = {"registrationToken": registration_token, "name": name}
        if description:
            body["description"] = description
        if version:
            body["version"] = version
        answer = self._json_object(await self._post(f"{self.url}{API}/register", body, context), context)
        token, runner_id = answer.get("runnerToken"), answer.get("id")
        if not isinstance(token, str) or not token:
            raise RequestRejected(f"{context}: the answer has no runnerToken")
        return Registration(runner_id=runner_id if isinstance(runner_id, int) else -1, runner_token=token)

    async def unregister(self) -> None:
        context = f"unregister from {self.url}"
        await self._post(f"{self.url}{API}/unregister", {"runnerToken": self.runner_token}, context)

    # -------------------------------------------------------------------- jobs

    async def request_jobs(self, job_types: frozenset[str], version: str | None) -> list[AvailableJob]:
        """`POST /jobs/request` with the server-side type filter (8.x; older servers ignore it)."""
        context = f"request jobs from {self.url}"
        body: dict[str, Any] = {"runnerToken": self.runner_token, "jobTypes": sorted(job_types)}
        if version:
            body["version"] = version
        response = await self._post(f"{self.url}{API}/jobs/request", body, context)
        self._note_pushes(response)
        answer = self._json_object(response, context)
        entries = answer.get("availableJobs")
        if not isinstance(entries, list):
            raise RequestRejected(f"{context}: the answer has no availableJobs list")
        jobs: list[AvailableJob] = []
        for entry in entries:
            if (
                isinstance(entry, dict)
                and isinstance(entry.get("uuid"), str)
                and isinstance(entry.get("type"), str)
                and isinstance(entry.get("payload"), dict)
            ):
                jobs.append(AvailableJob(entry["uuid"], entry["type"], entry["payload"]))
            else:
                log.warning("%s: ignoring a malformed entry: %.200r", context, entry)
        return jobs

    async def accept(self, job_uuid: str) -> AcceptedJob:
        """`POST /jobs/{uuid}/accept`; a lost race raises JobGone."""
        context = f"accept job {job_uuid} from {self.url}"
        response = await self._post(
            self._job_url(job_uuid, "accept"), {"runnerToken": self.runner_token}, context
        )
        self._note_pushes(response)
        job = self._json_object(response, context).get("job")
        if not isinstance(job, dict):
            raise RequestRejected(f"{context}: the answer has no job object")
        token, payload, type_name = job.get("jobToken"), job.get("payload"), job.get("type")
        if not isinstance(token, str) or not token or not isinstance(payload, dict):
            raise RequestRejected(f"{context}: the job in the answer has no jobToken or payload")
        try:
            job_type = JobType(str(type_name))
        except ValueError:
            raise RequestRejected(f"{context}: unknown job type {type_name!r} in the answer") from None
        return AcceptedJob(
            uuid=str(job.get("uuid", job_uuid)),
            type=job_type,
            payload=payload,
            job_token=token,
            instance_url=self.url,
        )

    def _note_pushes(self, response: httpx.Response) -> None:
        pushed = {v.strip() for v in response.headers.get(PUSHES_HEADER, "").split(",")}
        self.pushes_taken_back = JOBS_TAKEN_BACK_EVENT in pushed

    async def update(self, job: AcceptedJob, progress: int | None = None) -> None:
        """`POST /jobs/{uuid}/update`: the heartbeat, as multipart/form-data text fields like the official
        runner (no payload part when there is none). PeerTube 8.x checks an update against every job
        type's validator in turn, and the live one reads the request's uploaded files: a JSON body has
        none (`req.files` undefined: 500), a multipart one has an empty set, so every type's heartbeat
        lands on 6.x-8.x."""
        fields: list[tuple[str, str]] = []
        if progress is not None:
            fields.append(("progress", str(min(max(int(progress), 0), 100))))
        fields += [("jobToken", job.job_token), ("runnerToken", self.runner_token)]
        await self._call(
            "POST",
            self._job_url(job.uuid, "update"),
            multipart=MultipartBody(fields, []),
            context=f"update job {job.uuid}",
            whole_call_s=self.call_timeout_s,
        )

    async def update_live(self, job: AcceptedJob, update: LiveChunkUpdate) -> None:
        """A live job's `update`: one segment added (with its file) or removed, the media playlist that lists
        it and the master once, as multipart like the official runner (spec §7.4). Live updates carry no
        progress: PeerTube refuses a live update without a chunk, so they are the live job's heartbeat."""
        fields = [
            ("runnerToken", self.runner_token),
            ("jobToken", job.job_token),
            ("payload[type]", update.kind),
            ("payload[videoChunkFilename]", update.chunk_name),
        ]
        files: list[_FilePart] = []
        if update.chunk_file is not None:
            files.append(file_part("payload[videoChunkFile]", update.chunk_file, "videoChunkFile"))
        if update.playlist is not None:
            name, text = update.playlist
            fields.append(("payload[resolutionPlaylistFilename]", name))
            files.append(_text_part("payload[resolutionPlaylistFile]", name, text))
        if update.master is not None:
            files.append(_text_part("payload[masterPlaylistFile]", "master.m3u8", update.master))
        await self._call(
            "POST",
            self._job_url(job.uuid, "update"),
            multipart=MultipartBody(fields, files),
            context=f"{update.kind} {update.chunk_name} of live job {job.uuid}",
            whole_call_s=self.call_timeout_s,
        )

    async def abort(self, job: AcceptedJob, reason: str) -> None:
        body = self._job_body(job, reason=clip_message(reason))
        await self._post(self._job_url(job.uuid, "abort"), body, f"abort job {job.uuid}")

    async def error(self, job: AcceptedJob, message: str) -> None:
        """`POST /jobs/{uuid}/error` with the message clipped to 1-5000 characters (a longer or empty one
        would be rejected and leave the job processing, spec §13.5)."""
        body = self._job_body(job, message=clip_message(message))
        await self._post(self._job_url(job.uuid, "error"), body, f"report error of job {job.uuid}")

    async def success(self, job: AcceptedJob, output: JobOutput) -> None:
        """Upload each file that has a custom upload target there first (8.x), then `POST /success`
        with the other files as `payload[<field>]` parts and the text fields. On a shared disk, the files
        the coordinator takes from it are not sent at all."""
        targets = _custom_upload_targets(job.payload)
        files: list[_FilePart] = []
        for field_name, path in output.files.items():
            if self.shared_disk is not None and await self.shared_disk.put_result(job, field_name, path):
                continue
            part = file_part(f"payload[{field_name}]", path, field_name)
            target = targets.get(field_name)
            if target is None:
                files.append(part)
                continue
            await self._custom_upload(job, field_name, target, part)
        fields = [("runnerToken", self.runner_token), ("jobToken", job.job_token)]
        fields += [(f"payload[{name}]", value) for name, value in output.fields.items()]
        await self._call(
            "POST",
            self._job_url(job.uuid, "success"),
            multipart=MultipartBody(fields, files),
            phases=self._transfer_timeout(read_s=self.success_timeout_s),
            context=f"send success of job {job.uuid}",
        )

    async def _custom_upload(
        self, job: AcceptedJob, field_name: str, target: _UploadTarget, part: _FilePart
    ) -> None:
        """The official runner's way (one multipart `file` part), or the file itself as the body when the
        target says `body: raw` (a presigned object-storage URL, which would store a multipart body as is)."""
        context = f"upload {field_name} of job {job.uuid} to {_short_url(target.url)}"
        phases = self._transfer_timeout(read_s=self.success_timeout_s)
        if target.raw:
            await self._call(target.method, target.url, raw_file=part, phases=phases, context=context)
            return
        upload = _FilePart("file", part.filename, part.content_type, part.path, part.size)
        await self._call(
            target.method, target.url, multipart=MultipartBody([], [upload]), phases=phases, context=context
        )

    def _transfer_timeout(self, *, read_s: float | None = None) -> httpx.Timeout:
        d = self.deadlines
        return httpx.Timeout(connect=d.connect_s, read=read_s or d.read_s, write=d.write_s, pool=d.pool_s)

    @asynccontextmanager
    async def open_input(self, url: str, job: AcceptedJob, offset: int = 0) -> AsyncIterator[httpx.Response]:
        """Open an input file of `job` (spec §3.9): POST JSON `{runnerToken, jobToken}`, redirects
        followed, `Range: bytes=<offset>-` when resuming.

        Yields the streaming response once its status is 2xx: 206 means the body starts at `offset`, 200
        that the server ignored the range and sends the whole file. Errors while the body is read (reset,
        read deadline) come out as TransientError, like everything else here."""
        headers = {"Range": f"bytes={offset}-"} if offset > 0 else {}
        context = f"download {_short_url(url)} for job {job.uuid}"
        with translated(context):
            async with self._http.stream(
                "POST",
                url,
                json={"runnerToken": self.runner_token, "jobToken": job.job_token},
                headers=headers,
                follow_redirects=True,
                timeout=self._transfer_timeout(),
            ) as response:
                await self._raise_for_answer(response, context)
                yield response


def client_for(
    url: str, runner_token: str, config: RunnerConfig, *, shared_disk: SharedDisk | None = None
) -> InstanceClient:
    """A client with the deadlines of `config`."""
    from tuberunner import __version__

    return InstanceClient(
        url,
        runner_token,
        deadlines=config.deadlines(),
        call_timeout_s=config.call_timeout_s,
        success_timeout_s=config.success_timeout_s,
        user_agent=f"tuberunner/{__version__}",
        shared_disk=shared_disk,
    )


@dataclass(frozen=True)
class _UploadTarget:
    url: str
    method: str
    # The file itself as the body, not a multipart form (a Tuberunner coordinator's presigned URLs).
    raw: bool


def _custom_upload_targets(payload: Mapping[str, Any]) -> dict[str, _UploadTarget]:
    """`output.<field>CustomUpload = {url, method[, body]}` entries of an 8.x payload, by field."""
    output = payload.get("output")
    if not isinstance(output, dict):
        return {}
    targets: dict[str, _UploadTarget] = {}
    for key, value in output.items():
        if not key.endswith("CustomUpload") or not isinstance(value, dict):
            continue
        url, method = value.get("url"), str(value.get("method") or "PUT").upper()
        if isinstance(url, str) and url.startswith(("http://", "https://")) and method in ("PUT", "POST"):
            raw = value.get("body") == RAW_UPLOAD_BODY
            targets[key.removesuffix("CustomUpload")] = _UploadTarget(url, method, raw)
        else:
            log.warning("ignoring malformed custom upload target %s: %.200r", key, value)
    return targets


__all__ = [
    "API",
    "MAX_MESSAGE_CHARS",
    "UPLOAD_CHUNK_BYTES",
    "AvailableJob",
    "InstanceClient",
    "MultipartBody",
    "Registration",
    "client_for",
    "clip_message",
    "file_part",
]
