"""What happens to a job's result files once its `success` is accepted (type by type).

Every handler is idempotent: after a crash it runs again from the start on the same stored result.
"""

from __future__ import annotations

import logging

from tuberunner.coordinator.models import Job, JobResult
from tuberunner.coordinator.storage import Storage
from tuberunner.coordinator.videos import VideoStore

log = logging.getLogger(__name__)


class VideoCompleter:
    def __init__(self, videos: VideoStore, storage: Storage) -> None:
        self.videos = videos
        self.storage = storage

    async def __call__(self, job: Job, result: JobResult) -> None:
        for name, relative in result.files.items():
            if not self.storage.resolve(relative).is_file():
                raise FileNotFoundError(f"result file {name} of job {job.uuid} is missing")
        log.info("job %s completed (%s)", job.uuid, job.type)
