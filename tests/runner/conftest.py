"""Fixtures for runner tests: the real coordinator (SQLite only here), registered runners, seeded jobs,
fast settings, fake processors driven by events, and a supervisor running in the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import uuid as uuidlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from tests.support.protocol import create_video, input_url
from tests.support.servers import RunningCoordinator
from tuberunner.coordinator.models import Job, JobSpec
from tuberunner.media.binaries import find_ffmpeg
from tuberunner.media.samples import make_sample_clip
from tuberunner.protocol.jobs import JobType
from tuberunner.runner.client import InstanceClient
from tuberunner.runner.config import InstanceConfig, RunnerConfig
from tuberunner.runner.job import JobContext, JobOutput, ProcessingSettings, Processor
from tuberunner.runner.supervisor import InstanceWorker, Supervisor


@pytest.fixture
def database_url() -> None:
    """Runner tests use the coordinator on SQLite only; the coordinator's own suite covers PostgreSQL."""
    return None


@pytest.fixture(scope="session")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real MP4 (the coordinator probes what `success` brings)."""
    out = tmp_path_factory.mktemp("runner-media") / "clip.mp4"
    asyncio.run(
        make_sample_clip(find_ffmpeg(), out, duration_s=0.4, width=320, height=240, fps=10, audio=False)
    )
    return out


# Small numbers so that every wait in a test is short; polling is slow unless a test wants it.
FAST = RunnerConfig(
    concurrency=2,
    min_free_disk_bytes=0,
    update_interval_s=0.1,
    lease_s=5.0,
    shutdown_grace_s=5.0,
    report_deadline_s=5.0,
    poll_interval_s=300.0,
    socket_retry_max_s=0.5,
    connect_timeout_s=2.0,
    read_timeout_s=5.0,
    write_timeout_s=5.0,
    call_timeout_s=5.0,
    success_timeout_s=10.0,
    state_interval_s=0.05,
    config_check_interval_s=0.05,
    input_cache_max_bytes=0,
)


async def register(running: RunningCoordinator, name: str, url: str | None = None) -> InstanceConfig:
    """A runner registered on the coordinator through the real API; `url` may be a proxy in front."""
    registration_token = await running.coordinator.runners.create_registration_token()
    async with InstanceClient(running.url) as client:
        registration = await client.register(registration_token, name, version="1.0.0")
    return InstanceConfig(url or running.url, registration.runner_token, name)


async def seed_job(running: RunningCoordinator, job_type: JobType = JobType.VOD_WEB_VIDEO) -> str:
    """One pending job of `job_type` on a seeded video; returns its uuid."""
    video_id, video_uuid = await create_video(running)
    job_uuid = str(uuidlib.uuid4())
    payload: dict[str, Any] = {
        "input": {"videoFileUrl": input_url(job_uuid, video_uuid), "separatedAudioFileUrl": []},
        "output": {"resolution": 240, "fps": 25},
    }
    spec = JobSpec(job_uuid, job_type, 100, payload, {"videoUUID": video_uuid, "isNewVideo": True})
    await running.coordinator.jobs.create(video_id, [spec])
    return job_uuid


async def job_of(running: RunningCoordinator, job_uuid: str) -> Job | None:
    job: Job | None = await running.coordinator.jobs.get(job_uuid)
    return job


@dataclass
class FakeProcessor:
    """A processor driven by the test: reports `progress`, waits for `release` (unless `wait` is False),
    then returns a copy of `source` (or junk bytes) as its video, or raises `raises`. Records starts and
    cancellations as events."""

    source: Path | None = None
    wait: bool = True
    progress: float | None = None
    raises: BaseException | None = None
    release: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    contexts: list[JobContext] = field(default_factory=list)
    runs: int = 0

    async def __call__(self, context: JobContext) -> JobOutput:
        self.runs += 1
        self.contexts.append(context)
        if self.progress is not None:
            context.report_progress(self.progress)
        self.started.set()
        try:
            if self.wait:
                await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        if self.raises is not None:
            raise self.raises
        result = context.work_dir / "output.mp4"
        if self.source is not None:
            shutil.copyfile(self.source, result)
        else:
            result.write_bytes(b"not a video" * 100)
        return JobOutput(files={"videoFile": result})


@dataclass
class SupervisorHarness:
    supervisor: Supervisor
    task: asyncio.Task[bool]

    async def stop(self, timeout_s: float = 20.0) -> bool:
        self.supervisor.request_stop()
        return await asyncio.wait_for(self.task, timeout_s)


StartSupervisor = Callable[..., Awaitable[SupervisorHarness]]


def settings() -> ProcessingSettings:
    return ProcessingSettings(ffmpeg=Path("/bin/false"))


@pytest.fixture
async def start_supervisor(tmp_path: Path) -> AsyncIterator[StartSupervisor]:
    """`await start_supervisor(instances, processor=..., **config_overrides)`; stopped after the test."""
    harnesses: list[SupervisorHarness] = []

    async def start(
        instances: list[InstanceConfig],
        processor: Processor | None = None,
        *,
        processors: dict[JobType, Processor] | None = None,
        supports: Callable[[JobType, Any], str | None] = lambda job_type, payload: None,
        **overrides: Any,
    ) -> SupervisorHarness:
        table = processors or {JobType.VOD_WEB_VIDEO: processor or FakeProcessor(wait=False)}
        kwargs: dict[str, Any] = {}
        passed = (
            "client_factory",
            "state_file",
            "reload_config",
            "flag_instance",
            "runner_id",
            "holds_video",
            "outbox_dir",
            "retry",
        )
        for name in passed:
            if name in overrides:
                kwargs[name] = overrides.pop(name)
        config = replace(FAST, instances=tuple(instances), **overrides)
        supervisor = Supervisor(
            config,
            work_dir=tmp_path / f"work-{len(harnesses)}",
            processors=table,
            supports=supports,
            settings=settings(),
            version="1.0.0",
            **kwargs,
        )
        harness = SupervisorHarness(supervisor, asyncio.create_task(supervisor.run()))
        harnesses.append(harness)
        return harness

    yield start
    for harness in harnesses:
        harness.supervisor.request_stop()
    for harness in harnesses:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(harness.task, 20)


async def idle_worker(supervisor: Supervisor) -> InstanceWorker:
    """The first instance worker once every worker is idle: its start-up check done and, with a socket,
    the check of its connection too. Jobs created from then on meet no request in flight (see the report
    on the coordinator's pending-view cache, which a request racing with a change leaves stale)."""

    def idle(worker: InstanceWorker) -> bool:
        if not supervisor.config.socket_enabled or worker.config.needs_registration:
            return worker.checks >= 1
        return worker.status.socket_connected and worker.checks >= 2

    assert await supervisor.wait_for(
        lambda: bool(supervisor.workers) and all(idle(w) for w in supervisor.workers.values()), 10
    )
    return next(iter(supervisor.workers.values()))
