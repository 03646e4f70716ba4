"""Coordinator settings: one frozen object, built once (CLI or tests) and passed to constructors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tuberunner.protocol.jobs import JobType

DEFAULT_LEASE_S = 120.0
DEFAULT_LADDER = (1080, 720, 480, 360, 240, 144)
# PeerTube's `remote_runners.stalled_jobs.live`: a live job without an update for this long is taken back.
LIVE_LEASE_S = 30.0
DEFAULT_LIVE_RESOLUTIONS = (720, 480, 360)
DEFAULT_RTMP_PORT = 1935


def _default_leases() -> dict[JobType, float]:
    return {JobType.LIVE_RTMP_HLS: LIVE_LEASE_S}


@dataclass(frozen=True)
class CoordinatorConfig:
    data_dir: Path
    # SQLAlchemy URL; None means SQLite (WAL) at `<data_dir>/coordinator.sqlite3`.
    database_url: str | None = None
    # Absolute URL runners use to reach us; put in job payloads. None: derived from the request.
    public_url: str | None = None
    # How long a processing or completing job lives without an accepted update.
    lease_s: dict[JobType, float] = field(default_factory=_default_leases)
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
    # Live: the RTMP server (port 0: live off; tests pass None for a free port), the host publishers and
    # runners use in RTMP URLs (default: the host of the request, or of `public_url`), HLS settings sent to
    # runners (PeerTube's normal latency: 4 s segments, 15 in a playlist), and the default ladder.
    rtmp_port: int | None = 0
    rtmp_host: str = "127.0.0.1"
    rtmp_public_host: str | None = None
    live_segment_duration_s: float = 4.0
    live_segment_list_size: int = 15
    live_resolutions: tuple[int, ...] = DEFAULT_LIVE_RESOLUTIONS
    # How long a live whose publisher left waits for it to come back (or for its runner to deliver the
    # last segments) before the session ends.
    live_reconnect_grace_s: float = 10.0

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
