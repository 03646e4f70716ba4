"""Blocking HTTP helpers behind the CLI's coordinator client verbs (`submit`, `status`,
`registration-token create`).

`status` with a video shows its state, jobs, attachments (storyboard, captions) and outputs; without one,
the pending jobs no connected runner takes (`GET /api/v1/runners/jobs/unclaimed`).

Every call has deadlines (connect, read, write, pool), streams uploads from disk, and turns every failure
into one `ClientError` whose message can be printed as is: the coordinator's problem `detail` for an HTTP
error, the cause for a network error.
"""

from __future__ import annotations

import mimetypes
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Final

import httpx

DEFAULT_URL: Final = "http://127.0.0.1:9000"
# Jobs listed under a video's `attachments` (their unclaimed state is shown there).
_ATTACHMENT_TYPES: Final = frozenset({"generate-video-storyboard", "video-transcription"})
ADMIN_TOKEN_ENV: Final = "TUBERUNNER_ADMIN_TOKEN"
# The coordinator probes and stores an upload before it answers: allow it a long read.
DEFAULT_TIMEOUT: Final = httpx.Timeout(connect=10.0, read=300.0, write=300.0, pool=10.0)


class ClientError(Exception):
    """The coordinator could not be reached, or refused the call (`status` is then its HTTP status)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def resolve_admin_token(option: str | None) -> str:
    """The `--admin-token` value, else TUBERUNNER_ADMIN_TOKEN; ClientError when neither is set."""
    token = option or os.environ.get(ADMIN_TOKEN_ENV)
    if not token:
        raise ClientError(f"no admin token: pass --admin-token or set {ADMIN_TOKEN_ENV}")
    return token


def submit(
    url: str,
    admin_token: str,
    path: Path,
    *,
    name: str | None = None,
    resolutions: Sequence[int] | None = None,
    hls: bool | None = None,
    web_video: bool | None = None,
    split_audio: bool | None = None,
    transcription: bool | str | None = None,
    storyboard: bool | None = None,
    preview: Path | None = None,
    timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    transport: httpx.BaseTransport | None = None,
) -> dict[str, Any]:
    """Upload a video or audio file; returns `{"id", "uuid"}` of the new video. Unset options take the
    coordinator's defaults."""
    fields: dict[str, str] = {}
    if name is not None:
        fields["name"] = name
    if resolutions is not None:
        fields["resolutions"] = ",".join(str(r) for r in resolutions)
    for key, value in (
        ("hls", hls),
        ("webVideo", web_video),
        ("splitAudio", split_audio),
        ("storyboard", storyboard),
        ("transcription", transcription),
    ):
        if value is not None:
            fields[key] = value if isinstance(value, str) else str(value).lower()
    with ExitStack() as stack:
        files: dict[str, tuple[str, Any, str]] = {}
        for field, file_path in (("videofile", path), ("previewfile", preview)):
            if file_path is None:
                continue
            try:
                handle = stack.enter_context(file_path.open("rb"))
            except OSError as exc:
                raise ClientError(f"cannot read {file_path}: {exc.strerror or exc}") from exc
            mime = mimetypes.guess_type(file_path.name)[0] or "application/octet-stream"
            files[field] = (file_path.name, handle, mime)
        with _client(url, admin_token, timeout, transport) as client:
            answer = _call(client, "POST", "/api/v1/videos", data=fields, files=files)
    video = answer.get("video") if isinstance(answer, dict) else None
    if not isinstance(video, dict) or "uuid" not in video:
        raise ClientError(f"unexpected answer from the coordinator: {answer!r}")
    return video


def video_status(
    url: str,
    admin_token: str,
    video_id: str,
    *,
    timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    transport: httpx.BaseTransport | None = None,
) -> dict[str, Any]:
    """The video JSON of `GET /api/v1/videos/{id or uuid}`."""
    if not video_id or "/" in video_id:
        raise ClientError(f"not a video id: {video_id!r}")
    with _client(url, admin_token, timeout, transport) as client:
        answer = _call(client, "GET", f"/api/v1/videos/{video_id}")
    if not isinstance(answer, dict):
        raise ClientError(f"unexpected answer from the coordinator: {answer!r}")
    return answer


def unclaimed_jobs(
    url: str,
    admin_token: str,
    *,
    timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    transport: httpx.BaseTransport | None = None,
) -> dict[str, Any]:
    """`{total, data}` of `GET /api/v1/runners/jobs/unclaimed` (the first hundred)."""
    with _client(url, admin_token, timeout, transport) as client:
        answer = _call(client, "GET", "/api/v1/runners/jobs/unclaimed", params={"count": 100})
    if not isinstance(answer, dict) or not isinstance(answer.get("data"), list):
        raise ClientError(f"unexpected answer from the coordinator: {answer!r}")
    return answer


def create_live(
    url: str,
    admin_token: str,
    name: str,
    *,
    resolutions: Sequence[int] | None = None,
    save_replay: bool = False,
    permanent: bool = False,
    timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    transport: httpx.BaseTransport | None = None,
) -> dict[str, Any]:
    """Create a live video; returns `{"video": {"id", "uuid"}, "live": {"rtmpUrl", "streamKey", ...}}`."""
    body: dict[str, Any] = {"name": name, "saveReplay": save_replay, "permanentLive": permanent}
    if resolutions is not None:
        body["resolutions"] = ",".join(str(r) for r in resolutions)
    with _client(url, admin_token, timeout, transport) as client:
        answer = _call(client, "POST", "/api/v1/videos/live", json=body)
    if not (isinstance(answer, dict) and isinstance(answer.get("live"), dict) and "video" in answer):
        raise ClientError(f"unexpected answer from the coordinator: {answer!r}")
    return answer


def create_registration_token(
    url: str,
    admin_token: str,
    *,
    timeout: httpx.Timeout = DEFAULT_TIMEOUT,
    transport: httpx.BaseTransport | None = None,
) -> str:
    """Generate a registration token (204, no body, as PeerTube) and read it back: the newest one."""
    with _client(url, admin_token, timeout, transport) as client:
        _call(client, "POST", "/api/v1/runners/registration-tokens/generate")
        answer = _call(
            client, "GET", "/api/v1/runners/registration-tokens", params={"sort": "-createdAt", "count": 1}
        )
    try:
        token = answer["data"][0]["registrationToken"]
    except (KeyError, IndexError, TypeError):
        raise ClientError(f"unexpected answer from the coordinator: {answer!r}") from None
    if not isinstance(token, str):
        raise ClientError(f"unexpected answer from the coordinator: {answer!r}")
    return token


def format_status(video: dict[str, Any]) -> str:
    """A few human lines for `coordinator status`."""
    jobs = video.get("jobs") or {}
    counts = ", ".join(f"{n} {state}" for state, n in sorted((jobs.get("byState") or {}).items()))
    lines = [
        f"{video.get('uuid')}  {video.get('name')!r}  {video.get('state')}",
        f"jobs: {jobs.get('total', 0)} ({counts or 'none'})",
    ]
    live = video.get("live")
    if isinstance(live, dict):
        lines.append(f"live: {live.get('state')}, publish to {live.get('rtmpUrl')} with the stream key")
        lines.append(f"live HLS: {live.get('hlsUrl')}")
        if live.get("error"):
            lines.append(f"live error: {live['error']}")
        for replay in live.get("replays") or []:
            lines.append(f"replay: {replay}")
    for error in video.get("errors") or []:
        lines.append(f"error: {error.get('type')} {error.get('job')}: {error.get('message')}")
    for attachment in video.get("attachments") or []:
        line = f"{attachment.get('kind')}: {attachment.get('state')}"
        if attachment.get("unclaimedSince"):
            since = attachment["unclaimedSince"]
            line += f" (unclaimed: no connected runner has taken its job type since {since})"
        lines.append(line)
    for job in jobs.get("list") or []:
        if job.get("unclaimedSince") and job.get("type") not in _ATTACHMENT_TYPES:
            lines.append(
                f"unclaimed: {job.get('type')} {job.get('uuid')}: no connected runner has taken this "
                f"job type since {job['unclaimedSince']}"
            )
    outputs = video.get("outputs") or {}
    for web in outputs.get("webVideos") or []:
        lines.append(f"web video {web.get('resolution')}p: {web.get('url')}")
    hls = outputs.get("hls")
    if hls and hls.get("masterPlaylistUrl") and not isinstance(live, dict):
        lines.append(f"HLS: {hls['masterPlaylistUrl']}")
    for caption in outputs.get("captions") or []:
        lines.append(f"caption {caption.get('language')}: {caption.get('url')}")
    for storyboard in outputs.get("storyboards") or []:
        lines.append(f"storyboard: {storyboard.get('url')}")
    return "\n".join(lines)


def format_unclaimed(answer: dict[str, Any]) -> str:
    """`coordinator status` without a video: the pending jobs no connected runner takes."""
    jobs = answer.get("data") or []
    if not jobs:
        return "every pending job has a connected runner that takes its type"
    lines = [f"{answer.get('total', len(jobs))} pending job(s) no connected runner takes:"]
    for job in jobs:
        then = "the coordinator makes it" if job.get("fallback") == "coordinator" else "waits for a runner"
        lines.append(
            f"{job.get('type')} {job.get('uuid')} (video {job.get('videoUUID')}): unclaimed since "
            f"{job.get('unclaimedSince')}; {then}"
        )
    return "\n".join(lines)


@contextmanager
def _client(
    url: str, admin_token: str, timeout: httpx.Timeout, transport: httpx.BaseTransport | None
) -> Iterator[httpx.Client]:
    if not url.startswith(("http://", "https://")):
        raise ClientError(f"the coordinator URL must start with http:// or https://: {url!r}")
    with httpx.Client(
        base_url=url.rstrip("/"),
        headers={"Authorization": f"Bearer {admin_token}"},
        timeout=timeout,
        transport=transport,
    ) as client:
        yield client


def _call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    try:
        response = client.request(method, path, **kwargs)
    except httpx.TimeoutException as exc:
        raise ClientError(f"the coordinator at {client.base_url} did not answer in time ({exc!r})") from exc
    except httpx.TransportError as exc:
        raise ClientError(f"cannot reach the coordinator at {client.base_url}: {exc}") from exc
    if response.status_code >= 400:
        raise ClientError(
            f"{method} {path} failed with {response.status_code}: {_detail(response)}", response.status_code
        )
    if response.status_code == 204 or not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        raise ClientError(f"{method} {path} answered something that is not JSON") from None


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
    detail = body.get("detail") if isinstance(body, dict) else None
    return detail if isinstance(detail, str) else response.text.strip()[:300]
