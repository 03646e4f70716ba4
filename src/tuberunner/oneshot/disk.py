"""The one-shot mode's runners and its embedded coordinator share a process and a disk: inputs and results
cross by hard links (see `runner.shared_disk`), decided by the coordinator with each job's own tokens."""

from __future__ import annotations

import secrets
from pathlib import Path

from tuberunner.coordinator.context import Coordinator
from tuberunner.coordinator.problems import Problem
from tuberunner.coordinator.runner_api import direct_result_key, runner_input
from tuberunner.coordinator.storage import StorageError
from tuberunner.coordinator.storage.local import LocalStorage
from tuberunner.runner.job import AcceptedJob
from tuberunner.runner.shared_disk import link_or_copy

__all__ = ["EmbeddedDisk"]


class EmbeddedDisk:
    """`SharedDisk` of one embedded runner (its runner token) with the embedded coordinator."""

    def __init__(self, coordinator: Coordinator, runner_token: str) -> None:
        self.coordinator = coordinator
        self.runner_token = runner_token

    async def input_file(self, url: str, job: AcceptedJob) -> Path | None:
        storage = self.coordinator.storage
        if not isinstance(storage, LocalStorage):
            return None
        try:
            file = await runner_input(self.coordinator, url, self.runner_token, job.job_token)
            async with storage.local_file(file.path) as path:  # the stored file itself, checked present
                return path
        except (Problem, StorageError):
            return None  # the download then gets the coordinator's exact answer

    async def put_result(self, job: AcceptedJob, field: str, path: Path) -> bool:
        c = self.coordinator
        if not isinstance(c.storage, LocalStorage):
            return False
        # Beside the request bodies (swept at start), then moved into storage like a received result.
        c.uploads_dir.mkdir(parents=True, exist_ok=True)
        spooled = c.uploads_dir / f"result-{secrets.token_hex(16)}"
        try:
            await link_or_copy(path, spooled)
            await c.storage.put_file(direct_result_key(job.uuid, job.job_token, field), spooled)
        except (OSError, StorageError):
            return False
        finally:
            spooled.unlink(missing_ok=True)
        return True
