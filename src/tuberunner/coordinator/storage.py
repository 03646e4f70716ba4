"""Where the coordinator keeps files, under `<data_dir>/files`.

    videos/<video uuid>/...        uploads, job inputs and assembled outputs of one video
    results/<job uuid>/<nonce>/    files of an accepted `success`, until its completion has moved them

Paths stored in the database are relative to the files root; `resolve` refuses anything that would
leave it, so a stored or client-influenced name can never reach outside.
"""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path


class Storage:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def video_dir(self, video_uuid: str) -> Path:
        return self.root / "videos" / video_uuid

    def new_result_dir(self, job_uuid: str) -> Path:
        # A nonce per request: two racing `success` calls of one job never write the same files.
        return self.root / "results" / job_uuid / secrets.token_hex(8)

    def results_of(self, job_uuid: str) -> Path:
        return self.root / "results" / job_uuid

    def relative(self, path: Path) -> str:
        return path.resolve().relative_to(self.root).as_posix()

    def resolve(self, relative: str) -> Path:
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"path outside storage: {relative}")
        return path

    def remove_tree(self, path: Path) -> None:
        if path.resolve().is_relative_to(self.root):
            shutil.rmtree(path, ignore_errors=True)
