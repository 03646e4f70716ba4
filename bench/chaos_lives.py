"""The live workload of `bench/chaos.py`: lives published by real `ffmpeg -re` publishers to the coordinator's
RTMP server while the VOD work and the faults go on, a viewer per publication reading the live HLS as a
player does, and the invariants of lives.

    root/publishers/publisher-<n>.log     each publisher's output (every attempt of publication n)

A channel publishes one live at a time, back to back until the end of the fault window: a generated stream
(testsrc2 and a sine, 320x240, 25 fps, a keyframe every second: `tests.support.live.publish_args`) for a
random number of seconds, to a new live or (sometimes) again to the channel's permanent live, which starts
a new session of it. A publisher whose connection breaks (a coordinator restart, a live cancelled) does what
OBS does: it publishes again a second later, until its planned end, unless the live has ended. The
`publisher-drop` fault SIGKILLs a publisher: it does not come back.

After its publisher stops, a publication waits (bounded) for its live to leave the `live` state; the viewer
then reads the playlists once more: they must carry their end tag.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
from tests.support.live import publish_args

from chaos_cluster import (
    CANCELLED,
    COMPLETED,
    ERRORED,
    FINAL_STATES,
    LIVE_JOB,
    Child,
    Cluster,
    Snapshot,
    parse_time,
    python_env,
)

if TYPE_CHECKING:
    from chaos_faults import Faults
    from chaos_report import RunFacts

__all__ = ["LiveOptions", "Lives", "Publication", "check_lives", "live_job_problem"]

# A publication shorter than this is not started (the end of the window is near).
MIN_PUBLICATION_S = 6.0
# Publications end this long before the end of the fault window, so that the settle finds them over.
END_MARGIN_S = 2.0
# A publisher that exits this close to its planned end has ended (whatever its exit code).
PLANNED_END_SLACK_S = 1.0
# A publisher whose connection broke publishes again after this pause (OBS waits a few seconds).
REPUBLISH_PAUSE_S = 1.0
# How long a live may stay `live` after its publisher stopped: the reconnect grace (10 s), or a lost
# runner's live lease (30 s) and the reaper (5 s), plus margin.
END_WAIT_S = 60.0
# How often the viewer reads the playlists.
VIEW_PERIOD_S = 1.0
# A publication that ran this long with no fault on its live must have shown viewers a segment.
SEGMENT_EXPECTED_AFTER_S = 10.0
_SEQUENCE = re.compile(r"#EXT-X-MEDIA-SEQUENCE:(\d+)")


@dataclass(frozen=True)
class LiveOptions:
    channels: int
    seconds: tuple[float, float]
    # Ladders asked for the lives (the coordinator keeps those up to the stream's 240p).
    ladders: tuple[str, ...] = ("240", "240,144")
    # Share of new lives that are permanent, and of publications that go to the permanent live again.
    permanent_share: float = 0.4
    again_share: float = 0.6


@dataclass
class LiveRecord:
    video_uuid: str
    name: str
    permanent: bool
    ladder: str
    publish_url: str
    hls_url: str


@dataclass
class Publication:
    number: int
    live: LiveRecord
    planned_s: float
    started_at: float  # seconds since the start of the run
    started_wall: float = field(default_factory=time.time)
    # When the end was seen (or the wait for it gave up).
    finished_wall: float | None = None
    publisher: Child | None = None
    # ended: its planned end (ffmpeg's -t); dropped: the publisher-drop fault; cut: the connection broke
    # and it could not publish again (the live had ended, or its time was up).
    how: str = ""
    attempts: int = 0
    dropped: bool = False
    stopped_at: float | None = None  # monotonic
    done: bool = False
    # Observed when the live left the `live` state (or the wait gave up).
    session: int | None = None
    end_state: str | None = None
    end_error: str | None = None
    ended_after_s: float | None = None
    viewer: Viewer | None = None

    @property
    def publishing(self) -> bool:
        return self.publisher is not None and self.publisher.alive and not self.dropped

    def describe(self) -> str:
        kind = "permanent live" if self.live.permanent else "live"
        return f"publication {self.number} ({kind} {self.live.video_uuid[:8]}, {self.planned_s:.0f} s)"

    def as_json(self) -> dict[str, Any]:
        viewer = self.viewer
        return {
            "number": self.number,
            "videoUuid": self.live.video_uuid,
            "permanent": self.live.permanent,
            "ladder": self.live.ladder,
            "plannedS": round(self.planned_s, 1),
            "startedAtS": round(self.started_at, 3),
            "how": self.how,
            "attempts": self.attempts,
            "session": self.session,
            "endState": self.end_state,
            "endError": self.end_error,
            "endedAfterS": None if self.ended_after_s is None else round(self.ended_after_s, 3),
            "segmentsSeen": viewer.segment_count() if viewer is not None else 0,
            "viewerProblems": (viewer.problems + viewer.gaps()) if viewer is not None else [],
            "viewerBrokenAnswers": viewer.broken if viewer is not None else [],
        }


class Viewer:
    """Reads a live's HLS every `VIEW_PERIOD_S` as a player does: the master, each media playlist, and
    each segment once. A sequence number must always name the same segment, sequence numbers must follow
    each other without a gap, every listed segment must be served, and once the session ended its
    playlists must carry their end tag. A read is kept only when the live's session was the same before
    and after it (a new session of a permanent live starts its HLS afresh)."""

    def __init__(self, http: httpx.AsyncClient, hls_url: str, t0: float) -> None:
        self.http = http
        self.hls_url = hls_url
        self.base = hls_url.rsplit("/", 1)[0]
        self.t0 = t0
        # (session, playlist) -> sequence number -> segment name
        self.segments: dict[tuple[int, str], dict[int, str]] = {}
        self.fetched: set[str] = set()
        self.problems: list[str] = []
        # Answers that broke off (a coordinator killed then, or a file replaced while it was served): a
        # player reads again; listed in a note.
        self.broken: list[str] = []

    async def look(self, session: int, *, final: bool) -> _Read | None:
        """One read of every playlist; None when nothing could be read (not yet, or the coordinator is
        restarting)."""
        read = _Read(session)
        try:
            master = await self.http.get(self.hls_url)
            if master.status_code != 200:
                return None
            names = {
                line.strip()
                for line in master.text.splitlines()
                if line.strip().endswith(".m3u8") and not line.startswith("#")
            }
            names |= set(re.findall(r'URI="([^"]+\.m3u8)"', master.text))
            for name in sorted(names):
                await self._read(read, name, final=final)
        except httpx.RemoteProtocolError as exc:
            self.broken.append(f"at {time.monotonic() - self.t0:.1f} s: {exc}")
            return None
        except httpx.HTTPError:
            return None
        return read

    async def _read(self, read: _Read, name: str, *, final: bool) -> None:
        answer = await self.http.get(f"{self.base}/{name}")
        if answer.status_code != 200:
            read.problems.append(f"{name} listed by the master answered {answer.status_code}")
            return
        text = answer.text
        found = _SEQUENCE.search(text)
        first = int(found.group(1)) if found else 0
        listed = [line.strip() for line in text.splitlines() if line.strip().endswith(".ts")]
        for index, segment in enumerate(listed):
            read.listed.append((name, first + index, segment))
            if segment not in self.fetched and segment not in read.fetched:
                got = await self.http.get(f"{self.base}/{segment}")
                read.fetched.add(segment)
                if got.status_code != 200 or not got.content:
                    read.problems.append(
                        f"segment {segment} listed by {name} answered {got.status_code} "
                        f"({len(got.content)} bytes)"
                    )
        if final and listed and "#EXT-X-ENDLIST" not in text:
            read.problems.append(f"{name} has no end tag after the session ended")

    def keep(self, read: _Read) -> None:
        """Record a read made within one session."""
        self.fetched |= read.fetched
        found = [f"session {read.session}: {p}" for p in read.problems]
        for name, number, segment in read.listed:
            known = self.segments.setdefault((read.session, name), {})
            before = known.setdefault(number, segment)
            if before != segment:
                found.append(f"session {read.session}: {name} number {number} named {before}, then {segment}")
        self.problems += [p for p in found if p not in self.problems]  # a problem seen at every read, once

    def gaps(self) -> list[str]:
        found = []
        for (session, name), known in sorted(self.segments.items()):
            missing = sorted(set(range(min(known), max(known) + 1)) - set(known)) if known else []
            if missing:
                found.append(
                    f"session {session}: {name} never listed sequence number(s) "
                    + ", ".join(map(str, missing[:10]))
                    + (" ..." if len(missing) > 10 else "")
                )
        return found

    def segment_count(self) -> int:
        return sum(len(known) for known in self.segments.values())


@dataclass
class _Read:
    session: int
    listed: list[tuple[str, int, str]] = field(default_factory=list)
    fetched: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)


class Lives:
    """Every live of the run, their publications, and the `publisher-drop` fault's way to kill one."""

    def __init__(
        self,
        cluster: Cluster,
        options: LiveOptions,
        seed: int,
        t0: float,
        say: Callable[[str], None],
        deadline: float,
    ) -> None:
        self.cluster = cluster
        self.options = options
        self.seed = seed
        self.t0 = t0
        self.say = say
        # The end of the fault window (monotonic): no publication starts too close to it.
        self.deadline = deadline
        self.folder = cluster.root / "publishers"
        self.records: dict[str, LiveRecord] = {}
        self.publications: list[Publication] = []
        self._numbers = 0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def as_json(self) -> list[dict[str, Any]]:
        return [p.as_json() for p in self.publications]

    def publishing(self) -> list[Publication]:
        """Publications whose publisher runs now."""
        return [p for p in self.publications if p.publishing]

    def in_progress(self) -> list[Publication]:
        """Publications not over yet: publishing, publishing again, or waiting for their live to end."""
        return [p for p in self.publications if not p.done]

    @property
    def over(self) -> bool:
        """No publisher runs and none will start any more (the end of the window is too near)."""
        last_start = self.deadline - END_MARGIN_S - MIN_PUBLICATION_S
        return time.monotonic() > last_start and not self.publishing()

    async def drop(self, publication: Publication) -> None:
        """The `publisher-drop` fault: SIGKILL the publisher; it does not publish again."""
        publication.dropped = True
        if publication.publisher is not None:
            await publication.publisher.kill()

    # ------------------------------------------------------------------ the workload

    async def run(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        timeout = httpx.Timeout(5.0, connect=2.0)
        async with httpx.AsyncClient(timeout=timeout) as http, asyncio.TaskGroup() as tg:
            for index in range(1, self.options.channels + 1):
                tg.create_task(self._channel(index, http), name=f"live channel {index}")

    async def _channel(self, index: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(self.seed * 104_729 + index)
        permanent: LiveRecord | None = None
        while True:
            # Every decision of the round first: the sequence does not depend on timing.
            seconds = rng.uniform(*self.options.seconds)
            again = rng.random() < self.options.again_share
            new_permanent = rng.random() < self.options.permanent_share
            ladder = rng.choice(self.options.ladders)
            pause = rng.uniform(1.0, 4.0)
            left = self.deadline - time.monotonic() - END_MARGIN_S
            if left < MIN_PUBLICATION_S:
                return
            if permanent is not None and again:
                record = permanent
            else:
                record = await self._create(index, ladder, new_permanent)
                if record.permanent:
                    permanent = record
            self._numbers += 1
            publication = Publication(self._numbers, record, min(seconds, left), self.now())
            self.publications.append(publication)
            try:
                await self._publish(publication, http)
            finally:
                publication.done = True
            await asyncio.sleep(pause)  # the channel's pause between two publications

    async def _create(self, channel: int, ladder: str, permanent: bool) -> LiveRecord:
        name = f"chaos-live-{channel}-{len(self.records) + 1}"
        created = await self.cluster.admin.create_live(name, ladder, permanent=permanent)
        live = created["live"]
        record = LiveRecord(
            video_uuid=str(created["video"]["uuid"]),
            name=name,
            permanent=permanent,
            ladder=ladder,
            publish_url=f"{live['rtmpUrl']}/{live['streamKey']}",
            hls_url=str(live["hlsUrl"]),
        )
        self.records[record.video_uuid] = record
        return record

    async def _publish(self, publication: Publication, http: httpx.AsyncClient) -> None:
        record = publication.live
        monitor = self.cluster.monitor
        monitor.track_lives([record.video_uuid])
        publication.viewer = viewer = Viewer(http, record.hls_url, self.t0)
        watching = asyncio.create_task(self._watch(publication, viewer), name=f"viewer {publication.number}")
        self.say(f"{publication.describe()} starts ({record.ladder}p asked)")
        try:
            await self._publisher(publication)
            publication.stopped_at = time.monotonic()
            seen = await monitor.until(lambda s: _over(s, record.video_uuid), END_WAIT_S)
            live = (seen or monitor.latest).lives.get(record.video_uuid)
            if seen is not None:
                publication.ended_after_s = time.monotonic() - publication.stopped_at
            publication.finished_wall = time.time()
            if live is not None:
                publication.session = live.session
                publication.end_state = live.state
                publication.end_error = live.error
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
            if seen is not None:
                await self._look(record.video_uuid, viewer, final=True)
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
            if publication.publisher is not None:
                await publication.publisher.kill()
            monitor.untrack_lives([record.video_uuid])
        ended = (
            f"{publication.end_state} {publication.ended_after_s:.1f} s after"
            if publication.ended_after_s is not None
            else f"still {publication.end_state} {END_WAIT_S:g} s after"
        )
        error = f" ({publication.end_error})" if publication.end_error else ""
        self.say(
            f"{publication.describe()} {publication.how} after {publication.attempts} attempt(s); "
            f"{ended} its publisher stopped{error}; {viewer.segment_count()} segment(s) seen"
        )

    async def _publisher(self, publication: Publication) -> None:
        """Publish until the planned end; publish again after a broken connection, as OBS does, unless the
        live has ended or the publisher was dropped."""
        end_at = time.monotonic() + publication.planned_s
        log = self.folder / f"publisher-{publication.number}.log"
        while True:
            left = end_at - time.monotonic()
            publication.attempts += 1
            child = Child(
                f"publisher-{publication.number}",
                publish_args(publication.live.publish_url, round(left, 1)),
                python_env(),
                log,
                cwd=self.folder,
            )
            publication.publisher = child
            await child.start()
            assert child.proc is not None
            code = await child.proc.wait()
            if publication.dropped:
                publication.how = "dropped"
                return
            if code == 0 or time.monotonic() >= end_at - PLANNED_END_SLACK_S:
                # ffmpeg may exit with an error at its planned end too, when the server closes the
                # connection on the publisher's goodbye before ffmpeg is done closing it.
                publication.how = "ended"
                return
            if end_at - time.monotonic() < REPUBLISH_PAUSE_S + MIN_PUBLICATION_S / 2:
                publication.how = "cut"
                return
            await asyncio.sleep(REPUBLISH_PAUSE_S)  # a publisher's pace before it publishes again
            try:
                live = await self.cluster.admin.live(publication.live.video_uuid, deadline_s=0)
            except httpx.HTTPError:
                live = {}  # the coordinator is restarting: try to publish anyway
            if live is None or live.get("state") == "ended":
                publication.how = "cut"
                return

    async def _watch(self, publication: Publication, viewer: Viewer) -> None:
        """The viewer's reads while the live runs, each kept when the monitor saw one session around it."""
        uuid = publication.live.video_uuid
        while True:
            await self._look(uuid, viewer, final=False)
            await asyncio.sleep(VIEW_PERIOD_S)  # a player's polling period

    async def _look(self, uuid: str, viewer: Viewer, *, final: bool) -> None:
        monitor = self.cluster.monitor
        before = monitor.latest.lives.get(uuid)
        if before is None or (before.state == "live") == final:
            return
        read = await viewer.look(before.session, final=final)
        after = await monitor.until(lambda s: True, 5.0)  # the next look at the system
        now = after.lives.get(uuid) if after is not None else None
        if read is not None and now is not None and now.session == before.session:
            viewer.keep(read)


def _over(s: Snapshot, video_uuid: str) -> bool:
    """The live is not `live` any more (or it is gone), as the coordinator says."""
    if not s.coordinator_up or video_uuid not in s.lives:
        return False
    live = s.lives[video_uuid]
    return live is None or live.state != "live"


# ------------------------------------------------------------------------------------------ invariants


def live_job_problem(job: dict[str, Any], touched: bool, cancelled: set[str]) -> str | None:
    """How a live job ended, judged: completed; or, on a live a fault touched, errored with a reason or
    cancelled (by the chaos, or by the end of its session); on an untouched live nothing but completed."""
    state = job["state"]["id"]
    if state == COMPLETED:
        return None
    if state == ERRORED:
        error = (job.get("error") or "").strip()
        if not error:
            return "errored without a reason"
        return None if touched else f"errored on a live no fault touched: {error[:300]}"
    if state == CANCELLED:
        if job["uuid"] in cancelled or touched:
            return None
        return "cancelled on a live no fault touched"
    if state in FINAL_STATES:
        return f"ended {job['state']['label']} (a live job has no parent)"
    return None  # unfinished: the `no job stuck` row says so


def _touches(faults: Faults | None, video_uuid: str, start: float | None, end: float | None) -> list[str]:
    """The faults that touched a live between two wall times, as `#n kind`."""
    if faults is None or start is None:
        return []
    return [f"#{r.number} {r.kind}" for r in faults.touched(video_uuid, start, end or time.time())]


def check_lives(facts: RunFacts, jobs: list[dict[str, Any]], videos: list[dict[str, Any]]) -> None:
    """The rows of the lives: every live ended after its publisher stopped, its jobs ended as documented,
    its HLS had no gap while it ran. A session or a job that a fault touched (the fault's span, from its
    start until the system worked again, overlaps it) may end with an error; the others may not."""
    lives = facts.lives
    if lives is None:
        return
    faults = facts.faults
    by_video = {v["uuid"]: v for v in videos}

    # -- ended
    problems: list[str] = []
    states: Counter[str] = Counter()
    for pub in lives.publications:
        what = pub.describe()
        hit = _touches(faults, pub.live.video_uuid, pub.started_wall, pub.finished_wall)
        if pub.ended_after_s is None:
            problems.append(f"{what}: still {pub.end_state} {END_WAIT_S:g} s after its publisher stopped")
            continue
        expected = "waiting" if pub.live.permanent else "ended"
        if pub.end_state != expected:
            problems.append(f"{what}: {pub.end_state} after its publisher stopped, not {expected}")
        if pub.end_error and not hit:
            problems.append(
                f"{what}: its session ended with an error, and no fault touched it: {pub.end_error}"
            )
        states[f"{pub.how}, then {pub.end_state}" + (" (fault-touched)" if hit else "")] += 1
    for uuid, record in lives.records.items():
        video = by_video.get(uuid)
        if video is None:
            problems.append(f"live {uuid} ({record.name}) is gone")
        elif video["state"] not in ("ended", "waiting"):
            problems.append(f"live {uuid} ({record.name}) is {video['state']} at the end")
    ends = [p.ended_after_s for p in lives.publications if p.ended_after_s is not None]
    facts.add(
        "every live ended after its publisher stopped (ended, or waiting when permanent)",
        problems,
        f"{len(lives.publications)} publication(s) of {len(lives.records)} live(s): "
        + (", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none")
        + (f"; ended {max(ends):.1f} s at most after the publisher stopped" if ends else ""),
    )

    # -- live jobs
    cancelled = faults.cancelled_jobs if faults else set()
    bad: list[str] = []
    ends_by: Counter[str] = Counter()
    for job in (j for j in jobs if j["type"] == LIVE_JOB):
        video_uuid = str((job.get("privatePayload") or {}).get("videoUUID"))
        hit = _touches(faults, video_uuid, parse_time(job.get("createdAt")), parse_time(job.get("updatedAt")))
        problem = live_job_problem(job, bool(hit), cancelled)
        label = job["state"]["label"].lower()
        if job["state"]["id"] == ERRORED:
            label += f" ({(job.get('error') or '').splitlines()[0][:60]})"
        ends_by[label] += 1
        if problem:
            bad.append(f"live job {job['uuid']} of live {video_uuid}: {problem}")
    facts.add(
        "every live job completed, or ended as the faults on its live explain",
        bad,
        ", ".join(f"{n} {s}" for s, n in ends_by.most_common()) or "no live job",
    )

    # -- HLS
    hls: list[str] = []
    segments = 0
    for pub in lives.publications:
        viewer = pub.viewer
        if viewer is None:
            continue
        segments += viewer.segment_count()
        hls += [f"{pub.describe()}: {p}" for p in viewer.problems + viewer.gaps()]
        hit = _touches(faults, pub.live.video_uuid, pub.started_wall, pub.finished_wall)
        long_enough = pub.how == "ended" and pub.planned_s >= SEGMENT_EXPECTED_AFTER_S
        if long_enough and not hit and not viewer.segment_count():
            hls.append(f"{pub.describe()}: viewers never got a segment")
    facts.add(
        "live HLS served without a gap while it ran (sequence, segments, end tag)",
        hls,
        f"{segments} segment(s) listed and fetched by the viewers",
    )
    broken = [b for p in lives.publications if p.viewer is not None for b in p.viewer.broken]
    if broken:
        facts.notes.append(
            f"{len(broken)} live HLS answer(s) broke off (a coordinator killed then, or a playlist replaced "
            "while it was served): " + "; ".join(broken[:10])
        )
    touched = faults.touched_lives if faults else {}
    if touched:
        facts.notes.append(
            "lives touched by faults: "
            + "; ".join(
                f"{uuid[:8]} by " + ", ".join(f"#{r.number} {r.kind}" for r in records)
                for uuid, records in sorted(touched.items())
            )
        )


def live_temp_files(cluster: Cluster) -> list[str]:
    """What a live's folder on the coordinator must not hold once its session ended: segments received
    and never listed (`pending`), half-written files."""
    import json

    left: list[str] = []
    for node in cluster.coordinators:
        root = node.data_dir / "live"
        if not root.exists():
            continue
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            left += [f"{node.name} live: {p}" for p in sorted(folder.glob(".*.tmp"))]
            state_file = folder / "live-state.json"
            if not state_file.exists():
                continue
            with contextlib.suppress(ValueError, OSError):
                state = json.loads(state_file.read_text())
                if not state.get("ended"):
                    left.append(f"{node.name} live: {folder.name} has a session open")
                pending = state.get("pending", {}).values()
                left += [f"{node.name} live: {folder / name} never listed" for name in pending]
    return left
