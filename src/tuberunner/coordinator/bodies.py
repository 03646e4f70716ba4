"""Request bodies: JSON, urlencoded and multipart, read once, with limits, files streamed to disk.

Multipart file parts go straight into `uploads_dir` under random names, so a 10 GB upload never sits in
memory and a client's file name never reaches the file system. Text fields with bracket names
(`payload[type]`) become nested objects, as PeerTube's multer does. Whatever the handler does not claim is
deleted when the `async with` block ends, so a rejected or truncated request leaves nothing behind.
`local_body` makes the same of files already on this disk (the one-shot mode's input), without HTTP.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import secrets
import shutil
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from tuberunner.coordinator.problems import BadRequest, PayloadTooLarge, UnsupportedMediaType, invalid_params

_MAX_FIELDS = 200
_MAX_FIELD_BYTES = 64 * 1024
_BRACKETS = re.compile(r"\[([^\[\]]*)\]")


@dataclass
class UploadedFile:
    path: Path
    # The client's name and type are hints only (extension guessing); never used to build a path.
    filename: str
    content_type: str
    size: int = 0
    claimed: bool = False


@dataclass
class Body:
    fields: dict[str, Any] = field(default_factory=dict)
    files: dict[str, UploadedFile] = field(default_factory=dict)


@asynccontextmanager
async def read_body(
    request: Request,
    *,
    uploads_dir: Path,
    max_json_bytes: int,
    max_upload_bytes: int,
    file_fields: frozenset[str] = frozenset(),
) -> AsyncIterator[Body]:
    """Parse the body; `file_fields` are the multipart file parts this endpoint takes (others: 400)."""
    body = Body()
    try:
        content_type, params = parse_options_header(request.headers.get("content-type"))
        if content_type == b"multipart/form-data":
            await _read_multipart(request, body, params, uploads_dir, max_upload_bytes, file_fields)
        elif content_type in (b"", b"application/json") or (
            content_type.startswith(b"application/") and content_type.endswith(b"+json")
        ):
            raw = await _read_small(request, max_json_bytes)
            body.fields = _parse_json(raw) if raw.strip() else {}
        elif content_type == b"application/x-www-form-urlencoded":
            raw = await _read_small(request, max_json_bytes)
            # Non-extended parsing, as PeerTube: `a[b]=c` stays a flat key.
            body.fields = dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
        else:
            raise UnsupportedMediaType(f"Unsupported content type: {content_type.decode('latin-1')}")
        _check_text(body.fields)
        yield body
    finally:
        for upload in body.files.values():
            if not upload.claimed:
                upload.path.unlink(missing_ok=True)


@asynccontextmanager
async def local_body(
    uploads_dir: Path, fields: dict[str, Any], files: Mapping[str, Path], *, max_upload_bytes: int
) -> AsyncIterator[Body]:
    """A Body of files already on the coordinator's disk (the one-shot mode's own input), as `read_body`
    gives an upload: each file hard-linked (else copied, in the kernel) into `uploads_dir` instead of
    streamed through HTTP; those not claimed are removed on exit. The file is never written to: storage
    renames, so a link is as good as a copy."""
    body = Body(fields=dict(fields))
    try:
        for field_name, source in files.items():
            size = source.stat().st_size
            if size > max_upload_bytes:
                raise PayloadTooLarge(f"Upload is larger than {max_upload_bytes} bytes")
            uploads_dir.mkdir(parents=True, exist_ok=True)
            path = uploads_dir / f"upload-{secrets.token_hex(16)}"
            try:
                os.link(source, path)
            except OSError:  # another file system, or links not allowed here
                await asyncio.to_thread(shutil.copyfile, source, path)
            body.files[field_name] = UploadedFile(
                path=path, filename=source.name, content_type="application/octet-stream", size=size
            )
        _check_text(body.fields)
        yield body
    finally:
        for upload in body.files.values():
            if not upload.claimed:
                upload.path.unlink(missing_ok=True)


async def _read_small(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"Request body is larger than {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect as exc:
        raise BadRequest("Request body was cut before its end") from exc
    return b"".join(chunks)


def _parse_json(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw, parse_constant=_not_json)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"Malformed JSON body: {exc}") from exc
    if not isinstance(value, dict):
        raise BadRequest("The JSON body must be an object")
    return value


def _not_json(constant: str) -> Any:
    """`NaN` and `Infinity` are not JSON (Python reads them; PostgreSQL's json refuses them)."""
    raise ValueError(f"{constant} is not a JSON value")


def _storable(text: str) -> bool:
    """Text every database takes: no NUL (PostgreSQL refuses it) and valid UTF-8 (no lone surrogate,
    which a JSON `\\ud800` escape can produce)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_text(fields: dict[str, Any]) -> None:
    """400 naming every field holding text that could not be stored or answered (iterative: a deeply
    nested JSON body must not exhaust the stack here)."""
    bad: list[str] = []
    for name, value in fields.items():
        pending: list[Any] = [name, value]
        while pending:
            item = pending.pop()
            if isinstance(item, str) and not _storable(item):
                bad.append(name.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00"))
                break
            if isinstance(item, dict):
                pending.extend(item.keys())
                pending.extend(item.values())
            elif isinstance(item, list):
                pending.extend(item)
    if bad:
        raise invalid_params(bad)


def _set_field(fields: dict[str, Any], name: str, value: Any) -> None:
    """`payload[a][b]` → fields['payload']['a']['b']; `x[]` appends to a list."""
    base, _, rest = name.partition("[")
    keys = _BRACKETS.findall("[" + rest) if rest else []
    if not base or (rest and "[" + rest != "".join(f"[{k}]" for k in keys)):
        fields[name] = value
        return
    target: Any = fields
    path = [base, *keys]
    for key, nxt in itertools.pairwise(path):
        container = target.get(key) if isinstance(target, dict) else None
        if not isinstance(container, dict | list):
            container = [] if nxt == "" else {}
            target[key] = container
        target = container
    last = path[-1]
    if last == "" and isinstance(target, list):
        target.append(value)
    elif isinstance(target, dict):
        target[last] = value
    else:
        raise BadRequest(f"Malformed field name: {name}")


class _MultipartState:
    def __init__(self, body: Body, uploads_dir: Path, max_bytes: int, file_fields: frozenset[str]) -> None:
        self.body = body
        self.uploads_dir = uploads_dir
        self.max_bytes = max_bytes
        self.file_fields = file_fields
        self.header_field = b""
        self.header_value = b""
        self.headers: dict[bytes, bytes] = {}
        self.name = ""
        self.value = bytearray()
        self.file: UploadedFile | None = None
        self.handle: IO[bytes] | None = None
        self.total = 0
        self.field_count = 0
        self.ended = False
        self.error: Exception | None = None

    def on_part_begin(self) -> None:
        self.headers = {}
        self.value = bytearray()
        self.file = None
        self.handle = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.headers[self.header_field.lower()] = self.header_value
        self.header_field = b""
        self.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition"))
        if b"name" not in options:
            raise BadRequest("A multipart part has no name")
        self.name = options[b"name"].decode("utf-8", "replace")
        self.field_count += 1
        if self.field_count > _MAX_FIELDS:
            raise BadRequest("Too many multipart parts")
        if b"filename" not in options:
            return
        if self.name not in self.file_fields:
            raise BadRequest(f"Unexpected file field: {self.name}")
        if self.name in self.body.files:
            raise BadRequest(f"Only one file is accepted in {self.name}")
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        path = self.uploads_dir / f"upload-{secrets.token_hex(16)}"
        self.file = UploadedFile(
            path=path,
            filename=options[b"filename"].decode("utf-8", "replace"),
            content_type=self.headers.get(b"content-type", b"application/octet-stream").decode("latin-1"),
        )
        self.body.files[self.name] = self.file
        self.handle = path.open("wb")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self.file is not None and self.handle is not None:
            self.file.size += len(chunk)
            self.total += len(chunk)
            if self.total > self.max_bytes:
                raise PayloadTooLarge(f"Upload is larger than {self.max_bytes} bytes")
            self.handle.write(chunk)
        else:
            self.value += chunk
            if len(self.value) > _MAX_FIELD_BYTES:
                raise PayloadTooLarge(f"Field {self.name} is larger than {_MAX_FIELD_BYTES} bytes")

    def on_part_end(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        elif self.file is None:
            _set_field(self.body.fields, self.name, self.value.decode("utf-8", "replace"))

    def on_end(self) -> None:
        self.ended = True

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


async def _read_multipart(
    request: Request,
    body: Body,
    params: dict[bytes, bytes],
    uploads_dir: Path,
    max_bytes: int,
    file_fields: frozenset[str],
) -> None:
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("Multipart body without boundary")
    state = _MultipartState(body, uploads_dir, max_bytes, file_fields)
    callbacks: Any = {
        name: getattr(state, name)
        for name in (
            "on_part_begin",
            "on_part_data",
            "on_part_end",
            "on_header_field",
            "on_header_value",
            "on_header_end",
            "on_headers_finished",
            "on_end",
        )
    }
    parser = MultipartParser(boundary, callbacks)
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except ClientDisconnect as exc:
        raise BadRequest("Request body was cut before its end") from exc
    except MultipartParseError as exc:
        raise BadRequest(f"Malformed multipart body: {exc}") from exc
    finally:
        state.close()
    if not state.ended:
        raise BadRequest("Request body was cut before its end")
