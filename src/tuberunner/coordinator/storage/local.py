"""Storage in a local folder (the default, `<data_dir>/files`): renames, no copies.

A key is a path under the folder; `_path` refuses anything that would leave it. Files are written under a
temporary name and renamed, so a reader sees the old content or the new one. Several coordinator processes
may share the folder only when it is one file system for all of them (one machine, or a network file
system); across machines, use object storage.
"""

from __future__ import annotations

import asyncio
import errno
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import NoReturn

import anyio

from tuberunner.coordinator.storage import (
    Storage,
    StorageMissing,
    StorageUnavailable,
    StoredObject,
    check_key,
)

_CHUNK = 256 * 1024


class LocalStorage(Storage):
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.description = str(self.root)

    async def start(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            _raise(str(self.root), exc)

    async def close(self) -> None:
        return None

    def _path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"key outside storage: {key}")
        return path

    def _stored(self, key: str, path: Path) -> StoredObject:
        try:
            stat = os.stat(path)
        except OSError as exc:
            _raise(key, exc)
        return StoredObject(
            key=key,
            size_bytes=stat.st_size,
            etag=f'W/"{stat.st_size:x}-{stat.st_mtime_ns:x}"',
            modified_at=stat.st_mtime,
        )

    async def put_file(self, key: str, path: Path) -> StoredObject:
        dest = self._path(key)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(path, dest)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                # Another file system: copy beside the destination, then rename.
                tmp = _temporary(dest)
                try:
                    await asyncio.to_thread(shutil.copyfile, path, tmp)
                    os.replace(tmp, dest)
                finally:
                    tmp.unlink(missing_ok=True)
                path.unlink(missing_ok=True)
        except OSError as exc:
            _raise(key, exc)
        return self._stored(key, dest)

    async def put_bytes(self, key: str, data: bytes) -> StoredObject:
        dest = self._path(key)
        tmp = _temporary(dest)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, dest)
        except OSError as exc:
            _raise(key, exc)
        finally:
            tmp.unlink(missing_ok=True)
        return self._stored(key, dest)

    async def stat(self, key: str) -> StoredObject:
        path = self._path(key)
        stored = self._stored(key, path)
        if not path.is_file():
            raise StorageMissing(f"{key} is not a file in {self.root}")
        return stored

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            async with await anyio.open_file(path, "rb") as handle:
                await handle.seek(start)
                remaining = None if end is None else end - start
                while remaining is None or remaining > 0:
                    chunk = await handle.read(_CHUNK if remaining is None else min(_CHUNK, remaining))
                    if not chunk:
                        break
                    if remaining is not None:
                        remaining -= len(chunk)
                    yield chunk
        except OSError as exc:
            _raise(key, exc)

    @asynccontextmanager
    async def local_file(self, key: str) -> AsyncIterator[Path]:
        await self.stat(key)
        yield self._path(key)

    async def move(self, src: str, dest: str) -> StoredObject:
        source, target = self._path(src), self._path(dest)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
        except OSError as exc:
            _raise(src, exc)
        return self._stored(dest, target)

    async def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            _raise(key, exc)

    async def delete_prefix(self, prefix: str) -> None:
        folder = self._path(prefix.rstrip("/"))
        await asyncio.to_thread(shutil.rmtree, folder, ignore_errors=True)

    async def check(self) -> str:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".readyz-{secrets.token_hex(4)}"
            try:
                probe.write_bytes(b"ok")
            finally:
                probe.unlink(missing_ok=True)
        except OSError as exc:
            _raise(".readyz", exc)
        return f"{self.root} is writable"


def _temporary(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")


def _raise(key: str, exc: OSError) -> NoReturn:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        raise StorageMissing(f"{key} is missing from storage") from exc
    raise StorageUnavailable(f"storage failed for {key}: {exc.strerror or exc}") from exc
