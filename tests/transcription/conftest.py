"""Transcription fixtures: the tiny random Whisper (built once per session, offline), media with a tone,
and a runner whose processors include `video-transcription` as `tuberunner server` builds them."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import E2E, Runner, e2e_coordinator_config, ffmpeg_pids, processing_settings
from tests.transcription.tiny_model import build_tiny_model
from tuberunner import __version__
from tuberunner.coordinator.config import CoordinatorConfig
from tuberunner.media.binaries import find_ffmpeg
from tuberunner.media.samples import make_sample_clip
from tuberunner.runner.config import InstanceConfig
from tuberunner.runner.input_cache import InputCache
from tuberunner.runner.job import AcceptedJob, InputFetcher
from tuberunner.runner.processors import runner_processors
from tuberunner.runner.supervisor import JobClients, Supervisor
from tuberunner.runner.transfers import DownloadLimits
from tuberunner.transcription import TranscriptionSettings
from tuberunner.transcription.faster import THREAD_NAME


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CTranslate2 folder: random 2-layer Whisper, real multilingual vocabulary (see tiny_model.py)."""
    return build_tiny_model(tmp_path_factory.mktemp("whisper") / "tiny-random")


def tiny_settings(model: Path, **overrides: Any) -> TranscriptionSettings:
    """Deterministic and cheap: greedy temperature 0, no VAD (a tone is not speech), one thread."""
    base = TranscriptionSettings(
        model_path=str(model), vad=False, temperature_fallback=False, threads=1, beam_size=1
    )
    return replace(base, **overrides)


@dataclass(frozen=True)
class Clips:
    # 20 s of a 440 Hz tone in a small video: a few windows of decoding (about 1 s).
    tone: Path
    # 180 s of tone, audio only: its transcription lasts much longer than any test waits.
    long_tone: Path
    # A video without an audio stream.
    silent_video: Path


@pytest.fixture(scope="session")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Clips:
    folder = tmp_path_factory.mktemp("transcription-media")
    ffmpeg = find_ffmpeg()

    async def make() -> Clips:
        made = await asyncio.gather(
            make_sample_clip(ffmpeg, folder / "tone.mp4", duration_s=20, width=64, height=36),
            make_sample_clip(ffmpeg, folder / "long-tone.m4a", duration_s=180, audio_only=True),
            make_sample_clip(ffmpeg, folder / "silent.mp4", duration_s=3, width=64, height=36, audio=False),
        )
        return Clips(*made)

    return asyncio.run(make())


def transcribe_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


def no_transcribe_thread_left(timeout_s: float = 5.0) -> bool:
    """True when no decoder thread runs (each one is given `timeout_s` to return: it posts its end to the
    loop as its very last step, so one may still be leaving)."""
    for thread in transcribe_threads():
        thread.join(timeout_s)
    return not transcribe_threads()


# ------------------------------------------------------------------------------------------ coordinator


@pytest.fixture
def database_url() -> str | None:
    return None  # SQLite: the transcription path does not depend on the database


@pytest.fixture
def coordinator_config(tmp_path: Path, database_url: str | None) -> CoordinatorConfig:
    return e2e_coordinator_config(tmp_path / "coordinator", database_url)


# ------------------------------------------------------------------------------------------ the runner

StartTranscriptionRunner = Callable[..., Awaitable[Runner]]


@pytest.fixture
async def start_runner(tmp_path: Path, tiny_model: Path) -> AsyncIterator[StartTranscriptionRunner]:
    """`await start_runner(instances, **config_overrides)`: the daemon's processors (`runner_processors`)
    with the tiny model configured through the `[transcription]` settings."""
    runners: list[Runner] = []

    async def start(instances: Iterable[InstanceConfig], **overrides: Any) -> Runner:
        config = replace(
            E2E,
            instances=tuple(instances),
            transcription_model_path=str(tiny_model),
            transcription_vad=False,
            transcription_temperature_fallback=False,
            transcription_threads=1,
            **overrides,
        )
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

        processors = runner_processors(config)
        supervisor = Supervisor(
            config,
            work_dir=root / "jobs",
            processors=processors.table,
            supports=processors.supports,
            settings=processing_settings(config),
            version=__version__,
            job_clients=clients,
            inputs=inputs,
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
    assert ffmpeg_pids() == [], "ffmpeg processes outlived their runner"
    assert no_transcribe_thread_left(), "a transcription thread outlived its runner"
