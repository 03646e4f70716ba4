"""Input downloads: streamed to a partial file, resumed after a cut, checked, then moved into place.

One download is a `Transfer`: the bytes already on disk (`<name>.part`) and the version of the remote file
they belong to. Each attempt asks the source for the input from `offset = bytes on disk`; the source is the
API client (`InputSource.open_input`: POST with the job's tokens, `Range: bytes=<offset>-` when offset > 0,
taxonomy errors for status >= 400 and transport failures).

    attempt ──► 206 with Content-Range starting at offset, same version ──► append
            ├─► 200 (Range ignored) ───────────────────────────────────────► truncate, write from byte 0
            ├─► 206 for another range, or another version (size/ETag/Last-Modified changed)
            │                                      ──► truncate, TransientError: next attempt from byte 0
            ├─► cut mid-body (reset, timeout, early EOF) ──► keep the bytes, TransientError: next attempt
            │                                                 resumes with Range
            └─► ENOSPC/EDQUOT ──► partial removed, JobFailed("Not enough disk space ...")

Attempts are run by `RetryPolicy.run` (only TransientError is retried). Every attempt is bounded: opening
by `connect_s + read_s`, then `read_s` between two chunks (a black-holed connection is a cut, not a hang).
The whole download is bounded by `DownloadLimits.total_s(size)`: a base plus the size at a minimum rate,
known once the first answer announced the size. When all is received, the length is checked against
Content-Length / Content-Range total, the file is fsynced and renamed atomically; nobody ever sees a
half-written input under its final name.

A Transfer outlives a cancelled `run`: the bytes on disk stay, and another caller (the input cache hands a
download over to the next job waiting for it) resumes them with its own credentials.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import math
import mimetypes
import os
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import unquote, urlsplit

import httpx

from tuberunner.runner.errors import JobFailed, RequestRejected, TransientError, translated
from tuberunner.runner.job import AcceptedJob
from tuberunner.runner.retry import Deadlines, RetryPolicy

__all__ = [
    "DownloadLimits",
    "Downloaded",
    "InputDownloader",
    "InputSource",
    "InputVersion",
    "Transfer",
    "read_version",
    "resource_of",
    "result_content_type",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Bytes gathered before one write to disk (the write runs in a worker thread).
_WRITE_BUFFER_BYTES = 1024 * 1024
# Most buffers one writev accepts (IOV_MAX, 1024 on Linux).
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
# `/api/v1/runners/jobs/<job>/files/videos/<video>/<resource>` (spec §3.9).
_INPUT_PATH = re.compile(
    r"/api/v1/runners/jobs/[^/]+/files/videos/(?P<video>[0-9A-Za-z-]{1,100})/"
    r"(?P<resource>max-quality|max-quality/audio|previews/max-quality|studio/task-files/[a-z0-9-]+\.[a-z0-9]{1,8})$"
)
_EXTENSIONS = {
    "video/mp4": ".mp4",
    "audio/mp4": ".m4a",
    "video/webm": ".webm",
    "video/quicktime": ".mov",
    "video/x-matroska": ".mkv",
    "audio/mpeg": ".mp3",
    "audio/ogg": ".ogg",
    "audio/wav": ".wav",
    "audio/x-wav": ".wav",
    "image/jpeg": ".jpg",
    "image/png": ".png",
    "image/webp": ".webp",
}


class InputSource(Protocol):
    """What the downloader needs from the API client (`InstanceClient` in client.py has this method)."""

    def open_input(
        self, url: str, job: AcceptedJob, offset: int
    ) -> AbstractAsyncContextManager[httpx.Response]:
        """A streaming answer for `url` from byte `offset`; raises taxonomy errors for status >= 400."""
        ...


@dataclass(frozen=True)
class InputVersion:
    """Which remote file some bytes belong to: its size and the validators the server gave.

    Two answers describe the same file only if all three agree. A server that gives no size cannot be
    resumed safely (nor can its file be shared by the input cache)."""

    size_bytes: int | None
    etag: str | None = None
    last_modified: str | None = None

    @property
    def comparable(self) -> bool:
        return self.size_bytes is not None


@dataclass(frozen=True)
class DownloadLimits:
    """Deadlines of one input download. Per attempt: `deadlines.connect_s + read_s` to get the answer,
    then at most `read_s` between two chunks. Whole download (all attempts): `total_s(size)`."""

    deadlines: Deadlines = field(default_factory=Deadlines)
    retry: RetryPolicy = field(
        default_factory=lambda: RetryPolicy(attempts=8, base_delay_s=0.5, max_delay_s=15.0)
    )
    # Whole download: base_s + size / min_rate_bytes_per_s (base_s alone until the size is known).
    base_s: float = 120.0
    min_rate_bytes_per_s: float = 256 * 1024

    def total_s(self, size_bytes: int | None) -> float:
        if not size_bytes:
            return self.base_s
        return self.base_s + size_bytes / self.min_rate_bytes_per_s

    @property
    def open_s(self) -> float:
        return self.deadlines.connect_s + self.deadlines.read_s


@dataclass(frozen=True)
class Downloaded:
    path: Path
    version: InputVersion
    size_bytes: int


def resource_of(url: str) -> tuple[str, str] | None:
    """(videoUUID, resource) of a runner input URL, e.g. ("9c1…", "max-quality/audio"); None otherwise."""
    match = _INPUT_PATH.search(unquote(urlsplit(url).path))
    if match is None:
        return None
    return match.group("video"), match.group("resource")


def result_content_type(field_name: str, path: Path) -> str:
    """MIME type to send a result file with (spec §3.10: the server derives the stored extension from it)."""
    suffix = path.suffix.lower()
    by_suffix = {
        ".mp4": "video/mp4",
        ".m3u8": "application/vnd.apple.mpegurl",
        ".vtt": "text/vtt",
        ".ts": "video/mp2t",
        ".jpg": "image/jpeg",
        ".jpeg": "image/jpeg",
        ".png": "image/png",
    }
    if suffix in by_suffix:
        return by_suffix[suffix]
    by_field = {
        "videoFile": "video/mp4",
        "resolutionPlaylistFile": "application/vnd.apple.mpegurl",
        "masterPlaylistFile": "application/vnd.apple.mpegurl",
        "vttFile": "text/vtt",
        "videoChunkFile": "video/mp2t",
        "storyboardFile": "image/jpeg",
    }
    return by_field.get(field_name, "application/octet-stream")


def _extension(response: httpx.Response, url: str) -> str:
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in _EXTENSIONS:
        return _EXTENSIONS[content_type]
    name_suffix = Path(urlsplit(url).path).suffix.lower()
    if re.fullmatch(r"\.[a-z0-9]{1,8}", name_suffix):
        return name_suffix
    guessed = mimetypes.guess_extension(content_type) if content_type else None
    return guessed if guessed and guessed != ".bin" else ""


def _version(response: httpx.Response, size_bytes: int | None) -> InputVersion:
    return InputVersion(
        size_bytes=size_bytes,
        etag=response.headers.get("etag"),
        last_modified=response.headers.get("last-modified"),
    )


@dataclass(frozen=True)
class _Answer:
    """What an answer to `offset` says: where its body starts and ends, and the file's version."""

    start: int
    end: int | None  # exclusive; None when unknown
    version: InputVersion
    decoded: bool  # a Content-Encoding is applied: byte offsets are not file offsets


def _interpret(response: httpx.Response, offset: int, what: str) -> _Answer:
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    decoded = encoding not in ("", "identity")
    length_header = response.headers.get("content-length")
    length = int(length_header) if length_header and length_header.isdigit() else None
    if response.status_code == 206:
        match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
        if match is None:
            raise TransientError(f"{what}: 206 answer without a usable Content-Range")
        first, last, total = int(match.group(1)), int(match.group(2)), match.group(3)
        size = None if total == "*" else int(total)
        return _Answer(first, last + 1, _version(response, size), decoded)
    if response.status_code == 200:
        size = None if decoded else length
        return _Answer(0, size, _version(response, size), decoded)
    raise RequestRejected(f"{what}: unexpected answer {response.status_code} {response.reason_phrase}")


async def read_version(
    source: InputSource, job: AcceptedJob, url: str, *, probe_offset: int, limits: DownloadLimits
) -> InputVersion | None:
    """The version the server serves now, asking for the bytes from `probe_offset` (so a server honouring
    Range sends only `size - probe_offset` bytes) and reading no body. None when the server rejects the
    range (the file shrank) or tells nothing comparable."""
    what = f"checking {_describe(url)}"

    async def check() -> InputVersion | None:
        try:
            async with asyncio.timeout(limits.open_s):
                async with source.open_input(url, job, probe_offset) as response:
                    version = _interpret(response, probe_offset, what).version
                    if response.status_code == 206 and (version.size_bytes or 0) - probe_offset <= 64 * 1024:
                        await response.aread()  # a few bytes: read them, so the connection can be reused
                    return version
        except TimeoutError:
            raise TransientError(f"{what}: no answer within {limits.open_s:g} s") from None
        except RequestRejected:
            # 416 and its kind: whatever it is, the file we hold is not what is served any more.
            return None

    return await limits.retry.run(check, what=what, deadline_s=limits.base_s)


def _describe(url: str) -> str:
    found = resource_of(url)
    return f"input {found[1]} of video {found[0]}" if found else f"input {urlsplit(url).path}"


async def _in_thread(call: Callable[[], T]) -> T:
    """Run blocking file I/O in the default executor. If the caller is cancelled, the call is still waited
    for before the cancellation goes on, so nobody touches the file while a write is half done."""
    future = asyncio.get_running_loop().run_in_executor(None, call)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            try:
                await asyncio.wait([future])
            except asyncio.CancelledError:
                continue
        raise


class Transfer:
    """One resumable download into `<stem><extension>`, through `<stem>.part`.

    `run` may be called again after a cancelled or failed run (by the same or another job): it resumes
    from the bytes on disk when the server still serves the same version. `discard` removes the partial.
    """

    def __init__(self, stem: Path) -> None:
        self.stem = stem
        self.partial = stem.with_name(stem.name + ".part")
        self.written = 0
        self.version: InputVersion | None = None
        self.bytes_fetched = 0  # body bytes received from the network, all attempts, all runs
        self.attempts = 0
        self._extension = ""
        # Set by `_finish` (in its thread): a run cancelled after the rename still finds the file done.
        self._done: Downloaded | None = None

    def discard(self) -> None:
        self.partial.unlink(missing_ok=True)
        self.written = 0
        self.version = None
        self._done = None

    async def run(
        self, source: InputSource, job: AcceptedJob, url: str, limits: DownloadLimits
    ) -> Downloaded:
        """Download (or finish downloading) `url` for `job`; returns the complete file in place.

        Raises TransientError when attempts or the total deadline ran out (the partial stays for a later
        run), JobGone / RequestRejected / RunnerUnknown from the source as they come, and JobFailed for a
        full disk (partial removed) or a local write error."""
        what = f"downloading {_describe(url)}"
        if self._done is not None and self._done.path.exists():
            return self._done
        try:
            async with asyncio.timeout(None) as whole:
                deadline = _TotalDeadline(whole, limits)
                deadline.size_known(self.version.size_bytes if self.version else None)
                await limits.retry.run(
                    lambda: self._attempt(source, job, url, limits, deadline, what),
                    what=what,
                    deadline_s=math.inf,  # the whole-download deadline above is the bound
                )
        except TimeoutError:
            if not whole.expired():
                raise
            raise TransientError(
                f"{what}: not finished after {deadline.limit_s:.0f} s ({self.written} bytes received)"
            ) from None
        try:
            return await _in_thread(self._finish)
        except OSError as exc:
            raise self._write_error(exc, what) from exc
        except JobFailed:
            self.discard()  # bytes that do not add up to the file: never resume from them
            raise

    async def _attempt(
        self,
        source: InputSource,
        job: AcceptedJob,
        url: str,
        limits: DownloadLimits,
        deadline: _TotalDeadline,
        what: str,
    ) -> None:
        """Fetch ranges until the file is complete; raises TransientError on a cut (bytes kept)."""
        while not self._complete_on_disk():
            self.attempts += 1
            if await self._fetch_range(source, job, url, limits, deadline, what):
                return

    def _complete_on_disk(self) -> bool:
        size = self.version.size_bytes if self.version is not None else None
        return size is not None and self.written >= size > 0

    async def _fetch_range(
        self,
        source: InputSource,
        job: AcceptedJob,
        url: str,
        limits: DownloadLimits,
        deadline: _TotalDeadline,
        what: str,
    ) -> bool:
        """One request from the bytes on disk; True when the file is complete."""
        loop = asyncio.get_running_loop()
        # Bytes of an unknown version cannot be continued: ask for everything again.
        offset = self.written if self.version is not None else 0
        idle = asyncio.timeout(limits.open_s)
        try:
            async with idle, source.open_input(url, job, offset) as response:
                answer = _interpret(response, offset, what)
                self._check_answer(answer, offset, what)
                deadline.size_known(answer.version.size_bytes)
                self._extension = _extension(response, url)
                chunks = response.aiter_bytes() if answer.decoded else response.aiter_raw()
                idle.reschedule(loop.time() + limits.deadlines.read_s)
                await self._write_body(chunks, answer, idle, limits.deadlines.read_s, what)
        except TimeoutError:
            if not idle.expired():
                raise
            raise TransientError(
                f"{what}: no data for {limits.deadlines.read_s:g} s at byte {self.written}"
            ) from None
        except RequestRejected as exc:
            if offset == 0:
                raise
            # Only the Range differs from a plain request: whatever the server disliked (416 when the
            # file shrank), start again without it; a real rejection comes back then.
            self.written = 0
            self.version = None
            raise TransientError(f"{what}: resume at byte {offset} rejected ({exc})") from exc
        return self._check_length(answer, what)

    def _check_answer(self, answer: _Answer, offset: int, what: str) -> None:
        resumable = answer.version.comparable and not answer.decoded
        if answer.start == 0:
            if offset > 0:
                log.info("%s: the server ignored Range at byte %d; starting again from 0", what, offset)
            self.written = 0
            self.version = answer.version if resumable else None
            return
        if answer.start != offset or self.version is None or answer.version != self.version:
            # Another range than asked, or the file changed on the server: these bytes are worthless.
            self.written = 0
            self.version = None
            raise TransientError(
                f"{what}: the server answered bytes from {answer.start} of {answer.version} to a request "
                f"from byte {offset} of {self.version}; starting again from 0"
            )

    async def _write_body(
        self,
        chunks: AsyncIterator[bytes],
        answer: _Answer,
        idle: asyncio.Timeout,
        read_s: float,
        what: str,
    ) -> None:
        loop = asyncio.get_running_loop()
        handle = await self._open_partial(what)
        buffer = _Chunks()
        # Moving the idle deadline costs a timer per call: do it a few times per `read_s`, not per chunk.
        # The deadline then fires between read_s and 1.25 x read_s after the last byte.
        reschedule_every_s = read_s / 4
        rescheduled_at = loop.time()
        try:
            with translated(what):
                async for chunk in chunks:
                    now = loop.time()
                    if now - rescheduled_at >= reschedule_every_s:
                        idle.reschedule(now + read_s)
                        rescheduled_at = now
                    self.bytes_fetched += len(chunk)
                    buffer.add(chunk)
                    if answer.end is not None and self.written + buffer.size > answer.end:
                        buffer.clear()
                        self.written = 0
                        self.version = None
                        raise TransientError(
                            f"{what}: the server sent more than the {answer.end - answer.start} bytes it "
                            "announced; starting again from 0"
                        )
                    if buffer.size >= _WRITE_BUFFER_BYTES:
                        await self._flush(handle, buffer, what)
            await self._flush(handle, buffer, what)
        except (TransientError, asyncio.CancelledError):
            # A cut, the idle deadline or a cancellation: keep what arrived, so whoever runs this transfer
            # next resumes after these bytes.
            if self.version is not None:
                await self._flush(handle, buffer, what)
            raise
        finally:
            await _in_thread(handle.close)

    async def _open_partial(self, what: str) -> _Partial:
        written = self.written

        def open_at() -> _Partial:
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                position = min(written, size)
                os.ftruncate(fd, position)
                os.lseek(fd, position, os.SEEK_SET)
            except BaseException:
                os.close(fd)
                raise
            return _Partial(fd, position)

        try:
            partial = await _in_thread(open_at)
        except OSError as exc:
            raise self._write_error(exc, what) from exc
        self.written = partial.position
        return partial

    async def _flush(self, handle: _Partial, buffer: _Chunks, what: str) -> None:
        """Write and empty `buffer`. `written` follows the file even when the caller is cancelled meanwhile
        (`_in_thread` lets the write finish), so no byte is ever written twice."""
        if not buffer.size:
            return
        parts = buffer.take()
        try:
            await _in_thread(functools.partial(handle.write_all, parts))
        except OSError as exc:
            raise self._write_error(exc, what) from exc
        except asyncio.CancelledError:
            self.written = handle.position
            raise
        self.written = handle.position

    def _check_length(self, answer: _Answer, what: str) -> bool:
        if answer.end is None:
            # No length announced (chunked, or encoded): a clean end is all we can check.
            return True
        if self.written < answer.end:
            raise TransientError(f"{what}: connection ended at byte {self.written} of {answer.end}")
        size = answer.version.size_bytes
        # A server may answer a shorter range than asked: ask for the rest.
        return size is None or self.written >= size

    def _finish(self) -> Downloaded:
        fd = os.open(self.partial, os.O_RDONLY)
        try:
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        expected = self.version.size_bytes if self.version else None
        if expected is not None and size != expected:
            raise JobFailed(f"downloaded input has {size} bytes instead of {expected}")
        target = self.stem.with_name(self.stem.name + self._extension)
        os.replace(self.partial, target)
        _fsync_dir(target.parent)
        self._done = Downloaded(path=target, version=self.version or InputVersion(None), size_bytes=size)
        self.written = 0
        return self._done

    def _write_error(self, exc: OSError, what: str) -> JobFailed:
        if exc.errno in _DISK_FULL:
            self.discard()
            return JobFailed(
                f"Not enough disk space to download an input ({what}) into {self.partial.parent}: "
                f"{exc.strerror or exc}"
            )
        return JobFailed(f"{what}: cannot write {self.partial}: {exc.strerror or exc}")


@dataclass
class _Partial:
    """An open partial file positioned at its end."""

    fd: int
    position: int

    def write_all(self, parts: list[bytes]) -> None:
        """Write every part, in order, without joining them first (writev); retries short writes."""
        views = [memoryview(part) for part in parts if part]
        while views:
            written = os.writev(self.fd, views[:_IOV_MAX])
            self.position += written
            while views and written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            if views and written:
                views[0] = views[0][written:]

    def close(self) -> None:
        os.close(self.fd)


class _Chunks:
    """Received chunks waiting to be written, kept as they came (no copy)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, chunk: bytes) -> None:
        self.parts.append(chunk)
        self.size += len(chunk)

    def take(self) -> list[bytes]:
        parts, self.parts, self.size = self.parts, [], 0
        return parts

    def clear(self) -> None:
        self.take()


class _TotalDeadline:
    """The whole-download deadline: base time until the size is known, then scaled to the size."""

    def __init__(self, timeout: asyncio.Timeout, limits: DownloadLimits) -> None:
        self._timeout = timeout
        self._started_loop = asyncio.get_running_loop().time()
        self._limits = limits
        self.limit_s = limits.total_s(None)
        self._size: int | None = None
        self._timeout.reschedule(self._started_loop + self.limit_s)

    def size_known(self, size_bytes: int | None) -> None:
        if size_bytes is None or size_bytes == self._size:
            return
        self._size = size_bytes
        self.limit_s = self._limits.total_s(size_bytes)
        self._timeout.reschedule(self._started_loop + self.limit_s)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _slug(url: str) -> str:
    found = resource_of(url)
    text = found[1] if found else urlsplit(url).path.rsplit("/", 1)[-1]
    text = text.removeprefix("studio/").rsplit(".", 1)[0]
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "input"


class InputDownloader:
    """`InputFetcher` of one job without a shared cache: each URL is downloaded once into `folder`.

    Files stay in `folder` (the job's work dir) and go with it."""

    def __init__(
        self, source: InputSource, job: AcceptedJob, folder: Path, limits: DownloadLimits | None = None
    ) -> None:
        self.source = source
        self.job = job
        self.folder = folder
        self.limits = limits or DownloadLimits()
        self._done: dict[str, Path] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def __call__(self, url: str) -> Path:
        lock = self._locks.setdefault(url, asyncio.Lock())
        async with lock:
            if url in self._done:
                return self._done[url]
            stem = self.folder / f"input-{len(self._done) + 1}-{_slug(url)}"
            transfer = Transfer(stem)
            try:
                downloaded = await transfer.run(self.source, self.job, url, self.limits)
            except BaseException:
                transfer.discard()
                raise
            self._done[url] = downloaded.path
            return downloaded.path
