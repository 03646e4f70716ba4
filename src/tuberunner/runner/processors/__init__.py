"""Job type -> processor, built and validated at import (STYLE lesson 11), and what this runner can run.

`PROCESSORS` is the only table of processors: a duplicate entry or a missing required type fails at
import, never at the first job. `supports(type, payload)` is asked before accepting a job offered by a
server: None means "can run it", anything else is the reason it cannot (unknown or unsupported type,
unknown studio task, malformed payload), for the log and for the decision to leave the job to others.

`runner_processors(config)` is what a runner really runs: this table plus `video-transcription` when the
configured engine can run here, with a support check that also leaves transcription offers to other
runners while this one's transcription slots are taken.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from pydantic import ValidationError

from tuberunner.protocol.jobs import STUDIO_TASK_NAMES, JobType
from tuberunner.protocol.payloads import PAYLOAD_MODELS, parse_payload
from tuberunner.runner.config import RunnerConfig
from tuberunner.runner.job import Processor
from tuberunner.runner.processors import live, storyboard, studio, vod
from tuberunner.runner.processors.common import describe_validation
from tuberunner.runner.processors.transcription import TranscriptionProcessor, transcription_settings
from tuberunner.transcription import engine_problem

__all__ = ["PROCESSORS", "REQUIRED_TYPES", "RunnerProcessors", "build_table", "runner_processors", "supports"]

log = logging.getLogger(__name__)

# Types every build of the runner must be able to run.
REQUIRED_TYPES = frozenset({JobType.VOD_WEB_VIDEO, JobType.VOD_HLS, JobType.VOD_AUDIO_MERGE})


def build_table(
    entries: Iterable[tuple[JobType, Processor]], *, required: frozenset[JobType] = REQUIRED_TYPES
) -> Mapping[JobType, Processor]:
    """A read-only table from `entries`; ValueError on a duplicate, a type without a payload model, or a
    missing required type."""
    table: dict[JobType, Processor] = {}
    for job_type, processor in entries:
        if not isinstance(job_type, JobType):
            raise ValueError(f"{job_type!r} is not a JobType")
        if job_type in table:
            raise ValueError(f"two processors registered for {job_type}")
        if job_type not in PAYLOAD_MODELS:
            raise ValueError(f"no payload model for {job_type}: its jobs could not be checked")
        if not callable(processor):
            raise ValueError(f"the processor for {job_type} is not callable")
        table[job_type] = processor
    missing = required - table.keys()
    if missing:
        raise ValueError(f"no processor for {', '.join(sorted(missing))}")
    return MappingProxyType(table)


PROCESSORS: Mapping[JobType, Processor] = build_table(
    [
        (JobType.VOD_WEB_VIDEO, vod.web_video),
        (JobType.VOD_HLS, vod.hls),
        (JobType.VOD_AUDIO_MERGE, vod.audio_merge),
        (JobType.STORYBOARD, storyboard.storyboard),
        (JobType.STUDIO, studio.studio),
        (JobType.LIVE_RTMP_HLS, live.live),
    ]
)


def supports(job_type: str, payload: Mapping[str, Any]) -> str | None:
    """None when this runner can run a job of `job_type` with `payload`; otherwise the reason it cannot.

    Takes any str (a `JobType` is one) and any mapping, so it fits every caller's callback type."""
    return _support_in(PROCESSORS, job_type, payload)


def _support_in(table: Mapping[JobType, Processor], job_type: str, payload: Mapping[str, Any]) -> str | None:
    try:
        known = JobType(job_type)
    except ValueError:
        return f"unknown job type {job_type!r}"
    if known not in table:
        return f"job type {known} is not supported by this runner"
    return payload_problem(known, payload)


@dataclass(frozen=True)
class RunnerProcessors:
    """What one runner runs: its table, its support check, and its transcription processor (if any)."""

    table: Mapping[JobType, Processor]
    transcription: TranscriptionProcessor | None = None

    def supports(self, job_type: str, payload: Mapping[str, Any]) -> str | None:
        reason = _support_in(self.table, job_type, payload)
        if reason is None and self.transcription is not None and job_type == JobType.TRANSCRIPTION:
            return self.transcription.refusal()
        return reason


def runner_processors(
    config: RunnerConfig, *, transcription: Callable[[], TranscriptionProcessor] | None = None
) -> RunnerProcessors:
    """`PROCESSORS` plus what depends on `config`: `video-transcription` when it is enabled and its
    configured engine can run here (otherwise the reason is logged and the type is not asked for; if it
    was enabled explicitly, the supervisor refuses to start). `transcription` builds the processor
    instead of the configuration (tests)."""
    enabled = config.enabled_job_types
    if enabled is not None and JobType.TRANSCRIPTION not in enabled:
        return RunnerProcessors(PROCESSORS)
    if transcription is None:
        settings = transcription_settings(config)
        problem = engine_problem(settings)
        if problem is not None:
            level = logging.WARNING if enabled is not None else logging.INFO
            log.log(level, "video-transcription jobs are not taken: %s", problem)
            return RunnerProcessors(PROCESSORS)
        processor = TranscriptionProcessor(settings)
    else:
        processor = transcription()
    table = build_table([*PROCESSORS.items(), (JobType.TRANSCRIPTION, processor)])
    return RunnerProcessors(table, processor)


def payload_problem(job_type: JobType, payload: object) -> str | None:
    """Why `payload` cannot be run as a `job_type` job, or None."""
    if not isinstance(payload, Mapping):
        return f"malformed {job_type} payload: not an object"
    payload = dict(payload)
    if job_type == JobType.STUDIO:
        tasks = payload.get("tasks")
        if isinstance(tasks, list):
            for task in tasks:
                name = task.get("name") if isinstance(task, dict) else None
                if name not in STUDIO_TASK_NAMES:
                    return f"unknown studio task {name!r}"
    try:
        parse_payload(job_type, payload)
    except ValidationError as exc:
        return f"malformed {job_type} payload: {describe_validation(exc)}"
    return None
