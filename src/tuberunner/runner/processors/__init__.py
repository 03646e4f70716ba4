"""Job type -> processor, built and validated at import (STYLE lesson 11), and what this runner can run.

`PROCESSORS` is the only table of processors: a duplicate entry or a missing required type fails at
import, never at the first job. `supports(type, payload)` is asked before accepting a job offered by a
server: None means "can run it", anything else is the reason it cannot (unknown or unsupported type,
unknown studio task, malformed payload), for the log and for the decision to leave the job to others.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from pydantic import ValidationError

from tuberunner.protocol.jobs import STUDIO_TASK_NAMES, JobType
from tuberunner.protocol.payloads import PAYLOAD_MODELS, parse_payload
from tuberunner.runner.job import Processor
from tuberunner.runner.processors import storyboard, vod
from tuberunner.runner.processors.common import describe_validation

__all__ = ["PROCESSORS", "REQUIRED_TYPES", "build_table", "supports"]

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
    ]
)


def supports(job_type: str, payload: Mapping[str, Any]) -> str | None:
    """None when this runner can run a job of `job_type` with `payload`; otherwise the reason it cannot.

    Takes any str (a `JobType` is one) and any mapping, so it fits every caller's callback type."""
    try:
        known = JobType(job_type)
    except ValueError:
        return f"unknown job type {job_type!r}"
    if known not in PROCESSORS:
        return f"job type {known} is not supported by this runner"
    return payload_problem(known, payload)


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
