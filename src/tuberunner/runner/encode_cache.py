"""Encodes this runner made, kept so that the same encode is never made twice (next to the input cache).

An HLS rendition and a web video of the same (input, resolution, fps) hold the same H.264 stream: the
encode options are the same (`media.commands`), only the container differs. So a web-video job leaves its
MP4 here, and an HLS job of the same key packages that MP4 with `-c copy` instead of encoding again. A
ladder job (the payload extension `tuberunnerLadder` of a Tuberunner coordinator, see
`coordinator.job_graph`) leaves every rung it encoded here, for the rung's web-video and HLS jobs.

Keys (`EncodeKey`) say exactly what the file is:

* `of_command`: the instance, the video, the SHA-256 of every input file, the ffmpeg binary and the whole
  web-video command with its paths left out (resolution, fps, bit rate cap, x264 and audio options...).
  An HLS job builds the web-video command it would correspond to on its own input and finds the entry only
  if everything is equal: any other input version, setting or ffmpeg encodes as before.
* `of_rung`: the instance, the video, the ladder's job and the rung (resolution, fps), plus the ffmpeg
  binary and settings. The coordinator names the ladder in the payloads of the rung's jobs; the rung was
  encoded from the ladder job's input, which the coordinator does not change while the video's jobs run.

Entries are files `ce-*` in `folder` (leftovers of an earlier process are removed at construction), put by
hard link (else copy) of a job's output and taken by hard link (else copy) into the taking job's folder, so
an eviction never pulls a file from under a running ffmpeg. Eviction: least recently used first above
`max_bytes`, and when idle longer than `max_idle_s`. One per runner process (shared by the one-shot mode's
runners), on one event loop; the file operations are short and synchronous.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CachedEncode", "EncodeCache", "EncodeKey", "file_sha256"]

log = logging.getLogger(__name__)

_PREFIX = "ce-"
_HASH_CHUNK_BYTES = 1024 * 1024
_CHECKSUMS_KEPT = 256


@dataclass(frozen=True)
class EncodeKey:
    instance: str  # the instance's URL as the runner knows it
    video_uuid: str
    digest: str  # what the file is, hashed (see the module docstring)

    @classmethod
    def of_command(
        cls, instance: str, video_uuid: str, input_sha256: Iterable[str], ffmpeg: Path, args: list[str]
    ) -> EncodeKey:
        return cls(instance, video_uuid, _digest(["command", *input_sha256, os.fspath(ffmpeg), *args]))

    @classmethod
    def of_rung(
        cls, instance: str, video_uuid: str, ladder: str, resolution: int, fps: int, settings: list[str]
    ) -> EncodeKey:
        return cls(instance, video_uuid, _digest(["rung", ladder, str(resolution), str(fps), *settings]))


def _digest(parts: list[str]) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


@dataclass(frozen=True)
class CachedEncode:
    path: Path  # the taker's own link or copy
    duration_s: float  # of the input the encode was made from (for the usual output check)


@dataclass
class _Entry:
    path: Path
    size_bytes: int
    duration_s: float
    last_used: float
    video: tuple[str, str] = field(default=("", ""))


@dataclass
class EncodeCacheStats:
    stored: int = 0
    reused: int = 0
    evictions: int = 0


class EncodeCache:
    def __init__(
        self,
        folder: Path,
        *,
        max_bytes: int,
        max_idle_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.max_idle_s = max_idle_s
        self.clock = clock
        self.stats = EncodeCacheStats()
        self._entries: dict[EncodeKey, _Entry] = {}
        # Checksums of input files, by (path, inode, size, mtime): the input cache never rewrites a file.
        self._checksums: dict[tuple[str, int, int, int], str] = {}
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in folder.glob(f"{_PREFIX}*"):
            if leftover.is_file():
                leftover.unlink(missing_ok=True)

    def put(self, key: EncodeKey, output: Path, *, duration_s: float) -> None:
        """Keep a copy of `output` (a job's finished encode) under `key`; a failure only logs."""
        target = self.folder / f"{_PREFIX}{key.video_uuid[:36]}-{key.digest[:24]}{output.suffix}"
        try:
            target.unlink(missing_ok=True)
            _link_or_copy(output, target)
            size = target.stat().st_size
        except OSError as exc:
            log.warning("could not keep the encode %s for reuse: %s", output.name, exc)
            target.unlink(missing_ok=True)
            return
        old = self._entries.pop(key, None)
        if old is not None and old.path != target:
            old.path.unlink(missing_ok=True)
        self._entries[key] = _Entry(
            target, size, duration_s, self.clock(), video=(key.instance, key.video_uuid)
        )
        self.stats.stored += 1
        self.prune()

    def take(self, key: EncodeKey, dest: Path) -> CachedEncode | None:
        """The encode kept under `key`, linked (or copied) to `dest`; None when there is none."""
        self.prune()
        entry = self._entries.get(key)
        if entry is None:
            return None
        try:
            dest.unlink(missing_ok=True)
            _link_or_copy(entry.path, dest)
        except OSError as exc:
            log.warning("the kept encode %s is unusable (%s); encoding again", entry.path.name, exc)
            self._drop(key)
            return None
        entry.last_used = self.clock()
        self.stats.reused += 1
        return CachedEncode(dest, entry.duration_s)

    async def input_sha256(self, path: Path) -> str:
        """SHA-256 of an input file, computed once per file version (in a thread)."""
        stat = path.stat()
        version = (os.fspath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        known = self._checksums.get(version)
        if known is None:
            known = await asyncio.to_thread(file_sha256, path)
            if len(self._checksums) >= _CHECKSUMS_KEPT:
                del self._checksums[next(iter(self._checksums))]
            self._checksums[version] = known
        return known

    def holds_video(self, instance: str, video_uuid: str) -> bool:
        return any(entry.video == (instance, video_uuid) for entry in self._entries.values())

    @property
    def size_bytes(self) -> int:
        return sum(entry.size_bytes for entry in self._entries.values())

    def prune(self) -> None:
        now = self.clock()
        total = self.size_bytes
        for key, entry in sorted(self._entries.items(), key=lambda item: item[1].last_used):
            if total <= self.max_bytes and now - entry.last_used < self.max_idle_s:
                continue
            total -= entry.size_bytes
            self.stats.evictions += 1
            self._drop(key)

    def _drop(self, key: EncodeKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            entry.path.unlink(missing_ok=True)


def _link_or_copy(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file (blocking: run it in a thread)."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
