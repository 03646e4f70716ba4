"""Answers with a stored file: streamed with a single `Range` honoured whatever the method, or a redirect.

Runner downloads are POSTs (tokens travel in the body), and Starlette's FileResponse only honours
`Range` on GET/HEAD; resuming a cut download is the point, so ranges are handled here for every method.
"""

from __future__ import annotations

import logging
import mimetypes
import re
from collections.abc import AsyncIterator
from email.utils import formatdate

from starlette.responses import Response, StreamingResponse

from tuberunner.coordinator.problems import Problem, problem_response
from tuberunner.coordinator.storage import Storage, StorageError

log = logging.getLogger(__name__)

# ASCII digits, bounded: `int()` refuses more than 4300 digits (and `\d` takes other scripts' digits).
_RANGE = re.compile(r"^bytes=([0-9]{0,18})-([0-9]{0,18})$")

mimetypes.add_type("application/vnd.apple.mpegurl", ".m3u8")
mimetypes.add_type("text/vtt", ".vtt")
mimetypes.add_type("video/mp4", ".mp4")


def media_type_for(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


async def stored_file_response(
    storage: Storage, key: str, range_header: str | None, *, media_type: str | None = None
) -> Response:
    """The file under `key`, streamed from storage (whole or the asked range). StorageMissing and
    StorageUnavailable propagate: the app answers them with 404 / 503 problems."""
    stored = await storage.stat(key)
    size = stored.size_bytes
    # Lets a runner tell whether a cached input is still the file we serve (same size is not enough).
    headers = {
        "accept-ranges": "bytes",
        "etag": stored.etag,
        "last-modified": formatdate(stored.modified_at, usegmt=True),
    }
    media_type = media_type or media_type_for(key)
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
        _guarded(storage.read(key, start, end), key),
        status_code=status,
        headers=headers,
        media_type=media_type,
    )


def redirect_response(url: str) -> Response:
    """302 to a presigned URL: a client that POSTed (runner downloads) follows with a GET without body,
    which is what the URL was signed for."""
    return Response(status_code=302, headers={"location": url, "cache-control": "no-store"})


def _not_satisfiable(size: int) -> Response:
    """416 as a problem document, like every refusal (spec §2.3)."""
    problem = Problem("Range not satisfiable", headers={"content-range": f"bytes */{size}"})
    problem.status = 416
    return problem_response(None, problem)


async def _guarded(chunks: AsyncIterator[bytes], key: str) -> AsyncIterator[bytes]:
    """Once the status line is sent, a storage failure can only cut the body (the client sees a short
    read and resumes with Range); it is logged, not raised into the server as a bug."""
    try:
        async for chunk in chunks:
            yield chunk
    except StorageError as exc:
        log.warning("serving %s stopped: %s", key, exc)
