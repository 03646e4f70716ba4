"""File answers that honour a single `Range` whatever the method.

Runner downloads are POSTs (tokens travel in the body), and Starlette's FileResponse only honours
`Range` on GET/HEAD; resuming a cut download is the point, so ranges are handled here for every method.
"""

from __future__ import annotations

import mimetypes
import os
import re
from collections.abc import AsyncIterator
from email.utils import formatdate
from pathlib import Path

import anyio
from starlette.responses import Response, StreamingResponse

from tuberunner.coordinator.problems import Problem, problem_response

# ASCII digits, bounded: `int()` refuses more than 4300 digits (and `\d` takes other scripts' digits).
_RANGE = re.compile(r"^bytes=([0-9]{0,18})-([0-9]{0,18})$")
_CHUNK = 256 * 1024

mimetypes.add_type("application/vnd.apple.mpegurl", ".m3u8")
mimetypes.add_type("text/vtt", ".vtt")
mimetypes.add_type("video/mp4", ".mp4")


def media_type_for(path: Path) -> str:
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def file_response(path: Path, range_header: str | None, *, media_type: str | None = None) -> Response:
    stat = os.stat(path)
    size = stat.st_size
    # Lets a runner tell whether a cached input is still the file we serve (same size is not enough).
    headers = {
        "accept-ranges": "bytes",
        "etag": f'W/"{size:x}-{stat.st_mtime_ns:x}"',
        "last-modified": formatdate(stat.st_mtime, usegmt=True),
    }
    media_type = media_type or media_type_for(path)
    start, end = 0, size
    status = 200
    if range_header:
        match = _RANGE.match(range_header.strip())
        if match is None or (not match.group(1) and not match.group(2)):
            return _not_satisfiable(size)
        first, last = match.group(1), match.group(2)
        if first:
            start = int(first)
            end = min(int(last) + 1, size) if last else size
        else:  # suffix range: the last N bytes
            start = max(size - int(last), 0)
        if start >= size or start >= end:
            return _not_satisfiable(size)
        status = 206
        headers["content-range"] = f"bytes {start}-{end - 1}/{size}"
    headers["content-length"] = str(end - start)
    return StreamingResponse(
        _read(path, start, end), status_code=status, headers=headers, media_type=media_type
    )


def _not_satisfiable(size: int) -> Response:
    """416 as a problem document, like every refusal (spec §2.3)."""
    problem = Problem("Range not satisfiable", headers={"content-range": f"bytes */{size}"})
    problem.status = 416
    return problem_response(None, problem)


async def _read(path: Path, start: int, end: int) -> AsyncIterator[bytes]:
    async with await anyio.open_file(path, "rb") as handle:
        await handle.seek(start)
        remaining = end - start
        while remaining > 0:
            chunk = await handle.read(min(_CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk
