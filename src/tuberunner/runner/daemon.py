"""`tuberunner server`: set up once (config, pid lock, ffmpeg, processors, input cache), then hand over to
the Supervisor until a signal stops it.

Exit codes: 0 stopped normally; 1 another daemon runs with this id; 2 setup error (configuration, ffmpeg
missing or unusable, no processor for an enabled job type, the health/metrics port taken); 130 stopped at
once by a second SIGINT. Signal handlers only set the supervisor's events.

Under systemd (`NOTIFY_SOCKET` set) the supervisor sends READY=1 once its instance loops run (and the
`[daemon] http_port` endpoint listens), WATCHDOG=1 from its loop monitor, STOPPING=1 when it drains.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from tuberunner import __version__
from tuberunner.media.binaries import check_ffmpeg, find_ffmpeg
from tuberunner.media.errors import FfmpegUnavailable
from tuberunner.ops.http import RunnerEndpoint
from tuberunner.ops.metrics import RunnerMetrics
from tuberunner.ops.sd_notify import SystemdNotifier
from tuberunner.runner.client import client_for
from tuberunner.runner.config import (
    ConfigError,
    ConfigFile,
    InstanceConfig,
    RunnerConfig,
    with_enabled_job_types,
)
from tuberunner.runner.encode_cache import EncodeCache
from tuberunner.runner.input_cache import InputCache
from tuberunner.runner.job import AcceptedJob, InputFetcher, ProcessingSettings
from tuberunner.runner.paths import RunnerPaths, official_config_file, runner_paths
from tuberunner.runner.shared_disk import SharedDisk
from tuberunner.runner.state import AlreadyRunning, PidLock
from tuberunner.runner.supervisor import InputsFactory, JobClients, Supervisor, direct_inputs
from tuberunner.runner.transfers import DownloadLimits

__all__ = [
    "EXIT_ALREADY_RUNNING",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_SETUP",
    "DaemonOptions",
    "build_supervisor",
    "config_reloader",
    "encode_cache",
    "processing_settings",
    "run_daemon",
]

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ALREADY_RUNNING = 1
EXIT_SETUP = 2
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class DaemonOptions:
    runner_id: str = "default"
    config_file: Path | None = None
    # `--enable-job`: replaces the configured job types (kept across config reloads).
    enable_jobs: tuple[str, ...] = ()


def config_reloader(
    config_file: ConfigFile, enable_jobs: tuple[str, ...]
) -> Callable[[], RunnerConfig | None]:
    """What the daemon polls: the new settings when the file changed (mtime or size), else None."""
    last = config_file.signature()

    def reload() -> RunnerConfig | None:
        nonlocal last
        signature = config_file.signature()
        if signature == last:
            return None
        last = signature
        if signature is None:
            log.warning("%s disappeared; keeping the current settings", config_file.path)
            return None
        log.info("%s changed; reloading it", config_file.path)
        return with_enabled_job_types(config_file.load(), list(enable_jobs))

    return reload


def _load(config_file: ConfigFile, paths: RunnerPaths, options: DaemonOptions) -> RunnerConfig:
    if config_file.ensure_exists():
        log.info("created %s with the default settings", config_file.path)
        official = official_config_file(paths.runner_id)
        if official.exists():
            log.warning(
                "the official runner's configuration %s exists: `tuberunner import-config --id %s` takes "
                "its registered instances and settings (stop the official runner first)",
                official,
                paths.runner_id,
            )
    try:
        return with_enabled_job_types(config_file.load(), list(options.enable_jobs))
    except ValueError as exc:
        raise ConfigError("--enable-job", None, str(exc)) from None


def _inputs(
    config: RunnerConfig,
    inputs_dir: Path,
    clients: JobClients,
    metrics: RunnerMetrics,
    shared_disk: SharedDisk | None,
) -> tuple[InputsFactory, InputCache | None]:
    limits = DownloadLimits(deadlines=config.deadlines())
    limits = replace(limits, retry=replace(limits.retry, observer=metrics))
    if config.input_cache_max_bytes <= 0:
        return direct_inputs(clients, limits), None
    cache = InputCache(
        clients,
        inputs_dir,
        max_bytes=config.input_cache_max_bytes,
        max_idle_s=config.input_cache_max_idle_s,
        limits=limits,
        shared_disk=shared_disk,
    )

    def factory(job: AcceptedJob, work_dir: Path) -> AbstractAsyncContextManager[InputFetcher]:
        return cache.inputs_for(job)

    return factory, cache


def encode_cache(config: RunnerConfig, inputs_dir: Path) -> EncodeCache | None:
    """The runner's kept encodes, next to its inputs, with a budget as large as the input cache's (none
    when the input cache is off: the encodes are kept for the jobs that would download the same inputs)."""
    if config.input_cache_max_bytes <= 0:
        return None
    return EncodeCache(
        inputs_dir.absolute(),
        max_bytes=config.input_cache_max_bytes,
        max_idle_s=config.input_cache_max_idle_s,
    )


async def processing_settings(config: RunnerConfig) -> ProcessingSettings:
    """Find and check ffmpeg (raises FfmpegUnavailable with a clear message) and build the settings."""
    ffmpeg = find_ffmpeg(config.ffmpeg_path)
    capabilities = await check_ffmpeg(ffmpeg)
    log.info("ffmpeg %s at %s", capabilities.version, ffmpeg)
    return ProcessingSettings(
        ffmpeg=ffmpeg,
        threads=config.ffmpeg_threads,
        nice=min(config.ffmpeg_nice, 19),
        stall_timeout_s=config.stall_timeout_s,
        max_duration_s=config.max_job_duration_s,
        has_libfdk_aac=capabilities.has_libfdk_aac,
    )


def build_supervisor(
    config: RunnerConfig,
    settings: ProcessingSettings,
    *,
    runner_id: str,
    work_dir: Path,
    inputs_dir: Path,
    outbox_dir: Path | None = None,
    state_file: Path | None = None,
    reload_config: Callable[[], RunnerConfig | None] | None = None,
    flag_instance: Callable[[InstanceConfig], None] | None = None,
    systemd: SystemdNotifier | None = None,
    encodes: EncodeCache | None = None,
    shared_disk: SharedDisk | None = None,
) -> Supervisor:
    """The one way to put a runner together (the daemon and the one-shot mode); ValueError when the
    enabled job types cannot be served. `encodes` shares kept encodes between runners of one process
    (the one-shot mode); by default the runner keeps its own in `inputs_dir`. `shared_disk`: inputs and
    results cross by links with a coordinator of this process (the one-shot mode)."""
    from tuberunner.runner.processors import runner_processors

    # ffmpeg runs in each job's folder: a relative path to an input (a relative `--output` of the
    # one-shot mode, a relative XDG_CACHE_HOME) would point nowhere from there.
    work_dir, inputs_dir = work_dir.absolute(), inputs_dir.absolute()
    outbox_dir = outbox_dir.absolute() if outbox_dir is not None else None
    # With `video-transcription` when its engine can run here (its settings need a restart, like ffmpeg's).
    processors = runner_processors(config)
    clients = JobClients()
    metrics = RunnerMetrics()
    inputs, input_cache = _inputs(config, inputs_dir, clients, metrics, shared_disk)
    if encodes is None:
        encodes = encode_cache(config, inputs_dir)
    kept = encodes

    def holds_video(instance_url: str, video_uuid: str) -> bool:
        return (input_cache is not None and input_cache.holds_video(video_uuid)) or (
            kept is not None and kept.holds_video(instance_url, video_uuid)
        )

    return Supervisor(
        config,
        work_dir=work_dir,
        outbox_dir=outbox_dir,
        processors=processors.table,
        supports=processors.supports,
        settings=settings,
        runner_id=runner_id,
        version=__version__,
        job_clients=clients,
        inputs=inputs,
        state_file=state_file,
        reload_config=reload_config,
        flag_instance=flag_instance,
        metrics=metrics,
        systemd=systemd,
        encodes=encodes,
        holds_video=holds_video,
        client_factory=lambda instance, current: client_for(
            instance.url, instance.runner_token, current, shared_disk=shared_disk
        ),
    )


async def run_daemon(options: DaemonOptions) -> int:
    paths = runner_paths(options.runner_id, config_file=options.config_file)
    config_file = ConfigFile(paths.config_file)
    try:
        reload_config = config_reloader(config_file, options.enable_jobs)
        config = _load(config_file, paths, options)
    except (ConfigError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return EXIT_SETUP
    lock = PidLock(paths.pid_file)
    try:
        lock.acquire()
    except AlreadyRunning as exc:
        log.error("cannot start: %s (%s)", exc, paths.pid_file)
        return EXIT_ALREADY_RUNNING
    try:
        return await _serve(config, paths, config_file, reload_config)
    finally:
        lock.release()


async def _serve(
    config: RunnerConfig,
    paths: RunnerPaths,
    config_file: ConfigFile,
    reload_config: Callable[[], RunnerConfig | None],
) -> int:
    try:
        settings = await processing_settings(config)
    except FfmpegUnavailable as exc:
        log.error("cannot start: %s", exc)
        return EXIT_SETUP

    def flag(instance: InstanceConfig) -> None:
        config_file.set_needs_registration(instance.url, instance.runner_name, instance.runner_token)

    try:
        supervisor = build_supervisor(
            config,
            settings,
            runner_id=paths.runner_id,
            work_dir=paths.work_dir,
            inputs_dir=paths.inputs_dir,
            outbox_dir=paths.outbox_dir,
            state_file=paths.state_file,
            reload_config=reload_config,
            flag_instance=flag,
            systemd=SystemdNotifier.from_env(),
        )
    except ValueError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_SETUP
    if not config.instances:
        log.warning(
            "no instance is registered yet: `tuberunner register --id %s --url ... --registration-token ... "
            "--runner-name ...` adds one; this daemon picks it up without a restart",
            paths.runner_id,
        )
    log.info(
        "runner %r started: %d instance(s), %d slot(s), job types %s",
        paths.runner_id,
        len(config.instances),
        config.concurrency,
        ", ".join(sorted(supervisor.job_types())),
    )
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, supervisor.request_stop)
    loop.add_signal_handler(signal.SIGINT, supervisor.interrupt)
    try:
        async with AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(_endpoint(config, supervisor))
            except OSError as exc:
                log.error("cannot start: the health/metrics endpoint cannot listen: %s", exc)
                return EXIT_SETUP
            clean = await supervisor.run()
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        loop.remove_signal_handler(signal.SIGINT)
        supervisor.systemd.close()
    return EXIT_OK if clean else EXIT_INTERRUPTED


@asynccontextmanager
async def _endpoint(config: RunnerConfig, supervisor: Supervisor) -> AsyncIterator[None]:
    """`/healthz`, `/readyz` and `/metrics` on `[daemon] http_host:http_port` while the daemon runs."""
    if not config.http_port:
        yield
        return
    async with RunnerEndpoint(supervisor, config.http_host, config.http_port) as endpoint:
        supervisor.endpoint_url = endpoint.url
        log.info("health and metrics on %s (/healthz, /readyz, /metrics)", endpoint.url)
        yield
