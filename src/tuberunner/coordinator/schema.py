"""Database tables (SQLAlchemy Core). Alembic migrations in `migrations/` create exactly these.

Times are stored as epoch seconds (float): portable between SQLite and PostgreSQL, cheap to compare in the
lease reaper, and turned into ISO strings only at the JSON boundary.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

registration_tokens = Table(
    "registration_tokens",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("token", String(100), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

runners = Table(
    "runners",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("token", String(100), nullable=False, unique=True),
    Column("name", String(100), nullable=False, unique=True),
    Column("description", String(1000)),
    Column("version", String(100)),
    Column("ip", String(64)),
    Column("last_contact", Float, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column(
        "registration_token_id",
        Integer,
        ForeignKey("registration_tokens.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("uuid", String(36), nullable=False, unique=True),
    Column("type", String(64), nullable=False),
    Column("state", Integer, nullable=False),
    Column("priority", Integer, nullable=False),
    Column("payload", JSON, nullable=False),
    Column("private_payload", JSON, nullable=False),
    Column("failures", Integer, nullable=False, default=0),
    Column("lease_expiries", Integer, nullable=False, default=0),
    Column("error", Text),
    Column("progress", Integer),
    Column("processing_job_token", String(100), unique=True),
    Column("runner_id", Integer, ForeignKey("runners.id", ondelete="SET NULL"), index=True),
    Column("parent_id", Integer, ForeignKey("jobs.id", ondelete="CASCADE"), index=True),
    Column("video_id", Integer, ForeignKey("videos.id", ondelete="CASCADE"), index=True),
    # Epoch seconds after which a processing or completing job is taken back (DESIGN principle 4).
    Column("lease_expires_at", Float),
    # Files and fields of an accepted `success`, kept until completion finishes so a crash can redo it.
    Column("result", JSON),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("ix_jobs_state_priority_id", "state", "priority", "id"),
    Index("ix_jobs_state_lease", "state", "lease_expires_at"),
)

videos = Table(
    "videos",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("uuid", String(36), nullable=False, unique=True),
    Column("name", String(255), nullable=False),
    Column("state", String(32), nullable=False),
    Column("options", JSON, nullable=False),
    Column("source", JSON),
    Column("error", Text),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

# Every file the coordinator keeps for a video: the upload, job inputs, and assembled outputs.
video_files = Table(
    "video_files",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("video_id", Integer, ForeignKey("videos.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("kind", String(32), nullable=False),
    Column("name", String(255), nullable=False),
    # Relative to the data folder; never built from a client-supplied name.
    Column("path", String(1024), nullable=False),
    Column("resolution", Integer),
    Column("fps", Integer),
    Column("size_bytes", Integer, nullable=False),
    Column("extra", JSON),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("video_id", "kind", "name", name="uq_video_files_video_kind_name"),
)

# A live video (its row in `videos` holds the name): how publishers reach it and what its sessions did.
# `state` is waiting (no session), live (a session is open) or ended; a permanent live goes back to waiting.
lives = Table(
    "lives",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("video_id", Integer, ForeignKey("videos.id", ondelete="CASCADE"), nullable=False, unique=True),
    Column("stream_key", String(64), nullable=False, unique=True),
    Column("state", String(16), nullable=False),
    Column("permanent", Boolean, nullable=False),
    Column("save_replay", Boolean, nullable=False),
    Column("resolutions", JSON, nullable=False),
    # Sessions started so far; the open one is number `session`.
    Column("session", Integer, nullable=False),
    # Live jobs created so far (every job of every session): names its segments, so none is reused.
    Column("attempts", Integer, nullable=False),
    Column("job_uuid", String(36)),
    # The videos made from the recordings of ended sessions.
    Column("replays", JSON, nullable=False),
    Column("error", Text),
    Column("started_at", Float),
    Column("ended_at", Float),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

# Small key/value settings (the hashed admin token).
settings = Table(
    "settings",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)
