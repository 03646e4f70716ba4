"""Rows as typed values, and their JSON shapes on the wire (spec §5)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import RowMapping

from tuberunner.protocol.jobs import JobState, JobType

RUNNER_URL_PREFIX = "/api/v1/runners/"


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def absolutize(value: Any, base_url: str) -> Any:
    """Payloads store runner file URLs as paths; runners get them absolute, built from our current URL."""
    if isinstance(value, str):
        return base_url + value if value.startswith(RUNNER_URL_PREFIX) else value
    if isinstance(value, dict):
        return {k: absolutize(v, base_url) for k, v in value.items()}
    if isinstance(value, list):
        return [absolutize(v, base_url) for v in value]
    return value


@dataclass(frozen=True)
class Runner:
    id: int
    name: str
    description: str | None

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "description": self.description}


@dataclass(frozen=True)
class Job:
    id: int
    uuid: str
    type: JobType
    state: JobState
    priority: int
    payload: dict[str, Any]
    private_payload: dict[str, Any]
    failures: int
    lease_expiries: int
    error: str | None
    progress: int | None
    processing_job_token: str | None
    runner_id: int | None
    parent_id: int | None
    video_id: int | None
    lease_expires_at: float | None
    result: dict[str, Any] | None
    started_at: float | None
    finished_at: float | None
    created_at: float
    updated_at: float

    @classmethod
    def from_row(cls, row: RowMapping) -> Job:
        return cls(
            id=row["id"],
            uuid=row["uuid"],
            type=JobType(row["type"]),
            state=JobState(row["state"]),
            priority=row["priority"],
            payload=row["payload"],
            private_payload=row["private_payload"],
            failures=row["failures"],
            lease_expiries=row["lease_expiries"],
            error=row["error"],
            progress=row["progress"],
            processing_job_token=row["processing_job_token"],
            runner_id=row["runner_id"],
            parent_id=row["parent_id"],
            video_id=row["video_id"],
            lease_expires_at=row["lease_expires_at"],
            result=row["result"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )

    def as_json(self, base_url: str, runner: Runner | None) -> dict[str, Any]:
        """The runner view of a job (accept answer); admin views add to it."""
        body: dict[str, Any] = {
            "uuid": self.uuid,
            "type": str(self.type),
            "state": self.state.as_json(),
            "payload": absolutize(self.payload, base_url),
            "failures": self.failures,
            "error": self.error,
            "progress": self.progress,
            "priority": self.priority,
            "createdAt": iso(self.created_at),
            "updatedAt": iso(self.updated_at),
            "runner": runner.as_json() if runner else None,
        }
        if self.started_at is not None:
            body["startedAt"] = iso(self.started_at)
        if self.finished_at is not None:
            body["finishedAt"] = iso(self.finished_at)
        return body


@dataclass(frozen=True)
class JobSpec:
    """A job to create. Payload URLs are paths (`/api/v1/runners/jobs/<uuid>/files/...`)."""

    uuid: str
    type: JobType
    priority: int
    payload: dict[str, Any]
    private_payload: dict[str, Any]
    parent_uuid: str | None = None


@dataclass(frozen=True)
class JobResult:
    """What an accepted `success` brought: storage-relative paths by field name, and text fields."""

    files: dict[str, str]
    fields: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {"files": self.files, "fields": self.fields}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> JobResult:
        return cls(files=dict(value.get("files", {})), fields=dict(value.get("fields", {})))
