"""Storage in an S3-compatible bucket (AWS, MinIO, Ceph RGW, Garage, ...) through aiobotocore.

`s3://BUCKET/PREFIX`: the endpoint, region and credentials come from what every AWS tool reads
(`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, the
`~/.aws/config` and `credentials` files, instance roles); `?addressing=path` forces path-style requests
(most self-hosted servers want them). botocore signs every request and every presigned URL.

Nothing is held whole in memory: a file is uploaded in parts of `PART_BYTES` (one part in memory at a
time; a smaller file in one PUT), reads stream in chunks, and what the coordinator must open locally
(`local_file`) is downloaded to the spool folder and removed after use.

Every call has a connect and a read deadline and botocore's standard retries (3 attempts, backoff); what
still fails becomes StorageUnavailable, or StorageMissing for a key the bucket does not have.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn
from urllib.parse import parse_qs, urlsplit

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from tuberunner.coordinator.storage import (
    Storage,
    StorageMissing,
    StorageUnavailable,
    StoredObject,
    check_key,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

PART_BYTES: Final = 16 * 1024 * 1024
# S3 copies at most 5 GiB in one call; larger files are copied in parts of this size.
_COPY_LIMIT_BYTES: Final = 5 * 1024**3
_COPY_PART_BYTES: Final = 1024**3
_READ_CHUNK: Final = 256 * 1024
_MISSING_CODES: Final = frozenset({"404", "NoSuchKey", "NotFound"})


@dataclass(frozen=True)
class S3Deadlines:
    connect_s: float = 5.0
    read_s: float = 60.0
    attempts: int = 3


class S3Storage(Storage):
    def __init__(
        self,
        bucket: str,
        prefix: str,
        spool_dir: Path,
        *,
        addressing: str | None = None,
        deadlines: S3Deadlines = S3Deadlines(),
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.spool_dir = spool_dir
        self.description = f"s3://{bucket}/{prefix}"
        self._config = AioConfig(
            connect_timeout=deadlines.connect_s,
            read_timeout=deadlines.read_s,
            retries={"max_attempts": deadlines.attempts, "mode": "standard"},
            s3={"addressing_style": addressing} if addressing else None,
            signature_version="s3v4",
        )
        self._stack = AsyncExitStack()
        self._client: S3Client | None = None

    @classmethod
    def from_url(cls, url: str, spool_dir: Path) -> S3Storage:
        parts = urlsplit(url)
        if not parts.netloc:
            raise ValueError(f"no bucket in {url!r}: use s3://BUCKET/PREFIX")
        prefix = parts.path.strip("/")
        if prefix:
            check_key(prefix)
        addressing = parse_qs(parts.query).get("addressing", [None])[0]
        if addressing not in (None, "path", "virtual", "auto"):
            raise ValueError(f"addressing={addressing}: path, virtual or auto")
        return cls(parts.netloc, prefix + "/" if prefix else "", spool_dir, addressing=addressing)

    async def start(self) -> None:
        if self._client is None:
            session = get_session()
            self._client = await self._stack.enter_async_context(
                session.create_client("s3", config=self._config)
            )

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None

    @property
    def client(self) -> S3Client:
        if self._client is None:
            raise StorageUnavailable(f"{self.description} is not open")
        return self._client

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    # ---------------------------------------------------------------- writes

    async def put_file(self, key: str, path: Path) -> StoredObject:
        size = path.stat().st_size
        with _translated(key):
            if size <= PART_BYTES:
                data = await asyncio.to_thread(path.read_bytes)
                await self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
            else:
                await self._multipart_upload(key, path)
        path.unlink(missing_ok=True)
        return await self.stat(key)

    async def _multipart_upload(self, key: str, path: Path) -> None:
        client, full = self.client, self._key(key)
        upload = await client.create_multipart_upload(Bucket=self.bucket, Key=full)
        upload_id = upload["UploadId"]
        try:
            parts: list[dict[str, Any]] = []
            with path.open("rb") as handle:
                while chunk := await asyncio.to_thread(handle.read, PART_BYTES):
                    number = len(parts) + 1
                    answer = await client.upload_part(
                        Bucket=self.bucket, Key=full, PartNumber=number, UploadId=upload_id, Body=chunk
                    )
                    parts.append({"ETag": answer["ETag"], "PartNumber": number})
            await client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=full,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
            )
        except BaseException:
            # Parts of an unfinished upload cost storage until aborted.
            with _translated(key), _quiet():
                await client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
            raise

    async def put_bytes(self, key: str, data: bytes) -> StoredObject:
        with _translated(key):
            await self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        return await self.stat(key)

    async def move(self, src: str, dest: str) -> StoredObject:
        source = await self.stat(src)
        client, target = self.client, self._key(dest)
        copy_source = {"Bucket": self.bucket, "Key": self._key(src)}
        with _translated(src):
            if source.size_bytes <= _COPY_LIMIT_BYTES:
                await client.copy_object(Bucket=self.bucket, Key=target, CopySource=copy_source)  # type: ignore[arg-type]
            else:
                await self._multipart_copy(copy_source, target, source.size_bytes)
        await self.delete(src)
        return await self.stat(dest)

    async def _multipart_copy(self, copy_source: dict[str, str], target: str, size: int) -> None:
        client = self.client
        upload = await client.create_multipart_upload(Bucket=self.bucket, Key=target)
        upload_id = upload["UploadId"]
        try:
            parts: list[dict[str, Any]] = []
            for number, first in enumerate(range(0, size, _COPY_PART_BYTES), start=1):
                last = min(first + _COPY_PART_BYTES, size) - 1
                answer = await client.upload_part_copy(
                    Bucket=self.bucket,
                    Key=target,
                    PartNumber=number,
                    UploadId=upload_id,
                    CopySource=copy_source,  # type: ignore[arg-type]
                    CopySourceRange=f"bytes={first}-{last}",
                )
                parts.append({"ETag": answer["CopyPartResult"]["ETag"], "PartNumber": number})
            await client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=target,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
            )
        except BaseException:
            with _quiet():
                await client.abort_multipart_upload(Bucket=self.bucket, Key=target, UploadId=upload_id)
            raise

    async def delete(self, key: str) -> None:
        with _translated(key):
            await self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    async def delete_prefix(self, prefix: str) -> None:
        full = self.prefix + check_key(prefix.rstrip("/")) + "/"
        with _translated(prefix):
            paginator = self.client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                keys = [{"Key": item["Key"]} for item in page.get("Contents", []) if "Key" in item]
                if keys:
                    await self.client.delete_objects(
                        Bucket=self.bucket,
                        Delete={"Objects": keys, "Quiet": True},  # type: ignore[typeddict-item]
                    )

    # ---------------------------------------------------------------- reads

    async def stat(self, key: str) -> StoredObject:
        with _translated(key):
            head = await self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        return StoredObject(
            key=key,
            size_bytes=int(head["ContentLength"]),
            etag=str(head.get("ETag", "")),
            modified_at=head["LastModified"].timestamp(),
        )

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        if end is not None and end <= start:
            return
        wanted = f"bytes={start}-{'' if end is None else end - 1}"
        with _translated(key):
            answer = await self.client.get_object(Bucket=self.bucket, Key=self._key(key), Range=wanted)
            body = answer["Body"]
            try:
                async for chunk in body.iter_chunks(_READ_CHUNK):
                    yield chunk
            finally:
                body.close()

    @asynccontextmanager
    async def local_file(self, key: str) -> AsyncIterator[Path]:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        path = self.spool_dir / f"spool-{secrets.token_hex(8)}{Path(key).suffix}"
        try:
            with path.open("wb") as handle:
                async for chunk in self.read(key):
                    await asyncio.to_thread(handle.write, chunk)
            yield path
        finally:
            path.unlink(missing_ok=True)

    async def presigned_get(self, key: str, *, expires_s: float, filename: str | None = None) -> str | None:
        params = {"Bucket": self.bucket, "Key": self._key(key)}
        with _translated(key):
            url: str = await self.client.generate_presigned_url(
                "get_object", Params=params, ExpiresIn=int(expires_s)
            )
        return url

    async def presigned_put(self, key: str, *, expires_s: float) -> str | None:
        params = {"Bucket": self.bucket, "Key": self._key(key)}
        with _translated(key):
            url: str = await self.client.generate_presigned_url(
                "put_object", Params=params, ExpiresIn=int(expires_s)
            )
        return url

    async def check(self) -> str:
        key = f"readyz-{secrets.token_hex(4)}"
        await self.put_bytes(key, b"ok")
        await self.delete(key)
        return f"{self.description} is writable"


class _translated:
    """botocore's and aiohttp's exceptions → StorageMissing / StorageUnavailable, naming the key."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is None or isinstance(exc, StorageMissing | StorageUnavailable):
            return
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in _MISSING_CODES:
                raise StorageMissing(f"{self.key} is missing from object storage") from exc
            _unavailable(self.key, f"{code or 'error'} {error.get('Message', '')}".strip(), exc)
        if isinstance(exc, BotoCoreError | aiohttp.ClientError | OSError | asyncio.TimeoutError):
            _unavailable(self.key, str(exc) or type(exc).__name__, exc)


def _unavailable(key: str, reason: str, exc: BaseException) -> NoReturn:
    raise StorageUnavailable(f"object storage failed for {key}: {reason}") from exc


class _quiet:
    """Best-effort cleanup after a failure: its own failure must not hide the first one."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        return exc is not None and isinstance(exc, Exception)
