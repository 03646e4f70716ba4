"""Every file of live videos, in one place: segments, playlists, the session's state and recordings.

They live in a local folder of the coordinator process that serves RTMP (`<data_dir>/live`), not in its
file storage: a live writes a segment per rendition every few seconds, keeps each a minute at most and
serves it to every viewer at once, which a local folder does best, whatever storage holds the videos (a
replay's source goes to that storage like an upload).

    <data_dir>/live/<uuid>/
        <attempt>-<runner's segment name>.ts   segments listed by our playlists (or just retired)
        <runner's playlist name>.m3u8          our media playlist of each rendition
        master.m3u8                            the runner's master, once each of its renditions has a segment
        live-state.json                        the open session: renditions, windows, pending segments
        recording-<session>-<n>.flv            what the publisher sent (save-replay), one file per publish

The runner's segments and playlists are not served as sent. A segment is stored under the number of the
job (attempt) that sent it, and listed in a playlist written here once the runner's own playlist lists it
(PeerTube's order: chunk, then resolution playlist, then master). Our playlists keep their own media
sequence and mark a discontinuity where a new job took over, so when a runner is lost and another resumes
the live, players see one continuous live: no name is served twice with different bytes, and no sequence
number goes back. Our windows decide when a segment leaves (a `remove-chunk` only drops segments never
listed); a retired segment stays one more window for players that loaded an older playlist.

Everything here is synchronous and short (renames, small writes): an update runs to its end without
letting another update of the same live in between.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from tuberunner.coordinator import rtmp_wire as wire

log = logging.getLogger(__name__)

SEGMENT_NAME: Final = re.compile(r"^[a-z0-9-]+\.ts$")
PLAYLIST_NAME: Final = re.compile(r"^[a-z0-9-]+\.m3u8$")
MASTER_NAME: Final = "master.m3u8"
_STATE_NAME: Final = "live-state.json"
_MAX_PLAYLIST_BYTES: Final = 256 * 1024
_FLV_HEADER: Final = b"FLV\x01\x05\x00\x00\x00\x09\x00\x00\x00\x00"
_URI_ATTRIBUTE: Final = re.compile(r'URI="([^"]*)"')
_UUID: Final = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# Runner names of listed segments remembered per rendition (where its next playlist continues).
_LISTED_KEPT: Final = 8
# Segments received and not listed yet, at most (a runner that never lists what it sends fills no disk).
_MAX_PENDING: Final = 256


class LiveUpdateRefused(ValueError):
    """An update that cannot be applied (its message is the problem detail)."""


class LiveSessionEnded(Exception):
    """The live has no open session any more (PeerTube: "Session of this live ended")."""


@dataclass
class Segment:
    name: str
    duration_s: float
    attempt: int
    discontinuity: bool = False
    # EXT-X-PROGRAM-DATE-TIME as the runner wrote it (ISO 8601), when it did.
    date: str | None = None


@dataclass
class Rendition:
    segments: list[Segment] = field(default_factory=list)
    # Media sequence number of segments[0], and discontinuities that left the window.
    sequence: int = 0
    discontinuity_sequence: int = 0
    retired: list[str] = field(default_factory=list)
    # Runner names of this attempt's segments already listed.
    listed: list[str] = field(default_factory=list)
    total: int = 0


@dataclass
class LiveHls:
    session: int
    list_size: int
    target_s: int
    attempt: int = 0
    renditions: dict[str, Rendition] = field(default_factory=dict)
    # Segments of the current attempt received but not listed yet: runner name → stored name.
    pending: dict[str, str] = field(default_factory=dict)
    master: str | None = None
    master_published: bool = False
    ended: bool = False

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> LiveHls:
        renditions = {
            name: Rendition(
                segments=[Segment(**s) for s in r.pop("segments")],
                **r,
            )
            for name, r in value.pop("renditions").items()
        }
        return cls(renditions=renditions, **value)


@dataclass(frozen=True)
class LiveUpdate:
    """One `update` of a live job, checked (names safe, files present as the type requires)."""

    type: str
    chunk_name: str
    chunk_file: Path | None
    playlist_name: str | None
    playlist_file: Path | None
    master_file: Path | None


@dataclass(frozen=True)
class Published:
    rendition: str
    segment: Segment


class FlvRecorder:
    """What a publisher sends, as an FLV file (the replay's source). A write error stops the recording
    (logged once) without disturbing the live."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[bytes] | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("wb")
            self._file.write(_FLV_HEADER)
        except OSError as exc:
            self._fail(exc)

    def write(self, message: wire.Message) -> None:
        if self._file is None or message.type_id not in (wire.AUDIO, wire.VIDEO, wire.DATA_AMF0):
            return
        size = len(message.payload)
        stamp = message.timestamp & 0xFFFFFFFF
        header = bytes([message.type_id]) + size.to_bytes(3, "big") + (stamp & 0xFFFFFF).to_bytes(3, "big")
        header += bytes([stamp >> 24]) + b"\x00\x00\x00"
        try:
            self._file.write(header + message.payload + struct.pack(">I", 11 + size))
        except OSError as exc:
            self._fail(exc)

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def _fail(self, exc: OSError) -> None:
        log.error("recording %s stopped: %s", self.path, exc)
        self.close()


class LiveFiles:
    def __init__(self, root: Path) -> None:
        self.root = root

    def folder(self, video_uuid: str) -> Path:
        if not _UUID.match(video_uuid):
            raise ValueError(f"not a video uuid: {video_uuid!r}")
        return self.root / video_uuid

    # ---------------------------------------------------------------- sessions

    def begin_session(self, video_uuid: str, session: int, list_size: int, segment_s: float) -> None:
        """Forget the last session's HLS (its recordings stay for its replay) and start an empty one."""
        folder = self.folder(video_uuid)
        folder.mkdir(parents=True, exist_ok=True)
        for path in folder.iterdir():
            if path.suffix in (".ts", ".m3u8") or path.name == _STATE_NAME:
                path.unlink(missing_ok=True)
        self._save(video_uuid, LiveHls(session=session, list_size=list_size, target_s=math.ceil(segment_s)))

    def state(self, video_uuid: str) -> LiveHls | None:
        path = self.folder(video_uuid) / _STATE_NAME
        try:
            return LiveHls.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError) as exc:
            log.error("live state of %s is unreadable (%s); the session's HLS is lost", video_uuid, exc)
            return None

    def finish(self, video_uuid: str) -> None:
        """The session ended: every playlist gets its end tag; pending segments go."""
        state = self.state(video_uuid)
        if state is None or state.ended:
            return
        state.ended = True
        folder = self.folder(video_uuid)
        for stored in state.pending.values():
            (folder / stored).unlink(missing_ok=True)
        state.pending.clear()
        for name, rendition in state.renditions.items():
            if rendition.segments:
                write_atomically(folder / name, _render(rendition, state.target_s, ended=True).encode())
        self._save(video_uuid, state)

    def remove(self, video_uuid: str) -> None:
        shutil.rmtree(self.folder(video_uuid), ignore_errors=True)

    def _save(self, video_uuid: str, state: LiveHls) -> None:
        write_atomically(self.folder(video_uuid) / _STATE_NAME, json.dumps(asdict(state)).encode())

    # ---------------------------------------------------------------- updates

    def apply(self, video_uuid: str, attempt: int, update: LiveUpdate) -> list[Published]:
        """One runner update, in PeerTube's order; returns the segments it made public. Raises
        LiveSessionEnded when no session is open, LiveUpdateRefused for content we cannot serve."""
        state = self.state(video_uuid)
        if state is None or state.ended:
            raise LiveSessionEnded(video_uuid)
        folder = self.folder(video_uuid)
        playlist_text = _read_playlist(update.playlist_file) if update.playlist_file else None
        master_text = _read_playlist(update.master_file) if update.master_file else None
        if master_text is not None and _is_media_playlist(master_text):
            raise LiveUpdateRefused("the master playlist is a media playlist")
        if playlist_text is not None and not _is_media_playlist(playlist_text):
            raise LiveUpdateRefused("the resolution playlist is not a media playlist")
        if attempt < state.attempt:
            raise LiveSessionEnded(video_uuid)  # a job of this session that another one replaced
        if attempt != state.attempt:
            self._switch_attempt(state, folder, attempt)
        if update.type == "add-chunk":
            assert update.chunk_file is not None
            stored = f"{attempt}-{update.chunk_name}"
            already = any(s.name == stored for r in state.renditions.values() for s in r.segments)
            if not already:  # a listed segment is never replaced: players may have it
                os.replace(update.chunk_file, folder / stored)
                state.pending[update.chunk_name] = stored
                while len(state.pending) > _MAX_PENDING:
                    oldest = next(iter(state.pending))
                    (folder / state.pending.pop(oldest)).unlink(missing_ok=True)
        elif update.chunk_name in state.pending:
            (folder / state.pending.pop(update.chunk_name)).unlink(missing_ok=True)
        published: list[Published] = []
        if playlist_text is not None and update.playlist_name is not None:
            published = self._list_segments(state, folder, update.playlist_name, playlist_text)
        if master_text is not None:
            state.master = master_text
            state.master_published = False
        if state.master is not None and not state.master_published:
            self._publish_master(state, folder)
        self._save(video_uuid, state)
        return published

    def _switch_attempt(self, state: LiveHls, folder: Path, attempt: int) -> None:
        """Another job took over: what the last one left unlisted goes; its successor's first segment
        of each rendition comes after a discontinuity."""
        for stored in state.pending.values():
            (folder / stored).unlink(missing_ok=True)
        state.pending.clear()
        state.attempt = attempt
        for rendition in state.renditions.values():
            rendition.listed.clear()

    def _list_segments(self, state: LiveHls, folder: Path, name: str, text: str) -> list[Published]:
        if name == MASTER_NAME:
            raise LiveUpdateRefused(f"{MASTER_NAME} is the master playlist's name")
        rendition = state.renditions.setdefault(name, Rendition())
        entries, target = _parse_media_playlist(text)
        if target is not None and target > state.target_s:
            state.target_s = target
        names = [entry[0] for entry in entries]
        last_listed = rendition.listed[-1] if rendition.listed else None
        if last_listed is not None and last_listed in names:
            entries = entries[len(names) - names[::-1].index(last_listed) :]
        else:
            # Nothing of this playlist listed yet (or it moved past what was): what we do not hold at its
            # head is older than what we hold.
            while entries and entries[0][0] not in state.pending:
                entries.pop(0)
        published: list[Published] = []
        for uri, duration, date in entries:
            stored = state.pending.get(uri)
            if stored is None:
                break  # not received yet: nothing after it may be listed before it
            del state.pending[uri]
            last = rendition.segments[-1] if rendition.segments else None
            segment = Segment(
                name=stored,
                duration_s=duration,
                attempt=state.attempt,
                discontinuity=(last is not None and last.attempt != state.attempt)
                or (last is None and rendition.total > 0),
                date=date,
            )
            rendition.segments.append(segment)
            rendition.listed.append(uri)
            rendition.total += 1
            published.append(Published(name, segment))
        del rendition.listed[:-_LISTED_KEPT]
        while len(rendition.segments) > state.list_size:
            gone = rendition.segments.pop(0)
            rendition.sequence += 1
            if gone.discontinuity:  # RFC 8216 §6.2.1: its tag leaves with it
                rendition.discontinuity_sequence += 1
            rendition.retired.append(gone.name)
        while len(rendition.retired) > state.list_size:
            (folder / rendition.retired.pop(0)).unlink(missing_ok=True)
        if published:
            write_atomically(folder / name, _render(rendition, state.target_s, ended=False).encode())
        return published

    def _publish_master(self, state: LiveHls, folder: Path) -> None:
        """The master is served once every playlist it names lists a segment (the official runner's
        master comes first: players would get 404 for the playlists)."""
        assert state.master is not None
        wanted = _referenced(state.master)
        if wanted and all(
            PLAYLIST_NAME.match(n) and state.renditions.get(n) and state.renditions[n].segments
            for n in wanted
        ):
            write_atomically(folder / MASTER_NAME, state.master.encode())
            state.master_published = True

    # ---------------------------------------------------------------- reads

    def servable(self, video_uuid: str, name: str) -> Path | None:
        """The file to serve for a public live URL, or None."""
        if not (SEGMENT_NAME.match(name) or PLAYLIST_NAME.match(name)):
            return None
        path = self.folder(video_uuid) / name
        return path if path.is_file() else None

    def recorder(self, video_uuid: str, session: int) -> FlvRecorder:
        folder = self.folder(video_uuid)
        index = len(self.recordings(video_uuid, session))
        return FlvRecorder(folder / f"recording-{session}-{index}.flv")

    def recordings(self, video_uuid: str, session: int) -> list[Path]:
        folder = self.folder(video_uuid)
        if not folder.is_dir():
            return []
        found = [p for p in folder.glob(f"recording-{session}-*.flv") if p.stat().st_size > len(_FLV_HEADER)]
        return sorted(found, key=lambda p: int(p.stem.rsplit("-", 1)[1]))

    def drop_recordings(self, video_uuid: str, session: int) -> None:
        for path in self.folder(video_uuid).glob(f"recording-{session}-*.flv"):
            path.unlink(missing_ok=True)

    def replay_folder(self, video_uuid: str) -> Path:
        return self.folder(video_uuid) / "replay"


# ------------------------------------------------------------------------------------------ playlists


def write_atomically(path: Path, data: bytes) -> None:
    """Readers see the old content or the new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_playlist(path: Path) -> str:
    with path.open("rb") as handle:
        data = handle.read(_MAX_PLAYLIST_BYTES + 1)
    if len(data) > _MAX_PLAYLIST_BYTES:
        raise LiveUpdateRefused(f"a playlist is larger than {_MAX_PLAYLIST_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LiveUpdateRefused("a playlist is not UTF-8 text") from exc
    if not text.lstrip("\ufeff").startswith("#EXTM3U"):
        raise LiveUpdateRefused("a playlist has no #EXTM3U header")
    return text


def _is_media_playlist(text: str) -> bool:
    return "#EXT-X-STREAM-INF" not in text and "#EXT-X-MEDIA:" not in text


def _parse_media_playlist(text: str) -> tuple[list[tuple[str, float, str | None]], int | None]:
    entries: list[tuple[str, float, str | None]] = []
    duration: float | None = None
    date: str | None = None
    target: int | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#EXTINF:"):
            try:
                duration = float(line[len("#EXTINF:") :].split(",", 1)[0])
            except ValueError:
                duration = None
        elif line.startswith("#EXT-X-PROGRAM-DATE-TIME:"):
            date = line.split(":", 1)[1]
        elif line.startswith("#EXT-X-TARGETDURATION:"):
            with contextlib.suppress(ValueError):
                target = int(line.split(":", 1)[1])
        elif line and not line.startswith("#"):
            name = line.rsplit("/", 1)[-1].split("?", 1)[0]
            if duration is not None and duration > 0 and SEGMENT_NAME.match(name):
                entries.append((name, duration, date))
            duration, date = None, None
    return entries, target


def _referenced(master: str) -> list[str]:
    names = [line.strip() for line in master.splitlines() if line.strip() and not line.startswith("#")]
    names += _URI_ATTRIBUTE.findall(master)
    return [n.rsplit("/", 1)[-1] for n in names]


def _render(rendition: Rendition, target_s: int, *, ended: bool) -> str:
    target = max([target_s, *(round(s.duration_s) for s in rendition.segments)])
    lines = [
        "#EXTM3U",
        "#EXT-X-VERSION:6",
        f"#EXT-X-TARGETDURATION:{target}",
        f"#EXT-X-MEDIA-SEQUENCE:{rendition.sequence}",
        f"#EXT-X-DISCONTINUITY-SEQUENCE:{rendition.discontinuity_sequence}",
        "#EXT-X-INDEPENDENT-SEGMENTS",
    ]
    for segment in rendition.segments:
        if segment.discontinuity:
            lines.append("#EXT-X-DISCONTINUITY")
        if segment.date:
            lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{segment.date}")
        lines += [f"#EXTINF:{segment.duration_s:.6f},", segment.name]
    if ended:
        lines.append("#EXT-X-ENDLIST")
    return "\n".join(lines) + "\n"
