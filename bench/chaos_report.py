"""The end of a chaos run: the invariants, checked against what the coordinator, the runners, their files,
their logs and /proc say, and the two tables (invariants; faults with their recovery times).

Each invariant is one `Check` row: a name, ok or FAIL, a one-line summary, and detail lines naming every
offending job, video, file or process (printed under a failing row, all kept in the JSON report).
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from chaos_cluster import (
    CANCELLED,
    COMPLETED,
    ERRORED,
    FINAL_STATES,
    LIVE_JOB,
    PARENT_CANCELLED,
    PARENT_ERRORED,
    TMPFS_SOURCE,
    Cluster,
    ffmpeg_processes,
    parse_time,
    run_cli,
)
from chaos_lives import check_lives, live_temp_files
from tuberunner.media.errors import ProbeError
from tuberunner.media.probe import probe

if TYPE_CHECKING:
    from chaos_faults import ChaosLimits, Faults
    from chaos_lives import Lives

__all__ = ["Check", "RunFacts", "Submission", "check_invariants", "fault_stats", "print_report"]

MAX_FAILURES = 5  # protocol/jobs.py: the 5th error makes a job errored
_RUNNER_SUCCESS = re.compile(r"job ([0-9a-f-]{36}) \(([a-z-]+)\) succeeded after")
_COORDINATOR_COMPLETED = re.compile(r"job ([0-9a-f-]{36}) completed \(")
_TRACEBACK = "Traceback (most recent call last)"
_REDOING = re.compile(r"redoing (\d+) completion\(s\) interrupted")
_ASYNCIO_ERROR = re.compile(r"ERROR\s+asyncio: (.*)")
# How fresh a runner's last contact must be to count as connected at the end.
CONTACT_FRESH_S = 20.0


@dataclass
class Submission:
    index: int
    name: str
    clip: str
    at_s: float
    video_uuid: str | None = None
    attempts: int = 0
    error: str | None = None
    # The job graph right after the upload: job uuid → parent uuid.
    jobs: dict[str, str | None] = field(default_factory=dict)


@dataclass
class Check:
    name: str
    ok: bool
    summary: str
    details: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "summary": self.summary, "details": self.details}


@dataclass
class RunFacts:
    seed: int
    root: Path
    limits: ChaosLimits
    menu: tuple[str, ...]
    faults: Faults | None = None
    lives: Lives | None = None
    submissions: list[Submission] = field(default_factory=list)
    settle_s: float | None = None
    checks: list[Check] = field(default_factory=list)
    videos: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, problems: list[str], summary: str) -> None:
        self.checks.append(Check(name, not problems, summary, problems))

    def check_after_stop(self, cluster: Cluster) -> None:
        """Once everything was stopped: no process and no mount of ours is left."""
        problems = [
            f"ffmpeg {p.pid} (state {p.state}) in {p.cwd}"
            for p in ffmpeg_processes()
            if p.cwd is not None and p.cwd.is_relative_to(self.root)
        ]
        children = [
            *(c.child for c in cluster.coordinators),
            *(n.child for n in cluster.runners),
            cluster.shared.moto if cluster.shared is not None else None,
        ]
        problems += [f"{c.name} (pid {c.pid}) still runs" for c in children if c is not None and c.alive]
        try:
            mounts = Path("/proc/mounts").read_text().splitlines()
        except OSError:
            mounts = []
        problems += [
            f"tmpfs still mounted: {line.split()[1]}"
            for line in mounts
            if line.startswith(TMPFS_SOURCE + " ") and line.split()[1].startswith(str(self.root))
        ]
        self.add(
            "nothing left after the stop",
            problems,
            "no ffmpeg, daemon or tmpfs of the run remains" if not problems else f"{len(problems)} left",
        )

    def as_json(self, args: dict[str, Any], stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
        faults = self.faults
        return {
            "seed": self.seed,
            "ok": all(c.ok for c in self.checks),
            "options": args,
            "workDir": str(self.root),
            "settledAfterS": self.settle_s,
            "invariants": [c.as_json() for c in self.checks],
            "faultStats": stats,
            "faults": [r.as_json() for r in faults.records] if faults else [],
            "submissions": [
                {
                    "name": s.name,
                    "clip": s.clip,
                    "atS": round(s.at_s, 3),
                    "videoUuid": s.video_uuid,
                    "attempts": s.attempts,
                    "error": s.error,
                    "jobs": len(s.jobs),
                }
                for s in self.submissions
            ],
            "videos": [
                {"uuid": v["uuid"], "name": v["name"], "state": v["state"], "jobs": v["jobs"]["byState"]}
                for v in self.videos
            ],
            "lives": self.lives.as_json() if self.lives is not None else [],
            "notes": self.notes,
        }


# ------------------------------------------------------------------------------------------ checks


async def check_invariants(cluster: Cluster, facts: RunFacts) -> None:
    admin = cluster.admin
    faults = facts.faults
    cancelled = faults.cancelled_jobs if faults else set()
    deleted = faults.deleted_jobs if faults else set()
    touched = faults.touched_videos if faults else set()
    jobs = await admin.jobs()
    by_uuid = {j["uuid"]: j for j in jobs}
    facts.videos = [await admin.video(v["uuid"]) for v in await admin.videos()]

    facts.add(
        "system settled",
        []
        if facts.settle_s is not None
        else ["jobs unfinished or runners busy/disconnected at the deadline"],
        f"quiet {facts.settle_s:.1f} s after the last fault" if facts.settle_s is not None else "not quiet",
    )

    # -- stuck
    stuck = [
        f"job {j['uuid']} ({j['type']}) {j['state']['label']}"
        + (f" on {j['runner']['name']}" if j.get("runner") else "")
        + f", updated {j.get('updatedAt')}"
        for j in jobs
        if j["state"]["id"] not in FINAL_STATES
    ]
    facts.add(
        "no job stuck (pending/processing/completing/waiting)",
        stuck,
        f"{len(jobs) - len(stuck)}/{len(jobs)} jobs in a final state",
    )

    # -- end states
    bad_end: list[str] = []
    counts: Counter[str] = Counter()
    for job in jobs:
        state = job["state"]["id"]
        if state not in FINAL_STATES or job["type"] == LIVE_JOB:  # live jobs: a row of their own
            continue
        counts[job["state"]["label"].lower()] += 1
        problem = _end_state_problem(job, by_uuid, cancelled)
        if problem:
            bad_end.append(f"job {job['uuid']} ({job['type']}): {problem}")
    facts.add(
        "every VOD job completed, or errored with a reason, or cancelled by the chaos",
        bad_end,
        ", ".join(f"{n} {label}" for label, n in counts.most_common()) or "no job",
    )

    # -- lost
    lost: list[str] = []
    video_uuids = {v["uuid"] for v in facts.videos}
    for sub in facts.submissions:
        if sub.video_uuid is None:
            lost.append(f"{sub.name} could not be submitted: {sub.error}")
            continue
        if sub.video_uuid not in video_uuids:
            lost.append(f"video {sub.video_uuid} ({sub.name}) is gone")
            continue
        gone_ok = _descendants(sub.jobs, deleted)
        for job_uuid in sub.jobs:
            if job_uuid not in by_uuid and job_uuid not in gone_ok:
                lost.append(f"job {job_uuid} of {sub.name} is gone (nobody deleted it)")
        if sub.error:
            lost.append(f"{sub.name}: {sub.error}")
    extra = [
        v
        for v in facts.videos
        if v["uuid"] not in {s.video_uuid for s in facts.submissions} and v.get("live") is None
    ]
    if extra:
        facts.notes.append(
            f"{len(extra)} video(s) created by a retried upload whose first answer was lost: "
            + ", ".join(f"{v['name']} {v['uuid']}" for v in extra)
        )
    facts.add(
        "nothing lost (videos and jobs)",
        lost,
        f"{len(facts.submissions)} videos submitted, {len(facts.videos)} on the coordinator, "
        f"{sum(len(s.jobs) for s in facts.submissions)} jobs created, {len(deleted)} deleted by the chaos",
    )

    # -- duplicates
    duplicates, redone = _duplicate_completions(cluster)
    interrupted = _count_in_logs(cluster.coordinator_logs, _REDOING)
    if interrupted:
        facts.notes.append(
            f"{interrupted} completion(s) interrupted by a coordinator SIGKILL were redone at its restart"
        )
    if redone:
        facts.notes.append(
            "completions redone by a restarted coordinator (idempotent, not duplicates): " + ", ".join(redone)
        )
    facts.add(
        "no duplicate completion",
        duplicates,
        f"{sum(1 for j in jobs if j['state']['id'] == COMPLETED)} completed jobs, each delivered and "
        "completed once"
        if not duplicates
        else f"{len(duplicates)} job(s) completed more than once",
    )

    # -- videos
    bad_videos: list[str] = []
    states: Counter[str] = Counter()
    bad_jobs = {line.split()[1] for line in bad_end}
    for video in facts.videos:
        state = video["state"]
        states[state + (" (chaos-touched)" if video["uuid"] in touched else "")] += 1
        problem = _video_problem(video, video["uuid"] in touched, bad_jobs)
        if problem:
            bad_videos.append(f"video {video['uuid']} ({video['name']}): {problem}")
    facts.add(
        "every video finished in its documented end state",
        bad_videos,
        ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "no video",
    )
    published = [v for v in facts.videos if v["state"] == "published"]
    unplayable = [
        f"video {v['uuid']} ({v['name']}) is published with no web video and no HLS master playlist "
        f"({v['jobs']['total']} job(s) left; the chaos deleted {_deleted_of(v['uuid'], facts, deleted)})"
        for v in published
        if not v["outputs"]["webVideos"] and not (v["outputs"].get("hls") or {}).get("masterPlaylistUrl")
    ]
    facts.add(
        "every published video is playable",
        unplayable,
        f"{len(published) - len(unplayable)}/{len(published)} published videos have a web video or HLS",
    )
    check_lives(facts, jobs, facts.videos)

    # -- outputs
    problems, probed = await _check_outputs(cluster, facts.videos, facts.root)
    facts.add(
        "outputs present and valid when probed",
        problems,
        f"{probed} output files downloaded and checked (PyAV probe, playlists parsed)",
    )

    # -- leftovers while the system still runs
    runner_pids = {n.pid for n in cluster.runners if n.pid is not None}
    stray = [
        f"ffmpeg {p.pid} (state {p.state}, parent {p.ppid}) in {p.cwd}"
        for p in ffmpeg_processes()
        if p.ppid in runner_pids or (p.cwd is not None and p.cwd.is_relative_to(facts.root))
    ]
    facts.add("no ffmpeg process left", stray, "none" if not stray else f"{len(stray)} running")
    facts.add(
        "no temp file left",
        _temp_files(cluster) + live_temp_files(cluster),
        "runner job folders, partial downloads, uploads, lives' unlisted segments",
    )

    # -- runners
    facts.add(
        "every surviving runner idle and connected",
        await _runner_problems(cluster),
        f"{len(cluster.runners)} runner(s): `tuberunner status` says running, no job, registered, "
        "socket connected, fresh contact; fresh lastContact on the coordinator",
    )

    # -- faults
    records = faults.records if faults else []
    injected = [r for r in records if r.injected]
    not_recovered = [r.describe() for r in injected if r.recovery_s is None]
    facts.add(
        f"working again within {facts.limits.recovery_limit_s:g} s after every fault",
        not_recovered,
        f"{len(injected) - len(not_recovered)}/{len(injected)} faults followed by recovery",
    )
    anomalies = [f"#{r.number} {r.kind}: {a}" for r in records for a in r.anomalies]
    facts.add(
        "faults met the expected reaction (watchdog, registration noticed)",
        anomalies,
        "every stalled ffmpeg killed by the watchdog in time; every deleted registration noticed"
        if not anomalies
        else f"{len(anomalies)} unexpected reaction(s)",
    )
    tracebacks = _tracebacks(cluster)
    if tracebacks:
        facts.notes.append("tracebacks in the logs (see the files): " + "; ".join(tracebacks))
    leaks = _asyncio_errors(cluster)
    if leaks:
        facts.notes.append("asyncio errors in the logs (unclosed sessions, lost tasks): " + "; ".join(leaks))


def _end_state_problem(
    job: dict[str, Any], by_uuid: dict[str, dict[str, Any]], cancelled: set[str]
) -> str | None:
    state = job["state"]["id"]
    parent = (job.get("parent") or {}).get("uuid")
    parent_state = by_uuid[parent]["state"]["id"] if parent in by_uuid else None
    if state == COMPLETED:
        return None
    if state == ERRORED:
        error = (job.get("error") or "").strip()
        if not error:
            return "errored without a reason"
        if int(job.get("failures") or 0) >= MAX_FAILURES or error.startswith("Job lease expired"):
            return None  # its retries ran out under the chaos
        return f"errored before its retries ran out ({job.get('failures')} failure(s)): {error[:300]}"
    if state == PARENT_ERRORED:
        return (
            None
            if parent_state in (ERRORED, PARENT_ERRORED)
            else f"parent errored, but its parent is {parent_state}"
        )
    if state == CANCELLED:
        return None if job["uuid"] in cancelled else "cancelled, but the chaos did not cancel it"
    if state == PARENT_CANCELLED:
        if parent is None or parent not in by_uuid:
            return "parent cancelled, and its parent is gone (a deleted job's descendant left behind)"
        return (
            None
            if parent_state in (CANCELLED, PARENT_CANCELLED)
            else f"parent cancelled, but its parent is {parent_state}"
        )
    return None


def _deleted_of(video_uuid: str, facts: RunFacts, deleted: set[str]) -> str:
    """Which jobs of a video the chaos deleted, as `type uuid` (root first)."""
    for sub in facts.submissions:
        if sub.video_uuid == video_uuid:
            mine = [u for u in sub.jobs if u in deleted]
            roots = [u for u in mine if sub.jobs[u] is None]
            return ", ".join(f"{'root job ' if u in roots else 'job '}{u}" for u in mine) or "nothing"
    return "unknown"


def _descendants(graph: dict[str, str | None], roots: set[str]) -> set[str]:
    """`roots` found in `graph` and everything below them."""
    gone = {u for u in graph if u in roots}
    grew = True
    while grew:
        below = {u for u, parent in graph.items() if parent in gone and u not in gone}
        gone |= below
        grew = bool(below)
    return gone


def _video_problem(video: dict[str, Any], touched: bool, bad_jobs: set[str]) -> str | None:
    state = video["state"]
    if video.get("live") is not None:  # its session's end is judged with the lives
        return None if state in ("ended", "waiting") else f"a live still {state}"
    if state == "processing":
        return "still processing: " + ", ".join(f"{n} {s}" for s, n in video["jobs"]["byState"].items())
    if state == "published":
        return None
    if state == "cancelled":
        return None if touched else "cancelled, but the chaos cancelled or deleted none of its jobs"
    if state == "failed":
        errored = [j["uuid"] for j in video["jobs"]["list"] if j["state"]["id"] in (ERRORED, PARENT_ERRORED)]
        if any(u in bad_jobs for u in errored):
            return f"failed: {video.get('error')}"
        return None  # retries ran out under the chaos; reasons listed with the jobs
    return f"unknown state {state!r}"


def _duplicate_completions(cluster: Cluster) -> tuple[list[str], list[str]]:
    """(duplicates, completions redone after a restart): from the coordinator's log of each incarnation
    (a job completed twice in one) and the runners' logs (two runs of one job that both succeeded)."""
    duplicates: list[str] = []
    incarnations: dict[str, list[int]] = defaultdict(list)
    for number, path in enumerate(cluster.coordinator_logs, 1):
        text = path.read_text(errors="replace") if path.exists() else ""
        for job_uuid, n in Counter(_COORDINATOR_COMPLETED.findall(text)).items():
            incarnations[job_uuid].append(number)
            if n > 1:
                duplicates.append(f"job {job_uuid} completed {n} times by coordinator incarnation {number}")
    redone = [
        f"{u[:8]} (incarnations {', '.join(map(str, ns))})" for u, ns in incarnations.items() if len(ns) > 1
    ]
    successes: Counter[str] = Counter()
    where: dict[str, list[str]] = defaultdict(list)
    for node in cluster.runners:
        text = node.log_path.read_text(errors="replace") if node.log_path.exists() else ""
        for job_uuid, _type in _RUNNER_SUCCESS.findall(text):
            successes[job_uuid] += 1
            where[job_uuid].append(node.name)
    duplicates += [
        f"job {u} delivered successfully {n} times (by {', '.join(where[u])})"
        for u, n in successes.items()
        if n > 1
    ]
    return duplicates, redone


async def _runner_problems(cluster: Cluster) -> list[str]:
    """What `tuberunner status --json` of each runner says, and the coordinator's runner list."""
    problems: list[str] = []
    statuses = await asyncio.gather(
        *(run_cli(node.env, "status", "--json", "--id", node.runner_id) for node in cluster.runners)
    )
    now = time.time()
    for node, (code, output) in zip(cluster.runners, statuses, strict=True):
        if not node.alive:
            problems.append(f"{node.name}: the daemon is not running")
            continue
        try:
            status = json.loads(output)
        except ValueError:
            problems.append(
                f"{node.name}: `tuberunner status --json` answered {code}: {output.strip()[:300]}"
            )
            continue
        if code != 0 or not status.get("running"):
            problems.append(f"{node.name}: `tuberunner status` says it does not run ({code})")
            continue
        if status.get("stale_s") is not None:
            problems.append(f"{node.name}: its status is {status['stale_s']:.0f} s old (a stuck daemon)")
        if status.get("jobs"):
            held = ", ".join(f"{j['uuid']} ({j['phase']})" for j in status["jobs"])
            problems.append(f"{node.name}: still holds {held}")
        instances = status.get("instances") or []
        if not instances:
            problems.append(f"{node.name}: no instance in its status")
        for i in instances:
            contact = now - i["last_contact_at"] if i.get("last_contact_at") else None
            if i.get("registration") != "registered":
                problems.append(f"{node.name}: {i.get('registration')} on {i.get('url')}")
            if not i.get("socket_connected"):
                problems.append(f"{node.name}: socket to {i.get('url')} not connected")
            if contact is None or contact > CONTACT_FRESH_S:
                problems.append(f"{node.name}: last contact with {i.get('url')} {contact or 0:.0f} s ago")
    registered = {r["name"]: r for r in await cluster.admin.runners()}
    for node in cluster.runners:
        row = registered.get(node.name)
        if row is None:
            problems.append(f"{node.name}: not in the coordinator's runner list")
            continue
        seen = parse_time(row.get("lastContact"))
        if seen is None or now - seen > CONTACT_FRESH_S:
            problems.append(f"{node.name}: the coordinator's lastContact is {row.get('lastContact')}")
    return problems


def _temp_files(cluster: Cluster) -> list[str]:
    left: list[str] = []
    for node in cluster.runners:
        work = node.paths.work_dir
        if work.exists():
            left += [f"{node.name}: {p}" for p in sorted(work.iterdir())]
        if node.paths.cache_dir.exists():
            left += [f"{node.name}: {p}" for p in sorted(node.paths.cache_dir.rglob("*.part"))]
        if node.filler.exists():
            left.append(f"{node.name}: {node.filler}")
    for node in cluster.coordinators:
        uploads = node.data_dir / "uploads"
        if uploads.exists():
            left += [f"{node.name} upload: {p}" for p in sorted(uploads.iterdir())]
        results = node.data_dir / "files" / "results"
        if results.exists():
            left += [f"{node.name} result: {p}" for p in sorted(results.rglob("*")) if p.is_file()]
    return left


def _tracebacks(cluster: Cluster) -> list[str]:
    found = []
    for path in [*cluster.coordinator_logs, *(n.log_path for n in cluster.runners)]:
        if path.exists():
            n = path.read_text(errors="replace").count(_TRACEBACK)
            if n:
                found.append(f"{n} in {path.relative_to(cluster.root)}")
    return found


def _count_in_logs(paths: list[Path], pattern: re.Pattern[str]) -> int:
    total = 0
    for path in paths:
        if path.exists():
            total += sum(int(n) for n in pattern.findall(path.read_text(errors="replace")))
    return total


def _asyncio_errors(cluster: Cluster) -> list[str]:
    """`ERROR asyncio: ...` lines (an unclosed aiohttp session, a task destroyed while pending, an
    exception never retrieved): resources or errors a process lost track of."""
    found: Counter[str] = Counter()
    for path in [*cluster.coordinator_logs, *(n.log_path for n in cluster.runners)]:
        if path.exists():
            for message in _ASYNCIO_ERROR.findall(path.read_text(errors="replace")):
                found[f"{message.strip()} ({path.relative_to(cluster.root)})"] += 1
    return [f"{n} x {what}" for what, n in found.most_common()]


# ------------------------------------------------------------------------------------------ outputs


@dataclass(frozen=True)
class _Output:
    video: str
    url: str
    kind: str  # web, hls-video, playlist, master, storyboard
    resolution: int | None
    duration_s: float | None
    renditions: tuple[str, ...] = ()


def _expected_outputs(video: dict[str, Any]) -> tuple[list[_Output], list[str]]:
    """What the completed jobs of a video must have left, and what is missing."""
    outputs = video["outputs"]
    name = f"video {video['uuid']} ({video['name']})"
    duration = (video.get("source") or {}).get("durationS")
    web = {w["resolution"]: w for w in outputs["webVideos"]}
    hls = outputs.get("hls") or {}
    renditions = {r["resolution"]: r for r in hls.get("renditions", [])}
    found: list[_Output] = []
    missing: list[str] = []
    for job in video["jobs"]["list"]:
        if job["state"]["id"] != COMPLETED:
            continue
        kind, resolution = job["type"], job.get("resolution")
        if kind in ("vod-web-video-transcoding", "vod-audio-merge-transcoding") and resolution not in web:
            missing.append(f"{name}: no web video {resolution}p although job {job['uuid']} completed")
        if kind == "vod-hls-transcoding" and resolution not in renditions:
            missing.append(f"{name}: no HLS rendition {resolution} although job {job['uuid']} completed")
        if kind == "generate-video-storyboard" and not outputs["storyboards"]:
            missing.append(f"{name}: no storyboard although job {job['uuid']} completed")
    for resolution, w in web.items():
        found.append(_Output(name, w["url"], "web", resolution, duration))
    for resolution, r in renditions.items():
        found.append(_Output(name, r["videoUrl"], "hls-video", resolution, duration))
        if r.get("playlistUrl"):
            found.append(_Output(name, r["playlistUrl"], "playlist", resolution, None))
        else:
            missing.append(f"{name}: HLS rendition {resolution} has no playlist")
    if renditions:
        master = hls.get("masterPlaylistUrl")
        if master:
            names = tuple(
                str(r["playlistUrl"]).rsplit("/", 1)[-1] for r in renditions.values() if r.get("playlistUrl")
            )
            found.append(_Output(name, master, "master", None, None, names))
        else:
            missing.append(f"{name}: HLS renditions but no master playlist")
    for board in outputs["storyboards"]:
        found.append(_Output(name, board["url"], "storyboard", None, None))
    return found, missing


async def _check_outputs(cluster: Cluster, videos: list[dict[str, Any]], root: Path) -> tuple[list[str], int]:
    problems: list[str] = []
    outputs: list[_Output] = []
    for video in videos:
        found, missing = _expected_outputs(video)
        outputs += found
        problems += missing
    gate = asyncio.Semaphore(2)  # two probes at once: the machine is shared
    with tempfile.TemporaryDirectory(dir=root) as folder:
        # Outputs in object storage are redirects to presigned URLs, followed as a player would.
        async with httpx.AsyncClient(timeout=30, follow_redirects=True) as http:

            async def check(index: int, output: _Output) -> None:
                async with gate:
                    problem = await _check_output(http, output, Path(folder) / f"out-{index}")
                if problem:
                    problems.append(
                        f"{output.video}: {output.kind} {output.url.rsplit('/', 1)[-1]}: {problem}"
                    )

            await asyncio.gather(*(check(i, o) for i, o in enumerate(outputs)))
    return problems, len(outputs)


async def _check_output(http: httpx.AsyncClient, output: _Output, path: Path) -> str | None:
    try:
        answer = await http.get(output.url)
    except httpx.HTTPError as exc:
        return f"cannot be downloaded: {exc!r}"
    if answer.status_code != 200:
        return f"answered {answer.status_code}"
    if output.kind in ("playlist", "master"):
        text = answer.text
        if not text.startswith("#EXTM3U"):
            return "not an M3U8 playlist"
        missing = [n for n in output.renditions if n not in text]
        return f"master playlist lacks {', '.join(missing)}" if missing else None
    path.write_bytes(answer.content)
    try:
        info = await probe(path)
    except ProbeError as exc:
        return f"does not probe: {exc}"
    finally:
        path.unlink(missing_ok=True)
    if output.kind == "storyboard":
        return None if info.video is not None else "no picture"
    if output.kind == "hls-video" and output.resolution == 0:
        return None if info.audio is not None else "the audio rendition has no audio stream"
    if info.video is None:
        return "no video stream"
    if output.resolution and info.video.short_side != output.resolution:
        return f"{info.video.short_side}p instead of {output.resolution}p"
    if output.duration_s and abs(info.duration_s - output.duration_s) > 1.0:
        return f"lasts {info.duration_s:.2f} s, the source {output.duration_s:.2f} s"
    return None


# ------------------------------------------------------------------------------------------ tables


def fault_stats(facts: RunFacts) -> dict[str, dict[str, Any]]:
    records = facts.faults.records if facts.faults else []
    stats: dict[str, dict[str, Any]] = {}
    for kind in facts.menu:
        mine = [r for r in records if r.kind == kind]
        injected = [r for r in mine if r.injected]
        times = sorted(r.recovery_s for r in injected if r.recovery_s is not None)
        stats[kind] = {
            "injected": len(injected),
            "skipped": len(mine) - len(injected),
            "recovered": len(times),
            "jobsHit": sum(len(r.affected_jobs) for r in injected),
            "recoveryMaxS": round(max(times), 2) if times else None,
            "recoveryP50S": round(statistics.median(times), 2) if times else None,
            "skipReasons": sorted({str(r.skipped) for r in mine if r.skipped}),
        }
    return stats


def print_report(facts: RunFacts, duration_s: float) -> bool:
    ok = all(c.ok for c in facts.checks)
    width = max(len(c.name) for c in facts.checks)
    print()
    print(f"Invariants (seed {facts.seed}, {duration_s:g} s of chaos)")
    print(f"  {'':4}  {'invariant':{width}}  result")
    for check in facts.checks:
        print(f"  {'ok' if check.ok else 'FAIL':4}  {check.name:{width}}  {check.summary}")
        if not check.ok:
            for line in check.details[:25]:
                print(f"  {'':4}    - {line}")
            if len(check.details) > 25:
                print(f"  {'':4}    ... and {len(check.details) - 25} more (see the JSON report)")
    stats = fault_stats(facts)
    print()
    print(
        "Faults (recovery: from the end of the fault until the system was working again; see docs/chaos.md)"
    )
    print(f"  {'fault':22}{'injected':>9}{'skipped':>9}{'jobs hit':>10}{'recovered':>11}", end="")
    print(f"{'max s':>8}{'p50 s':>8}")
    for kind, s in stats.items():
        top = "-" if s["recoveryMaxS"] is None else f"{s['recoveryMaxS']:.1f}"
        mid = "-" if s["recoveryP50S"] is None else f"{s['recoveryP50S']:.1f}"
        print(
            f"  {kind:22}{s['injected']:>9}{s['skipped']:>9}{s['jobsHit']:>10}{s['recovered']:>11}"
            f"{top:>8}{mid:>8}"
        )
    skipped = [f"{k}: {', '.join(s['skipReasons'])}" for k, s in stats.items() if s["skipReasons"]]
    if skipped:
        print("  skipped because: " + "; ".join(skipped))
    for note in facts.notes:
        print(f"note: {note}")
    print()
    print("ALL INVARIANTS HOLD" if ok else "SOME INVARIANTS FAILED")
    return ok
