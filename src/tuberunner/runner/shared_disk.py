"""Files a runner shares with its coordinator when both run in one process on one disk (the one-shot mode).

The job's calls (accept, update, success...) still go over HTTP, with their checks: only the bytes take a
shortcut. An input is hard-linked (else copied) from where the coordinator keeps it into the input cache,
instead of downloaded; a result is hard-linked (else copied) to where the coordinator's `success` takes the
files put aside for it (the key of a direct upload), instead of sent in the `success` body. The coordinator
decides, with the job's own tokens, what may be read; whatever it does not hand over this way goes over
HTTP as usual. Nobody writes into a shared file: both sides only ever rename over or unlink their names.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from pathlib import Path
from typing import Protocol

from tuberunner.runner.job import AcceptedJob

__all__ = ["SharedDisk", "link_or_copy"]


class SharedDisk(Protocol):
    async def input_file(self, url: str, job: AcceptedJob) -> Path | None:
        """The file the input `url` serves to `job`, where it lies (to link, never to write); None when
        it is not on this disk or not `job`'s to read: then it is downloaded."""
        ...

    async def put_result(self, job: AcceptedJob, field: str, path: Path) -> bool:
        """Put the result file `path` of `job` (`field`: videoFile, ...) where the coordinator's `success`
        takes it; False when that cannot be done here: then it is sent with `success`."""
        ...


async def link_or_copy(source: Path, dest: Path) -> None:
    """`dest` becomes `source`'s content: a hard link, else (another file system) a copy made in the
    kernel; through a temporary name, so `dest` is never seen half-written."""
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
    try:
        try:
            os.link(source, tmp)
        except OSError:
            await asyncio.to_thread(shutil.copyfile, source, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
