"""The runner's one error taxonomy (DESIGN principle 2). Callers branch on the class, never on codes.

    RunnerError
    ├── TransientError      connection refused/reset, timeouts, 5xx, 429: retry with backoff, bounded;
    │                       `server_answered` tells a server that is up and failing (500, 429) from one
    │                       that could not be reached (no answer, or a proxy's 502/503/504)
    ├── JobGone             404 `Unknown runner job`, 400 `runner_job_not_in_processing_state`, lost accept
    │                       race: the job is not ours any more; kill its work at once, never retry
    ├── RunnerUnknown       `unknown_runner_token`: the instance needs re-registration; others go on
    ├── RequestRejected     any other 4xx: our bug or a bad request; report, never loop
    └── JobFailed           the work itself failed (bad input, ffmpeg, disk full): report with `error`

httpx exceptions and HTTP answers are translated here, once (`translated`, `error_from_response`), with
`raise ... from` so the original stays attached.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from tuberunner.protocol.errors import ErrorCode


class RunnerError(Exception):
    """Base of every error the runner acts on."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


class TransientError(RunnerError):
    """Worth retrying: the other side may answer later."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, status=status, code=code)
        self.retry_after_s = retry_after_s

    @property
    def server_answered(self) -> bool:
        """The server itself answered (it is up: PeerTube's stale-job watchdog runs). No answer at all, or
        a gateway's 502/503/504 (the proxy in front answers while the server is down), is an outage."""
        return self.status is not None and self.status not in _GATEWAY_STATUSES


# What a reverse proxy answers when the server behind it is down or restarting.
_GATEWAY_STATUSES = frozenset({502, 503, 504})


class JobGone(RunnerError):
    """The server no longer lets us work on this job."""


class RunnerUnknown(RunnerError):
    """The instance does not know our runner token any more."""


class RequestRejected(RunnerError):
    """A 4xx that retrying cannot fix."""


class JobFailed(RunnerError):
    """Processing failed; the message is what the server is told (1-5000 characters)."""


def _problem(response: httpx.Response) -> tuple[str, str | None]:
    """(message, code) of a problem document; falls back to the status line for other bodies."""
    try:
        body = json.loads(response.content) if response.content else {}
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    message = body.get("detail") or body.get("error") or response.reason_phrase or "HTTP error"
    code = body.get("code")
    return str(message)[:1000], code if isinstance(code, str) else None


def error_from_response(response: httpx.Response, *, context: str) -> RunnerError:
    """Classify an answer with status >= 400 (the body must have been read)."""
    status = response.status_code
    message, code = _problem(response)
    text = f"{context}: {status} {message}"
    if code == ErrorCode.UNKNOWN_RUNNER_TOKEN:
        return RunnerUnknown(text, status=status, code=code)
    if code in (ErrorCode.JOB_NOT_IN_PROCESSING_STATE, ErrorCode.JOB_NOT_IN_PENDING_STATE):
        return JobGone(text, status=status, code=code)
    if status == 404 and message == "Unknown runner job":
        return JobGone(text, status=status, code=code)
    if status == 409:
        # A lost accept race without a code (other implementations): the job is someone else's.
        return JobGone(text, status=status, code=code)
    if status in (408, 425, 429) or status >= 500:
        retry_after = response.headers.get("retry-after")
        delay = float(retry_after) if retry_after and retry_after.isdigit() else None
        return TransientError(text, status=status, code=code, retry_after_s=delay)
    return RequestRejected(text, status=status, code=code)


@contextmanager
def translated(context: str) -> Iterator[None]:
    """Turn transport failures into TransientError (connection, timeouts, protocol breaks)."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise TransientError(f"{context}: timed out ({type(exc).__name__})") from exc
    except (httpx.TransportError, httpx.StreamError) as exc:
        raise TransientError(f"{context}: {type(exc).__name__}: {exc}") from exc
