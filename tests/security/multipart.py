"""Multipart bodies written byte by byte, so that a test can send what no polite client would: file names
with `..`, absolute paths, NUL, bracket tricks in field names."""

from __future__ import annotations

import secrets
from dataclasses import dataclass


@dataclass(frozen=True)
class Part:
    name: bytes
    data: bytes
    filename: bytes | None = None
    content_type: bytes = b"application/octet-stream"


def multipart(parts: list[Part]) -> tuple[bytes, dict[str, str]]:
    """The body and its Content-Type header."""
    boundary = b"tuberunner-test-" + secrets.token_hex(8).encode()
    body = b""
    for part in parts:
        disposition = b'form-data; name="' + part.name + b'"'
        headers = b""
        if part.filename is not None:
            disposition += b'; filename="' + part.filename + b'"'
            headers = b"Content-Type: " + part.content_type + b"\r\n"
        body += b"--" + boundary + b"\r\nContent-Disposition: " + disposition + b"\r\n" + headers + b"\r\n"
        body += part.data + b"\r\n"
    body += b"--" + boundary + b"--\r\n"
    return body, {"content-type": "multipart/form-data; boundary=" + boundary.decode()}


def text(name: str, value: str) -> Part:
    return Part(name.encode(), value.encode())
