"""Inputs shared by the jobs of one video: downloaded once, checked before each reuse, evicted by size.

A 1080p upload with six resolutions plus HLS means a dozen jobs reading the same `max-quality` file. Here
each such file is downloaded once per runner and shared.

Key. `(base URL, videoUUID, resource)`, parsed from the input URL
`<base>/api/v1/runners/jobs/<job>/files/videos/<videoUUID>/<resource>`, with resource one of `max-quality`,
`max-quality/audio`, `previews/max-quality`, `studio/task-files/<name>`. The job part is left out: every job
of the video gets the same bytes from its own URL, with its own token.

Freshness: the key alone is not safe. What a URL serves changes while a video's jobs run: the parent job
(optimize) reads the original upload, and on its success `max-quality` becomes the optimized output; with
web videos disabled, the max-resolution HLS job replaces it again (`deleteWebVideoFiles`); `max-quality/audio`
falls back to the video until the audio rendition exists; an admin can re-transcode or replace the file. Jobs
of other runners cause these changes, so no local event tells us, and the payload carries no version.
Hence each entry records the version it was downloaded as (size, ETag, Last-Modified as the server sent
them, see `transfers.InputVersion`), and a job that finds a complete entry it has not downloaded itself
first asks the server, with *its own* URL and token, for the last byte of the file (`Range: bytes=<size-1>-`:
one round trip, one byte; a server ignoring Range answers headers we read without the body). Same version:
the entry is used. Different version, a rejected range (the file shrank) or no comparable version (no
size announced): the entry is retired and the job downloads the file anew. Our coordinator sends no ETag,
so there the size alone decides; two different encodes of a video with the very same byte count would be
taken for each other, which we accept (see the report for an ETag in `file_responses.py`).

In-flight downloads. One asyncio.Lock per entry: the job holding it downloads, the others wait on it, then
find the file complete (and check it as above: the version may have changed while they waited). If the
downloading job is cancelled or fails (its job gone, its retries exhausted), the lock passes to the next
waiting job, which resumes from the bytes already on disk with its own credentials: a cancelled job loses
nothing for the others. No task is started on anyone's behalf.

Shared disk. A runner that runs beside its coordinator (`shared_disk`, the one-shot mode) takes an input
by a hard link to the coordinator's file when the coordinator hands it over, instead of downloading it; its
version is then that file's identity (inode, size, modification time), checked again the same way before
a reuse. Anything not handed over is downloaded as above.

References and eviction. A job holds a reference on each entry it asked for, from the moment it starts
waiting until its `inputs_for(job)` block ends (the supervisor scopes that to the job). Referenced entries
are never deleted. Unreferenced ones are deleted least recently used first while the cache holds more than
`max_bytes`, when idle longer than `max_idle_s` (checked on every fetch and release, and by `prune`), and at
once when retired or incomplete. Files live in `folder` as `ci-*`; leftovers of a previous process are
removed at construction, and nothing else in the folder is touched.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote, urlsplit

from tuberunner.runner.job import AcceptedJob
from tuberunner.runner.shared_disk import SharedDisk, link_or_copy
from tuberunner.runner.transfers import (
    DownloadLimits,
    InputSource,
    InputVersion,
    Transfer,
    read_version,
    resource_of,
)

__all__ = ["CacheKey", "CacheStats", "InputCache", "JobInputs"]

log = logging.getLogger(__name__)

_PREFIX = "ci-"
_RUNNER_JOBS = "/api/v1/runners/jobs/"


@dataclass(frozen=True)
class CacheKey:
    base_url: str  # scheme://host[:port][/prefix] of the instance, as the input URL names it
    video_uuid: str
    resource: str

    @classmethod
    def of(cls, url: str) -> CacheKey | None:
        parts = urlsplit(url)
        found = resource_of(url)
        if found is None or parts.query or parts.fragment:
            return None
        prefix = unquote(parts.path).split(_RUNNER_JOBS, 1)[0]
        return cls(f"{parts.scheme}://{parts.netloc.lower()}{prefix}", found[0].lower(), found[1])

    def file_stem(self, generation: int) -> str:
        digest = hashlib.sha256(f"{self.base_url}|{self.resource}".encode()).hexdigest()[:10]
        slug = re.sub(r"[^a-z0-9]+", "-", self.resource.rsplit(".", 1)[0].lower()).strip("-")[:40]
        return f"{_PREFIX}{self.video_uuid}-{slug}-{digest}-g{generation}"


def _describe(entry: _Entry, url: str) -> str:
    key = entry.key
    return f"input {key.resource} of video {key.video_uuid}" if key else f"input {url}"


@dataclass
class CacheStats:
    downloads: int = 0  # files downloaded completely
    linked: int = 0  # files taken from a shared disk instead
    hits: int = 0  # fetches served from an entry without downloading
    checks: int = 0  # version checks made before a reuse
    stale: int = 0  # entries retired because the server serves another version
    evictions: int = 0  # unreferenced entries deleted for size or idleness
    bytes_fetched: int = 0  # body bytes received from the network


class _Entry:
    def __init__(self, key: CacheKey | None, generation: int, stem: Path) -> None:
        self.key = key  # None: a private download that is never shared
        self.generation = generation
        self.transfer = Transfer(stem)
        self.lock = asyncio.Lock()
        # Holders (one per job run: a job re-accepted while its last run ends is two holders).
        self.refs: set[JobInputs] = set()
        self.path: Path | None = None  # set when complete
        self.version = InputVersion(size_bytes=None)
        self.size_bytes = 0
        self.last_used = 0.0  # set when complete, from the cache's clock
        self.retired = key is None
        self.linked = False  # taken from the shared disk (its version is the file's identity)
        # Holders known to read the current version (they downloaded or checked it).
        self.checked_by: set[JobInputs] = set()

    def delete_files(self) -> None:
        self.transfer.discard()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


class JobInputs:
    """The `InputFetcher` of one job through the cache; releases the job's references on exit."""

    def __init__(self, cache: InputCache, job: AcceptedJob) -> None:
        self.cache = cache
        self.job = job
        self._held: set[_Entry] = set()
        self._closed = False

    async def __call__(self, url: str) -> Path:
        if self._closed:
            raise RuntimeError(f"inputs of job {self.job.uuid} were already released")
        return await self.cache._fetch(self, url)

    def _hold(self, entry: _Entry) -> None:
        entry.refs.add(self)
        self._held.add(entry)

    def _drop(self, entry: _Entry) -> None:
        self._held.discard(entry)
        entry.refs.discard(self)
        entry.checked_by.discard(self)
        self.cache._forget_if_unused(entry)

    async def __aenter__(self) -> JobInputs:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closed = True
        for entry in list(self._held):
            self._drop(entry)
        self.cache._evict()


class InputCache:
    """See the module docstring. One per runner process (all instances), on one event loop."""

    def __init__(
        self,
        source: InputSource,
        folder: Path,
        *,
        max_bytes: int,
        max_idle_s: float = 3600.0,
        limits: DownloadLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
        shared_disk: SharedDisk | None = None,
    ) -> None:
        self.source = source
        self.shared_disk = shared_disk
        self.folder = folder
        self.max_bytes = max_bytes
        self.max_idle_s = max_idle_s
        self.limits = limits or DownloadLimits()
        self.clock = clock
        self.stats = CacheStats()
        self._entries: dict[CacheKey, _Entry] = {}
        # Entries that hold files: the current ones and retired ones still referenced.
        self._live: set[_Entry] = set()
        self._generation = 0
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in folder.glob(f"{_PREFIX}*"):
            if leftover.is_file():
                leftover.unlink(missing_ok=True)

    def inputs_for(self, job: AcceptedJob) -> JobInputs:
        """`async with cache.inputs_for(job) as fetch_input:` — the job's fetcher, released on exit."""
        return JobInputs(self, job)

    @property
    def size_bytes(self) -> int:
        return sum(entry.size_bytes for entry in self._live if entry.path is not None)

    def holds_video(self, video_uuid: str) -> bool:
        """Whether a complete input of `video_uuid` is here (its other jobs would not download it)."""
        return any(
            key.video_uuid == video_uuid and entry.path is not None for key, entry in self._entries.items()
        )

    def prune(self) -> None:
        """Delete idle entries now (the supervisor may call this from its periodic tick)."""
        self._evict()

    # ------------------------------------------------------------------ fetching

    async def _fetch(self, holder: JobInputs, url: str) -> Path:
        key = CacheKey.of(url)
        job = holder.job
        while True:
            entry = self._current(key)
            holder._hold(entry)
            try:
                async with entry.lock:
                    if entry.retired and entry.key is not None:
                        # Replaced while we waited: go to the current entry.
                        holder._drop(entry)
                        continue
                    if entry.path is not None:
                        if holder in entry.checked_by or await self._still_served(entry, job, url):
                            entry.checked_by.add(holder)
                            entry.last_used = self.clock()
                            self.stats.hits += 1
                            return entry.path
                        log.info("%s changed on the server; downloading it again", _describe(entry, url))
                        self.stats.stale += 1
                        self._retire(entry)
                        holder._drop(entry)
                        continue
                    return await self._download(entry, holder, url)
            finally:
                # The lock is free now: an entry retired or left incomplete that nobody holds goes.
                self._forget_if_unused(entry)

    def _current(self, key: CacheKey | None) -> _Entry:
        if key is not None and key in self._entries:
            return self._entries[key]
        self._generation += 1
        stem = self.folder / (
            key.file_stem(self._generation) if key else f"{_PREFIX}private-g{self._generation}"
        )
        entry = _Entry(key, self._generation, stem)
        if key is not None:
            self._entries[key] = entry
        self._live.add(entry)
        return entry

    async def _still_served(self, entry: _Entry, job: AcceptedJob, url: str) -> bool:
        if entry.linked:
            source = await self.shared_disk.input_file(url, job) if self.shared_disk else None
            self.stats.checks += 1
            try:
                return source is not None and _identity(source) == entry.version
            except OSError:  # replaced or removed meanwhile
                return False
        if not entry.version.comparable or entry.size_bytes <= 0:
            return False
        self.stats.checks += 1
        served = await read_version(
            self.source, job, url, probe_offset=entry.size_bytes - 1, limits=self.limits
        )
        return served is not None and served == entry.version

    async def _download(self, entry: _Entry, holder: JobInputs, url: str) -> Path:
        source = await self.shared_disk.input_file(url, holder.job) if self.shared_disk else None
        if source is not None:
            try:
                return await self._link(entry, holder, source)
            except OSError as exc:  # replaced or removed meanwhile, say: the server knows what is current
                log.info("%s not taken from the shared disk (%s); downloading it", _describe(entry, url), exc)
        before = entry.transfer.bytes_fetched
        try:
            downloaded = await entry.transfer.run(self.source, holder.job, url, self.limits)
        finally:
            self.stats.bytes_fetched += entry.transfer.bytes_fetched - before
        entry.path = downloaded.path
        entry.version = downloaded.version
        entry.size_bytes = downloaded.size_bytes
        entry.last_used = self.clock()
        entry.checked_by.add(holder)
        self.stats.downloads += 1
        self._evict()
        return downloaded.path

    async def _link(self, entry: _Entry, holder: JobInputs, source: Path) -> Path:
        path = entry.transfer.stem.with_name(entry.transfer.stem.name + source.suffix)
        await link_or_copy(source, path)
        entry.path = path
        entry.linked = True
        # The identity of what we hold (a copy has its own: it is then taken again on the next reuse).
        entry.version = _identity(path)
        entry.size_bytes = path.stat().st_size
        entry.last_used = self.clock()
        entry.checked_by.add(holder)
        self.stats.linked += 1
        self._evict()
        return path

    # ------------------------------------------------------------------ lifetimes

    def _retire(self, entry: _Entry) -> None:
        entry.retired = True
        if entry.key is not None and self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        self._forget_if_unused(entry)

    def _forget_if_unused(self, entry: _Entry) -> None:
        """Delete the files of an entry nobody holds when it is retired or incomplete."""
        if entry.refs or entry.lock.locked():
            return
        if entry.retired or entry.path is None:
            entry.delete_files()
            self._live.discard(entry)
            if entry.key is not None and self._entries.get(entry.key) is entry:
                del self._entries[entry.key]

    def _evict(self) -> None:
        for entry in list(self._live):
            self._forget_if_unused(entry)
        now = self.clock()
        idle = [
            entry
            for entry in self._live
            if entry.path is not None and not entry.refs and not entry.lock.locked()
        ]
        idle.sort(key=lambda entry: entry.last_used)
        total = self.size_bytes
        for entry in idle:
            if total <= self.max_bytes and now - entry.last_used < self.max_idle_s:
                continue
            total -= entry.size_bytes
            self.stats.evictions += 1
            entry.retired = True
            self._forget_if_unused(entry)


def _identity(path: Path) -> InputVersion:
    """A file's version on the shared disk: the coordinator never rewrites a file, it renames a new one
    over it, so (inode, size, modification time) changes whenever the content does."""
    stat = path.stat()
    return InputVersion(size_bytes=stat.st_size, etag=f"inode {stat.st_ino}-{stat.st_mtime_ns}")
