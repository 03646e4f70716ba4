"""Videos and their files: the rows behind ingest, job inputs and assembled outputs.

File kinds (column `video_files.kind`):

    source        the uploaded original (resolution = its short side)
    web-video     a progressive MP4 output (resolution, fps)
    hls-video     a fragmented MP4 of one HLS rendition (resolution 0 = separated audio)
    hls-playlist  the media playlist of one rendition
    hls-master    the master playlist
    preview       the still image of an audio-only upload
    caption       a WebVTT file (extra: language)
    storyboard    the sprite sheet (extra: sprite geometry)
    task-file     a studio intro/outro/watermark file (name = the served file name)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.engine import RowMapping

from tuberunner.coordinator.database import Database
from tuberunner.coordinator.schema import video_files, videos
from tuberunner.coordinator.storage import StoredObject


@dataclass(frozen=True)
class Video:
    id: int
    uuid: str
    name: str
    state: str
    options: dict[str, Any]
    source: dict[str, Any] | None
    error: str | None
    created_at: float
    updated_at: float

    @classmethod
    def from_row(cls, row: RowMapping) -> Video:
        return cls(**{k: row[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class VideoFile:
    id: int
    video_id: int
    kind: str
    name: str
    path: str
    resolution: int | None
    fps: int | None
    size_bytes: int
    extra: dict[str, Any] | None
    created_at: float

    @classmethod
    def from_row(cls, row: RowMapping) -> VideoFile:
        return cls(**{k: row[k] for k in cls.__dataclass_fields__})


class VideoStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def by_uuid(self, video_uuid: str) -> Video | None:
        async with self.db.read() as conn:
            row = (await conn.execute(select(videos).where(videos.c.uuid == video_uuid))).mappings().first()
        return Video.from_row(row) if row else None

    async def by_id(self, video_id: int) -> Video | None:
        async with self.db.read() as conn:
            row = (await conn.execute(select(videos).where(videos.c.id == video_id))).mappings().first()
        return Video.from_row(row) if row else None

    async def files(self, video_id: int) -> list[VideoFile]:
        async with self.db.read() as conn:
            rows = (
                (
                    await conn.execute(
                        select(video_files)
                        .where(video_files.c.video_id == video_id)
                        .order_by(video_files.c.id)
                    )
                )
                .mappings()
                .all()
            )
        return [VideoFile.from_row(r) for r in rows]

    async def put_file(
        self,
        video_id: int,
        kind: str,
        name: str,
        stored: StoredObject,
        *,
        resolution: int | None = None,
        fps: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Record a file already in storage (replaces a row of the same kind and name)."""
        async with self.db.write() as conn:
            await conn.execute(
                delete(video_files).where(
                    video_files.c.video_id == video_id, video_files.c.kind == kind, video_files.c.name == name
                )
            )
            await conn.execute(
                insert(video_files).values(
                    video_id=video_id,
                    kind=kind,
                    name=name,
                    path=stored.key,
                    resolution=resolution,
                    fps=fps,
                    size_bytes=stored.size_bytes,
                    extra=extra,
                    created_at=time.time(),
                )
            )

    async def input_file(self, video_id: int, which: str) -> VideoFile | None:
        """What the runner file endpoints serve (spec §3.9): `video` = max quality with a video stream,
        `audio` = the separated audio rendition if any, else the same as `video`, `preview`."""
        files = await self.files(video_id)
        if which == "preview":
            return next((f for f in files if f.kind == "preview"), None)
        if which == "audio":
            audio = [f for f in files if f.kind == "hls-video" and f.resolution == 0]
            if audio:
                return audio[0]
        for kind in ("web-video", "hls-video"):
            candidates = [f for f in files if f.kind == kind and (f.resolution or 0) > 0]
            if candidates:
                return max(candidates, key=lambda f: (f.resolution or 0, f.id))
        return next((f for f in files if f.kind == "source"), None)

    async def task_file(self, video_id: int, name: str) -> VideoFile | None:
        files = await self.files(video_id)
        return next((f for f in files if f.kind == "task-file" and f.name == name), None)
