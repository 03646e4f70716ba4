"""Where the coordinator keeps files: one small interface, a local folder or S3-compatible object storage.

Every stored file has a key (a relative POSIX path); the database records keys, never paths:

    videos/<video uuid>/<name>           uploads, task files and assembled outputs of one video
    results/<job uuid>/<nonce>/<field>   files of an accepted `success`, until its completion has moved them

Nothing else in the coordinator touches the places files live. What it needs a local file for (probing
an upload or a result, building a preview) it gets through `local_file`: the file itself for the local
folder, a spooled copy for object storage. What it serves, it streams through `read`, or, when the store
can sign URLs (`presigned_get`), answers with a redirect so the bytes never cross the coordinator.

    StorageError                 the base class: storage failed for this key
    ├── StorageMissing           no file under this key (a 404 problem answer)
    └── StorageUnavailable       the store cannot be reached or refused the call (a 503 problem answer)

`open_storage` chooses the implementation once, at start-up, from `--storage` (a folder, or
`s3://BUCKET/PREFIX`).
"""

from __future__ import annotations

import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = [
    "Storage",
    "StorageError",
    "StorageMissing",
    "StorageUnavailable",
    "StoredObject",
    "check_key",
    "open_storage",
    "result_key",
    "result_prefix",
    "video_key",
    "video_prefix",
]

# Keys are built by the coordinator from UUIDs and its own names; a stored key is checked again on use.
_KEY: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}(?:/[A-Za-z0-9][A-Za-z0-9._-]{0,200}){0,8}$")


class StorageError(Exception):
    """Storage failed for a key (the message names the key and the cause)."""


class StorageMissing(StorageError):
    """Nothing is stored under this key."""


class StorageUnavailable(StorageError):
    """The store cannot be reached, timed out, or refused the call; the same call may work later."""


@dataclass(frozen=True, slots=True)
class StoredObject:
    key: str
    size_bytes: int
    # A validator that changes when the content does (runners compare it when they resume a download).
    etag: str
    modified_at: float


def check_key(key: str) -> str:
    if not _KEY.match(key) or ".." in key.split("/"):
        raise ValueError(f"not a storage key: {key!r}")
    return key


def video_prefix(video_uuid: str) -> str:
    return check_key(f"videos/{video_uuid}") + "/"


def video_key(video_uuid: str, name: str) -> str:
    return check_key(f"videos/{video_uuid}/{name}")


def result_prefix(job_uuid: str) -> str:
    return check_key(f"results/{job_uuid}") + "/"


def result_key(job_uuid: str, nonce: str | None, name: str) -> str:
    """A nonce per `success` call: two racing calls of one job never write the same keys."""
    return check_key(f"results/{job_uuid}/{nonce or secrets.token_hex(8)}/{name}")


class Storage(ABC):
    """Streaming put/get/url/delete of files by key. Every method raises StorageMissing or
    StorageUnavailable (never a library's own exception) and is bounded in time."""

    # What the logs and the readiness check call it (`/srv/data/files`, `s3://bucket/prefix`).
    description: str

    @abstractmethod
    async def start(self) -> None:
        """Open connections or create the folder (once, in the coordinator's lifespan)."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections."""

    @abstractmethod
    async def put_file(self, key: str, path: Path) -> StoredObject:
        """Store the local file `path` under `key` and take it (it is moved or uploaded, then removed).
        Readers see the old content or the new one, never part of it."""

    @abstractmethod
    async def put_bytes(self, key: str, data: bytes) -> StoredObject:
        """Store a small file (playlists, captions) whole."""

    @abstractmethod
    async def stat(self, key: str) -> StoredObject:
        """Size and validator of the file under `key`; StorageMissing when there is none."""

    async def exists(self, key: str) -> bool:
        try:
            await self.stat(key)
        except StorageMissing:
            return False
        return True

    @abstractmethod
    def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """The bytes `start` to `end` (exclusive; None: to the end) of the file, in chunks."""

    async def read_bytes(self, key: str, limit: int) -> bytes:
        """The whole file when it has at most `limit` bytes (else `limit + 1` bytes: the caller refuses)."""
        chunks: list[bytes] = []
        size = 0
        async for chunk in self.read(key, 0, limit + 1):
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)

    @abstractmethod
    def local_file(self, key: str) -> AbstractAsyncContextManager[Path]:
        """A local file with the content of `key`, for the inside of the `async with` only (probing)."""

    @abstractmethod
    async def move(self, src: str, dest: str) -> StoredObject:
        """Put the file of `src` under `dest` (replacing it) and remove `src`."""

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Remove one file; no error when it is already gone."""

    @abstractmethod
    async def delete_prefix(self, prefix: str) -> None:
        """Remove every file whose key starts with `prefix` (which ends with `/`)."""

    async def presigned_get(self, key: str, *, expires_s: float, filename: str | None = None) -> str | None:
        """A URL anyone may GET the file from for `expires_s`; None when the store cannot sign URLs (the
        coordinator then serves the bytes itself)."""
        return None

    async def presigned_put(self, key: str, *, expires_s: float) -> str | None:
        """A URL a runner may PUT a file to (the raw bytes as the body) for `expires_s`; None when the
        store cannot sign URLs."""
        return None

    @abstractmethod
    async def check(self) -> str:
        """Readiness: write and remove a small file; the answer says where."""


def open_storage(where: str | None, default_folder: Path, spool_dir: Path) -> Storage:
    """`s3://BUCKET/PREFIX` (endpoint, region and credentials from the usual AWS variables and files), a
    folder, or None for `default_folder`. `spool_dir` holds the local copies object storage hands out."""
    if where is not None and where.startswith("s3://"):
        try:
            from tuberunner.coordinator.storage.s3 import S3Storage
        except ImportError as exc:
            raise ValueError(f"{where} needs the S3 client: pip install 'tuberunner[s3]' ({exc})") from exc

        return S3Storage.from_url(where, spool_dir)
    from tuberunner.coordinator.storage.local import LocalStorage

    return LocalStorage(Path(where) if where else default_folder)
