"""Storyboards that no connected runner takes, made by the coordinator itself, through the state machine.

An unclaimed `generate-video-storyboard` job (see `claims`) is accepted by the coordinator's own runner row
(`OWN_RUNNER_NAME`, created at first need) exactly as a runner accepts a job: the same conditional UPDATE,
so a runner asking at that moment either gets the job first or is told it was taken. The coordinator then
runs the command a runner runs (`media.commands.storyboard_command`) on the video's max-quality file,
renews the job's lease as a runner's heartbeats do, and hands the sprite sheet to `JobService.success`:
the same completion as a runner's upload, and admin views that show a storyboard job completed by
`OWN_RUNNER_NAME`. A failure goes through `JobService.error` (retried like any job's); a job taken back
meanwhile (cancelled, deleted) has its ffmpeg killed at the next heartbeat; a stopping coordinator aborts
it, so that it is pending again at the next start. One storyboard at a time, niced: the coordinator's CPU
serves its API first.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Final

from tuberunner import __version__
from tuberunner.coordinator.claims import Unclaimed
from tuberunner.coordinator.config import CoordinatorConfig
from tuberunner.coordinator.jobs import JobService
from tuberunner.coordinator.models import Job, JobResult
from tuberunner.coordinator.problems import Problem
from tuberunner.coordinator.runners import RunnerRegistry
from tuberunner.coordinator.storage import Storage, StorageError, StorageUnavailable, result_key
from tuberunner.coordinator.videos import VideoStore
from tuberunner.media.binaries import find_ffmpeg
from tuberunner.media.commands import EncodeSettings, storyboard_command
from tuberunner.media.errors import MediaError
from tuberunner.media.process import run_ffmpeg
from tuberunner.media.profiles import StoryboardSprites
from tuberunner.protocol.jobs import JobType
from tuberunner.protocol.payloads import StoryboardPayload, parse_payload

log = logging.getLogger(__name__)

OWN_RUNNER_NAME: Final = "tuberunner-coordinator"
OWN_RUNNER_DESCRIPTION: Final = "Built into the coordinator: makes the storyboards no connected runner takes"
_NICE: Final = 10
_STALL_TIMEOUT_S: Final = 60.0
_MESSAGE_CHARS: Final = 5000


class _TakenBack(Exception):
    """The job is no longer held by the coordinator (cancelled, deleted, lease expired)."""


class BuiltinStoryboards:
    def __init__(
        self,
        jobs: JobService,
        videos: VideoStore,
        storage: Storage,
        registry: RunnerRegistry,
        config: CoordinatorConfig,
        *,
        on_own_runner: Callable[[int], None],
    ) -> None:
        self.jobs = jobs
        self.videos = videos
        self.storage = storage
        self.registry = registry
        self.work_dir = config.uploads_dir
        self.heartbeat_s = max(0.05, config.lease_for(JobType.STORYBOARD) / 4)
        self.on_own_runner = on_own_runner
        self._runner_id: int | None = None
        self._task: asyncio.Task[None] | None = None
        self.made = 0

    def take(self, unclaimed: Sequence[Unclaimed]) -> None:
        """Start on the first of these storyboard jobs, unless one is being made already."""
        uuids = [job.uuid for job in unclaimed if job.type == JobType.STORYBOARD]
        if not uuids or (self._task is not None and not self._task.done()):
            return
        self._task = asyncio.create_task(self._make_first(uuids), name="builtin-storyboard")

    def runners_removed(self, runner_ids: set[int]) -> None:
        if self._runner_id in runner_ids:
            self._runner_id = None  # an admin deleted our row: made again at the next need

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task

    async def _make_first(self, uuids: list[str]) -> None:
        try:
            for uuid in uuids:
                job = await self._accept(uuid)
                if job is not None:
                    await self._make(job)
                    return
        except asyncio.CancelledError:
            raise
        except Exception:  # the next sweep tries again
            log.exception("could not make a storyboard")

    async def _accept(self, job_uuid: str) -> Job | None:
        if self._runner_id is None:
            self._runner_id = await self.registry.own_runner(
                OWN_RUNNER_NAME, OWN_RUNNER_DESCRIPTION, __version__
            )
            self.on_own_runner(self._runner_id)
        try:
            job = await self.jobs.try_accept(job_uuid, self._runner_id)
        except Problem:  # our runner row was deleted by an admin: made again next time
            self._runner_id = None
            return None
        if job is not None:
            self.registry.touch(self._runner_id, None)  # its lastContact tells when it last worked
        return job

    async def _make(self, job: Job) -> None:
        log.info("making the storyboard of job %s myself: no connected runner takes storyboards", job.uuid)
        try:
            result = await self._render(job)
        except asyncio.CancelledError:
            with suppress(Exception):
                await asyncio.shield(self.jobs.abort(job))  # pending again for the next start
            raise
        except _TakenBack:
            log.info("storyboard job %s was taken back while the coordinator made it", job.uuid)
            return
        except StorageUnavailable as exc:  # not the job's fault: pending again, tried at a later sweep
            log.warning(
                "job %s: storage unavailable (%s); the storyboard is tried again later", job.uuid, exc
            )
            with suppress(Problem):
                await self.jobs.abort(job)
            return
        except (MediaError, StorageError, OSError, ValueError) as exc:
            message = f"The coordinator could not make the storyboard: {exc}"[:_MESSAGE_CHARS]
            log.warning("job %s: %s", job.uuid, message)
            with suppress(Problem):
                await self.jobs.error(job, message)
            return
        try:
            await self.jobs.success(job, result)
        except Problem:  # taken back between the last heartbeat and now; success dropped the files
            return
        self.made += 1

    async def _render(self, job: Job) -> JobResult:
        payload = parse_payload(job.type, job.payload)
        assert isinstance(payload, StoryboardPayload)
        video = await self.videos.by_id(job.video_id) if job.video_id is not None else None
        source = await self.videos.input_file(video.id, "video") if video is not None else None
        if source is None:
            raise ValueError("the video has no file to make it from")
        sprites = payload.sprites
        grid = StoryboardSprites(
            width=sprites.size.width,
            height=sprites.size.height,
            columns=sprites.count.width,
            rows=sprites.count.height,
            duration_s=sprites.duration,
        )
        # ffmpeg writes in a work folder beside incoming bodies (swept at start); the sheet then goes
        # into storage as a runner's upload does.
        folder = self.work_dir / f"storyboard-{job.uuid}-{secrets.token_hex(4)}"
        folder.mkdir(parents=True)
        try:
            output = folder / "storyboardFile.jpg"
            async with self.storage.local_file(source.path) as source_path:
                args = storyboard_command(source_path, output, grid, EncodeSettings())
                encode = asyncio.create_task(
                    run_ffmpeg(
                        find_ffmpeg(),
                        args,
                        duration_s=None,
                        stall_timeout_s=_STALL_TIMEOUT_S,
                        nice=_NICE,
                        cwd=folder,
                    )
                )
                try:
                    await self._while_held(job, encode)
                finally:
                    if not encode.done():
                        encode.cancel()  # run_ffmpeg kills the process group before it returns
                        with suppress(asyncio.CancelledError, MediaError):
                            await encode
            if not output.is_file() or output.stat().st_size == 0:
                raise ValueError("ffmpeg wrote no sprite sheet")
            key = result_key(job.uuid, None, "storyboardFile.jpg")
            await self.storage.put_file(key, output)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return JobResult(files={"storyboardFile": key}, fields={})

    async def _while_held(self, job: Job, encode: asyncio.Task[None]) -> None:
        """Wait for the encode, renewing the job's lease as a runner's heartbeat does."""
        while True:
            done, _ = await asyncio.wait({encode}, timeout=self.heartbeat_s)
            if done:
                encode.result()  # its failure, if it failed
                return
            try:
                await self.jobs.update(job, None)
            except Problem as exc:
                raise _TakenBack from exc
            if job.runner_id is not None:
                self.registry.touch(job.runner_id, None)
