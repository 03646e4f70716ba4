"""Coordinator settings: one frozen object, built once (CLI or tests) and passed to constructors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tuberunner.protocol.jobs import JobType

DEFAULT_LEASE_S = 120.0
DEFAULT_LADDER = (1080, 720, 480, 360, 240, 144)


@dataclass(frozen=True)
class CoordinatorConfig:
    data_dir: Path
    # SQLAlchemy URL; None means SQLite (WAL) at `<data_dir>/coordinator.sqlite3`.
    database_url: str | None = None
    # Absolute URL runners use to reach us; put in job payloads. None: derived from the request.
    public_url: str | None = None
    # How long a processing or completing job lives without an accepted update.
    lease_s: dict[JobType, float] = field(default_factory=dict)
    default_lease_s: float = DEFAULT_LEASE_S
    # How often the reaper looks for expired leases.
    reaper_interval_s: float = 5.0
    # After a start, processing and completing jobs keep their lease for at least this long: runners that
    # could not reach us meanwhile need one heartbeat to renew it (15 s by default, 2 s against a server
    # that does not push take-backs), plus margin. PeerTube's watchdog first looks 30 s after its start.
    restart_grace_s: float = 30.0
    # A job whose lease expired this many times is errored instead of re-queued forever (spec §13.12).
    max_lease_expiries: int = 5
    max_upload_bytes: int = 20 * 1024**3
    max_json_body_bytes: int = 500 * 1024
    # `available-jobs` pings are coalesced over this window.
    ping_debounce_s: float = 0.02
    # The in-memory pending view is re-read at least this often (other processes may change jobs).
    view_ttl_s: float = 2.0
    # In-memory lastContact values are written to the database this often.
    last_contact_flush_s: float = 5.0
    # A pending job whose type no connected runner has taken for this long is "unclaimed": shown, counted,
    # logged; an unclaimed storyboard is made by the coordinator itself (`claims`, `builtin_storyboards`).
    unclaimed_after_s: float = 180.0
    admin_token: str | None = None
    redis_url: str | None = None
    # Where stored files live: None for `<data_dir>/files`, another folder, or `s3://BUCKET/PREFIX`.
    storage: str | None = None
    # With object storage, outputs are answered by a redirect to a presigned URL ("redirect") or streamed
    # through the coordinator ("stream": when clients must not reach the bucket).
    serve_outputs: str = "redirect"
    # Lifetime of a presigned GET (output and input redirects: only long enough to start the transfer).
    presigned_get_s: float = 900.0
    # Lifetime of a presigned PUT given to a runner for a result: the whole job may run before it uploads.
    presigned_put_s: float = 24 * 3600.0
    # Ingest defaults.
    resolutions: tuple[int, ...] = DEFAULT_LADDER
    hls: bool = True
    web_video: bool = True
    split_audio: bool = True

    def lease_for(self, job_type: str) -> float:
        try:
            return self.lease_s.get(JobType(job_type), self.default_lease_s)
        except ValueError:
            return self.default_lease_s

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / 'coordinator.sqlite3'}"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def uploads_dir(self) -> Path:
        """Incoming bodies are streamed here, then moved atomically where they belong."""
        return self.data_dir / "uploads"
