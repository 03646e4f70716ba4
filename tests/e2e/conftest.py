"""End-to-end fixtures: our coordinator (in this process, or a child process to SIGKILL), our runner's
supervisor with its real processors and input cache (as `tuberunner server` builds it), the real ffmpeg,
generated media, and the checks every test ends with: no job held, no ffmpeg process, no temp file.

Costs are chosen, not hoped for: a transcode job upscales a tiny 30 s clip, so the resolution asked for sets
how long ffmpeg runs with one thread (roughly 1 s at 144p, 4 s at 360p, 15 s at 720p, 40 s at 1080p on the
2-core CI machines). Faults are injected once the coordinator has stored a progress > 0, so ffmpeg is known
to be running; jobs that must be cut are long enough never to end first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.runner.conftest import FAST, SupervisorHarness
from tests.support.databases import postgres_available, postgres_database
from tests.support.protocol import admin_headers, create_video, input_url
from tests.support.servers import ADMIN_TOKEN, RunningCoordinator
from tests.support.tcp_proxy import Plan, TcpProxy
from tuberunner import __version__
from tuberunner.coordinator.config import CoordinatorConfig
from tuberunner.coordinator.jobs import AvailableJobs
from tuberunner.coordinator.models import Job, JobSpec
from tuberunner.media.binaries import find_ffmpeg
from tuberunner.media.samples import make_sample_clip
from tuberunner.protocol.jobs import JobState, JobType
from tuberunner.runner.config import InstanceConfig, RunnerConfig
from tuberunner.runner.encode_cache import EncodeCache
from tuberunner.runner.input_cache import InputCache
from tuberunner.runner.job import AcceptedJob, InputFetcher, ProcessingSettings
from tuberunner.runner.processors import PROCESSORS, supports
from tuberunner.runner.supervisor import JobClients, JobRun, Supervisor
from tuberunner.runner.transfers import DownloadLimits

WAIT_S = 60.0
# Both sides' lease: a job is taken back (coordinator) and given up (runner) 2 s after its last update.
LEASE_S = 2.0
ADMIN = admin_headers(ADMIN_TOKEN)

# A production-shaped configuration with small numbers: heartbeats well inside the lease, every call
# bounded, ffmpeg on one thread and not niced so that job costs are predictable, inputs shared through the
# cache as the daemon does. Polling is off (an hour): every pickup below comes from a socket ping, a
# reconnection or the retry of a failed check, so a lost wake-up fails a test instead of hiding behind a poll.
E2E = replace(
    FAST,
    concurrency=2,
    update_interval_s=0.3,
    lease_s=LEASE_S,
    report_deadline_s=15.0,
    poll_interval_s=3600.0,
    socket_retry_max_s=0.5,
    connect_timeout_s=1.0,
    read_timeout_s=3.0,
    write_timeout_s=3.0,
    call_timeout_s=3.0,
    success_timeout_s=30.0,
    ffmpeg_threads=1,
    ffmpeg_nice=0,
    stall_timeout_s=10.0,
    input_cache_max_bytes=1024**3,
)


# ------------------------------------------------------------------------------------------ databases


@pytest.fixture
async def database_url(request: pytest.FixtureRequest) -> AsyncIterator[str | None]:
    """SQLite unless a test asks for PostgreSQL with `parametrize("database_url", [...], indirect=True)`."""
    backend = getattr(request, "param", "sqlite")
    if backend == "sqlite":
        yield None
        return
    reason = await postgres_available()
    if reason:
        pytest.skip(reason)
    async with postgres_database() as url:
        yield url


def e2e_coordinator_config(data_dir: Path, database_url: str | None = None) -> CoordinatorConfig:
    """The `coordinator` fixture's settings; for a second in-process coordinator too."""
    return CoordinatorConfig(
        data_dir=data_dir,
        database_url=database_url,
        admin_token=ADMIN_TOKEN,
        default_lease_s=LEASE_S,
        reaper_interval_s=0.2,
        ping_debounce_s=0.01,
    )


@pytest.fixture
def coordinator_config(
    request: pytest.FixtureRequest, tmp_path: Path, database_url: str | None
) -> CoordinatorConfig:
    """Overridden per test with `parametrize("coordinator_config", [{field: value}], indirect=True)`."""
    overrides: dict[str, Any] = getattr(request, "param", {})
    return replace(e2e_coordinator_config(tmp_path / "coordinator", database_url), **overrides)


# ------------------------------------------------------------------------------------------ media


@dataclass(frozen=True)
class Media:
    # 160x90, 25 fps, 30 s, H.264 + AAC: upscaled by transcode jobs, whose resolution sets their cost.
    long: Path
    # 160x90, 25 fps, 3 s: the quick job each fault test ends with.
    short: Path
    # 320x180, 25 fps, 5 s: the upload of the full pipeline (ladder 180p + 144p + audio).
    upload: Path
    # 640x360, 25 fps, 30 s: an upload whose only job (web video 360p) lasts a few seconds.
    upload_360p: Path


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory) -> Media:
    folder = tmp_path_factory.mktemp("e2e-media")
    ffmpeg = find_ffmpeg()

    async def make() -> Media:
        clips = await asyncio.gather(
            make_sample_clip(ffmpeg, folder / "long.mp4", duration_s=30, width=160, height=90),
            make_sample_clip(ffmpeg, folder / "short.mp4", duration_s=3, width=160, height=90),
            make_sample_clip(ffmpeg, folder / "upload.mp4", duration_s=5, width=320, height=180),
            make_sample_clip(ffmpeg, folder / "upload-360p.mp4", duration_s=30, width=640, height=360),
        )
        return Media(*clips)

    return asyncio.run(make())


# ------------------------------------------------------------------------------------------ processes


def ffmpeg_pids(parent: int | None = None) -> list[int]:
    """ffmpeg processes whose parent is `parent` (default: this test process), zombies included."""
    parent = os.getpid() if parent is None else parent
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        # The bundled binary is `ffmpeg-linux-x86_64-v…`; comm keeps its first 15 characters.
        if comm.startswith("ffmpeg") and ppid == parent:
            found.append(int(entry.name))
    return found


def ffmpeg_pids_in(folder: Path) -> list[int]:
    """ffmpeg processes, whoever their parent, working in `folder` or below (a daemon's job folders)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            comm = Path(entry.path, "comm").read_text().strip()
            cwd = Path(os.readlink(Path(entry.path, "cwd")))
        except OSError:
            continue
        if comm.startswith("ffmpeg") and cwd.is_relative_to(folder):
            found.append(int(entry.name))
    return found


def process_state(pid: int) -> str | None:
    """The one-letter state of `pid` (R, S, T, Z, ...), None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[0]


class ProcessWatch:
    """Notices the end of one process through a pidfd (readable once the process has terminated), and
    when it happened on the monotonic clock."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.ended_at: float | None = None
        loop = asyncio.get_running_loop()
        self._ended: asyncio.Future[None] = loop.create_future()
        try:
            self._fd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self._fd = None
            self._mark()
            return
        loop.add_reader(self._fd, self._mark)

    def _mark(self) -> None:
        if self.ended_at is None:
            self.ended_at = time.monotonic()
        if not self._ended.done():
            self._ended.set_result(None)
        self._close()

    def _close(self) -> None:
        if self._fd is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None

    @property
    def alive(self) -> bool:
        return self.ended_at is None

    async def ended(self, timeout_s: float = WAIT_S) -> float:
        """Wait for the end; returns its monotonic time."""
        await asyncio.wait_for(asyncio.shield(self._ended), timeout_s)
        assert self.ended_at is not None
        return self.ended_at

    def close(self) -> None:
        self._close()


# ------------------------------------------------------------------------------------------ the runner


@dataclass
class Runner(SupervisorHarness):
    """The supervisor as `tuberunner server` builds it (real processors, input cache), on this loop."""

    root: Path
    watches: list[ProcessWatch] = field(default_factory=list)

    @property
    def config(self) -> RunnerConfig:
        return self.supervisor.config

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
        assert await self.supervisor.wait_for(predicate, timeout_s), f"not true within {timeout_s:g} s"

    def runs(self, job_uuid: str) -> list[JobRun]:
        """Every run of `job_uuid` here, finished ones first."""
        return [
            run
            for run in [*self.supervisor.finished, *self.supervisor.jobs.values()]
            if run.job.uuid == job_uuid
        ]

    def outcomes(self, job_uuid: str) -> list[str]:
        return [run.outcome for run in self.supervisor.finished if run.job.uuid == job_uuid]

    def finished(self, job_uuid: str, count: int = 1) -> Callable[[], bool]:
        """A predicate: `count` runs of the job have ended here."""
        return lambda: len(self.outcomes(job_uuid)) >= count and job_uuid not in self.supervisor.jobs

    async def running(self, job_uuid: str, timeout_s: float = WAIT_S) -> JobRun:
        """Wait until the coordinator has accepted a progress > 0 of the job (so its ffmpeg runs)."""

        def progressed() -> bool:
            run = self.supervisor.jobs.get(job_uuid)
            return bool(run and run.heartbeat and (run.heartbeat.delivered_progress or 0) > 0)

        await self.wait_for(progressed, timeout_s)
        return self.supervisor.jobs[job_uuid]

    def ffmpeg(self) -> ProcessWatch:
        """A watch on the one ffmpeg process running now."""
        pids = ffmpeg_pids()
        assert len(pids) == 1, f"expected one ffmpeg process, found {pids}"
        watch = ProcessWatch(pids[0])
        self.watches.append(watch)
        return watch

    def assert_idle_and_clean(self) -> None:
        """No job held, every slot free, no ffmpeg process, no job folder, no partial download."""
        supervisor = self.supervisor
        assert not supervisor.jobs
        assert supervisor.free_slots() == supervisor.config.concurrency
        assert ffmpeg_pids() == []
        assert list(supervisor.work_dir.iterdir()) == []
        assert sorted(p.name for p in self.root.rglob("*.part")) == []


StartRunner = Callable[..., Awaitable[Runner]]


def processing_settings(config: RunnerConfig) -> ProcessingSettings:
    """What `daemon._serve` derives from the configuration."""
    return ProcessingSettings(
        ffmpeg=find_ffmpeg(config.ffmpeg_path),
        threads=config.ffmpeg_threads,
        nice=min(config.ffmpeg_nice, 19),
        stall_timeout_s=config.stall_timeout_s,
        max_duration_s=config.max_job_duration_s,
    )


@pytest.fixture
async def start_runner(tmp_path: Path) -> AsyncIterator[StartRunner]:
    """`await start_runner(instances, **config_overrides)`; every runner is stopped after the test, and no
    ffmpeg process may be left then."""
    runners: list[Runner] = []

    async def start(
        instances: Iterable[InstanceConfig],
        *,
        flag_instance: Callable[[InstanceConfig], None] | None = None,
        reload_config: Callable[[], RunnerConfig | None] | None = None,
        keep_encodes: bool = True,
        **overrides: Any,
    ) -> Runner:
        """`keep_encodes=False`: a runner that reuses no encode (like an official runner)."""
        config = replace(E2E, instances=tuple(instances), **overrides)
        root = tmp_path / f"runner-{len(runners)}"
        clients = JobClients()
        cache = InputCache(
            clients,
            root / "inputs",
            max_bytes=config.input_cache_max_bytes,
            max_idle_s=config.input_cache_max_idle_s,
            limits=DownloadLimits(deadlines=config.deadlines()),
        )

        def inputs(job: AcceptedJob, work_dir: Path) -> contextlib.AbstractAsyncContextManager[InputFetcher]:
            return cache.inputs_for(job)

        encodes = (
            EncodeCache(root / "inputs", max_bytes=config.input_cache_max_bytes) if keep_encodes else None
        )
        supervisor = Supervisor(
            config,
            work_dir=root / "jobs",
            processors=PROCESSORS,
            supports=supports,
            settings=processing_settings(config),
            version=__version__,
            job_clients=clients,
            inputs=inputs,
            flag_instance=flag_instance,
            reload_config=reload_config,
            encodes=encodes,
            holds_video=lambda url, video: (
                cache.holds_video(video) or (encodes is not None and encodes.holds_video(url, video))
            ),
        )
        runner = Runner(supervisor, asyncio.create_task(supervisor.run()), root)
        runners.append(runner)
        return runner

    yield start
    for runner in runners:
        runner.supervisor.request_stop()
    for runner in runners:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(runner.task, 30)
        for watch in runner.watches:
            watch.close()
    leftovers = ffmpeg_pids()
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert leftovers == [], f"ffmpeg processes outlived their runner: {leftovers}"


async def idle(runner: Runner) -> None:
    """Every instance checked at start and on its socket connection: a job created now is picked up by
    the ping it causes (no request in flight can miss it)."""

    def ready() -> bool:
        workers = runner.supervisor.workers.values()
        return bool(workers) and all(
            w.config.needs_registration or (w.status.socket_connected and w.checks >= 2) for w in workers
        )

    await runner.wait_for(ready)


# ------------------------------------------------------------------------------------------ the daemon


def daemon_env(home: Path, **settings: str) -> dict[str, str]:
    """The environment of `tuberunner` commands whose XDG folders are in `home`, with `TUBERUNNER_*`
    settings (`TUBERUNNER_JOBS_MIN_FREE_DISK_BYTES=0` at least: test disks may be small)."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("TUBERUNNER_")}
    return {
        **inherited,
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_CACHE_HOME": str(home / "cache"),
        "TUBERUNNER_JOBS_MIN_FREE_DISK_BYTES": "0",
        **settings,
    }


def daemon_cache(env: dict[str, str]) -> Path:
    return Path(env["XDG_CACHE_HOME"]) / "tuberunner" / "default"


async def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tuberunner", *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), WAIT_S)
    assert process.returncode is not None
    return subprocess.CompletedProcess(args, process.returncode, stdout.decode(), stderr.decode())


async def register_daemon(env: dict[str, str], url: str, name: str, *, via: str | None = None) -> None:
    """`tuberunner register` with a fresh registration token, through `via` (a proxy) when given."""
    token = await new_registration_token(url)
    args = ["register", "--url", via or url, "--registration-token", token, "--runner-name", name]
    registered = await run_cli(env, *args)
    assert registered.returncode == 0, registered.stderr


async def start_daemon(env: dict[str, str], log_path: Path) -> asyncio.subprocess.Process:
    """`tuberunner server`, its output appended to `log_path`."""
    with log_path.open("ab") as log:  # the child keeps its own descriptor
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tuberunner", "server", env=env, stdout=log, stderr=subprocess.STDOUT
        )


async def stop_daemon(daemon: asyncio.subprocess.Process) -> int:
    if daemon.returncode is None:
        daemon.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(daemon.wait(), WAIT_S)


# ------------------------------------------------------------------------------------------ coordinator


async def new_registration_token(url: str) -> str:
    """A registration token generated through the admin API (works for a coordinator process too)."""
    async with admin(url) as http:
        (await http.post("/api/v1/runners/registration-tokens/generate")).raise_for_status()
        tokens = await http.get("/api/v1/runners/registration-tokens", params={"sort": "-createdAt"})
        tokens.raise_for_status()
    token: str = tokens.json()["data"][0]["registrationToken"]
    return token


async def register(url: str, name: str, *, via: str | None = None) -> InstanceConfig:
    """Register a runner through the runner API; the instance's URL is `via` (a proxy) when given."""
    registration_token = await new_registration_token(url)
    async with admin(url) as http:
        answer = await http.post(
            "/api/v1/runners/register", json={"registrationToken": registration_token, "name": name}
        )
        answer.raise_for_status()
    return InstanceConfig(via or url, answer.json()["runnerToken"], name)


async def seed_transcode(running: RunningCoordinator, source: Path, *, resolution: int) -> str:
    """A pending web-video job at `resolution` (25 fps) on a new video whose source is `source`."""
    video_id, video_uuid = await create_video(running, source=source.read_bytes(), resolution=90)
    job_uuid = str(uuidlib.uuid4())
    payload = {
        "input": {"videoFileUrl": input_url(job_uuid, video_uuid), "separatedAudioFileUrl": []},
        "output": {"resolution": resolution, "fps": 25},
    }
    private = {"videoUUID": video_uuid, "isNewVideo": True}
    await running.coordinator.jobs.create(
        video_id, [JobSpec(job_uuid, JobType.VOD_WEB_VIDEO, 100, payload, private)]
    )
    return job_uuid


async def job_row(running: RunningCoordinator, job_uuid: str) -> Job | None:
    job: Job | None = await running.coordinator.jobs.get(job_uuid)
    return job


async def assert_completed_once(
    running: RunningCoordinator, runner: Runner, job_uuid: str, *, failures: int = 0
) -> Job:
    """The job is completed on the coordinator, with `failures` errors reported, and exactly one run here
    delivered it."""
    row = await job_row(running, job_uuid)
    assert row is not None
    assert (row.state, row.failures, row.error) == (JobState.COMPLETED, failures, None)
    assert runner.outcomes(job_uuid).count("succeeded") == 1
    return row


async def takes_the_next_job(running: RunningCoordinator, runner: Runner, media: Media) -> None:
    """The runner, idle after a fault, takes a new job at once and completes it."""
    runner.assert_idle_and_clean()
    job_uuid = await seed_transcode(running, media.short, resolution=144)
    await runner.wait_for(runner.finished(job_uuid))
    await assert_completed_once(running, runner, job_uuid)
    runner.assert_idle_and_clean()


def coordinator_files_clean(config: CoordinatorConfig) -> None:
    """No request body left half-written, no result waiting for a completion."""
    uploads = config.uploads_dir
    assert not uploads.exists() or list(uploads.iterdir()) == []
    results = config.files_dir / "results"
    assert not results.exists() or [p for p in results.rglob("*") if p.is_file()] == []


class JobChanges:
    """Wakes on every committed job transition of an in-process coordinator (not on heartbeats)."""

    def __init__(self, running: RunningCoordinator) -> None:
        self._event = asyncio.Event()
        jobs = running.coordinator.jobs
        chained = jobs.on_change

        def changed() -> None:
            self._event.set()
            if chained is not None:
                chained()

        jobs.on_change = changed

    async def until(self, predicate: Callable[[], Awaitable[bool]], timeout_s: float = WAIT_S) -> None:
        """Wait until `predicate()` holds, checked now and after each change."""
        async with asyncio.timeout(timeout_s):
            while True:
                self._event.clear()
                if await predicate():
                    return
                await self._event.wait()


class CoordinatorCalls:
    """Events of an in-process coordinator that a runner in another process causes: a progress > 0 stored
    for a job (its ffmpeg runs) and a `jobs/request` answered (a runner is up and polling). Both paths of a
    heartbeat are watched: the one-statement `try_update` and the checked `update`."""

    def __init__(self, running: RunningCoordinator, monkeypatch: pytest.MonkeyPatch) -> None:
        self._progress: dict[str, asyncio.Event] = {}
        self.requested = asyncio.Event()
        jobs = running.coordinator.jobs
        update, available = jobs.update, jobs.available_jobs

        async def on_update(job: Job, progress: int | None) -> None:
            await update(job, progress)
            if progress:
                self.progress(job.uuid).set()

        async def on_request(base_url: str, job_types: frozenset[str] | None) -> AvailableJobs:
            answer = await available(base_url, job_types)
            self.requested.set()
            return answer

        monkeypatch.setattr(jobs, "update", on_update)
        monkeypatch.setattr(jobs, "available_jobs", on_request)
        try_update = getattr(jobs, "try_update", None)
        if try_update is not None:

            async def on_try_update(
                job_uuid: str, runner_id: int, job_token: str, progress: int | None
            ) -> bool:
                done = bool(await try_update(job_uuid, runner_id, job_token, progress))
                if done and progress:
                    self.progress(job_uuid).set()
                return done

            monkeypatch.setattr(jobs, "try_update", on_try_update)

    def progress(self, job_uuid: str) -> asyncio.Event:
        return self._progress.setdefault(job_uuid, asyncio.Event())


# ------------------------------------------------------------------------------------------ the network


class FaultProxy(TcpProxy):
    """A `TcpProxy` whose faults can be awaited, applied once, and turned into a real black hole.

    `once(plan)`: every connection follows `plan` until it triggers once; then every connection open at
    that moment is reset (as a network blip does) and new ones are forwarded. `blackhole()`: new
    connections are never answered and open ones stop forwarding both ways (packets dropped, sockets
    open); `heal()` forwards again and resets what was stuck, as the peers' keep-alives would."""

    def __init__(self, upstream_host: str, upstream_port: int, *, default: Plan | None = None) -> None:
        super().__init__(upstream_host, upstream_port, default=default)
        self.faulted = asyncio.Event()
        self._single = False

    def once(self, plan: Plan) -> None:
        self.default = plan
        self._single = True

    def blackhole(self) -> None:
        self.default = Plan.blackhole()
        for conn in list(self._connections):
            conn.stalled = True

    def heal(self) -> None:
        self.default = Plan.forward()
        self.reset_all()

    def _act(self, conn: Any) -> None:
        # Called when a plan's fault triggers (RESET, CLOSE, STALL), never for black-holed connections.
        super()._act(conn)
        if self._single:
            self._single = False
            self.default = Plan.forward()
            self.reset_all()
        self.faulted.set()


@contextlib.asynccontextmanager
async def proxy_to(url: str, default: Plan | None = None) -> AsyncIterator[FaultProxy]:
    port = int(url.rsplit(":", 1)[1])
    proxy = FaultProxy("127.0.0.1", port, default=default)
    async with proxy:
        yield proxy


def admin(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, headers=ADMIN, timeout=30)
