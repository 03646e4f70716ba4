"""What a processor sees of a job, and what it gives back."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from tuberunner.protocol.jobs import JobType

if TYPE_CHECKING:
    from tuberunner.runner.encode_cache import EncodeCache


@dataclass(frozen=True)
class AcceptedJob:
    uuid: str
    type: JobType
    payload: dict[str, Any]
    job_token: str
    # Which registered instance gave us the job (its URL).
    instance_url: str


@dataclass(frozen=True)
class JobOutput:
    """Result files by success field name (`videoFile`, `resolutionPlaylistFile`, `vttFile`,
    `storyboardFile`) and text fields (`inputLanguage`)."""

    files: dict[str, Path]
    fields: dict[str, str] = field(default_factory=dict)


class InputFetcher(Protocol):
    async def __call__(self, url: str) -> Path:
        """Download an input of this job (POST with its tokens), resuming and caching; returns a local
        path the processor may read but must not modify or delete."""
        ...


@dataclass(frozen=True)
class LiveChunkUpdate:
    """One `update` of a live job (spec §7.4): a segment added (its file) or removed, with the media
    playlist that lists it (never a segment the server has not received) and the master, once."""

    kind: Literal["add-chunk", "remove-chunk"]
    chunk_name: str
    chunk_file: Path | None = None
    # (name on the server, its text)
    playlist: tuple[str, str] | None = None
    # The master playlist's text.
    master: str | None = None


class LiveLink(Protocol):
    """What a live job needs of the runner beyond the work folder: its updates, and where to count its
    segments (`outcome`: uploaded, skipped; `lag_s`: from ffmpeg listing it to the server's answer)."""

    async def send(self, update: LiveChunkUpdate) -> None: ...

    def segment_done(self, outcome: str, lag_s: float | None) -> None: ...


@dataclass(frozen=True)
class ProcessingSettings:
    ffmpeg: Path
    threads: int = 0
    nice: int = 0
    # No ffmpeg progress for this long: the child is killed and the job reported as errored.
    stall_timeout_s: float = 120.0
    # Hard limit for one ffmpeg run; None = no limit.
    max_duration_s: float | None = None
    has_libfdk_aac: bool = False


@dataclass
class JobContext:
    job: AcceptedJob
    # Private folder of this job; the supervisor deletes it whatever happens.
    work_dir: Path
    settings: ProcessingSettings
    fetch_input: InputFetcher
    # Cheap and synchronous: the heartbeat loop sends the latest value (0-100, None = unknown).
    report_progress: Callable[[float | None], None]
    # ffmpeg's speed (media seconds per wall second), for `status` and metrics.
    report_speed: Callable[[float | None], None] = lambda speed: None
    # Encodes this runner made, reused instead of encoding again (None: no reuse).
    encodes: EncodeCache | None = None
    # Live jobs only: updates and segment counts (None for other types).
    live: LiveLink | None = None


Processor = Callable[[JobContext], Awaitable[JobOutput]]
