"""Coordinator load benchmark: simulated runners (protocol only, no ffmpeg) against a running coordinator.

    python bench/coordinator_load.py [--runners 50] [--duration 10] [--jobs 500] [--quick] [--json PATH]
                                     [--database sqlite|postgres|postgres-x2|both|scale-out|all]
                                     [--profile DIR] [--pin]

For each set-up the script seeds pending jobs with the coordinator's own code (before the coordinator
starts), starts `tuberunner coordinator serve` as a separate process on loopback, registers the runners
through the HTTP API, then runs the phases below. `postgres-x2` is the scale-out set-up: two coordinator
processes on one PostgreSQL database and the Redis at 127.0.0.1:6379, runners alternating between them
(accept races cross processes; in phase C the ping crosses Redis: the holder is on one process, the idle
runner's socket on the other). `scale-out` runs `sqlite` and `postgres-x2` in the same run.

* phase A (hot path): every runner loops `POST jobs/request`;
* phase B (writes): every runner loops request → accept a random offered job → update ×3 → abort. A 409 on
  accept is a lost race (counted, the runner goes on). Duplicate accepts (a job accepted while another
  runner holds it) and lost aborts (an abort answered 204 whose job still runs under the old job token,
  checked over HTTP and in the database afterwards) must both be 0;
* phase C (pickup): an idle runner listens on the socket.io `/runners` namespace; another runner aborts
  the job it holds at t0, and the idle one requests and accepts on the `available-jobs` ping. Latency is
  the accept answer minus t0.

It prints numbers and their ratio to PeerTube 6.3 measured on the same 2-core machines; it never fails on
numbers (exit 0), only when the setup itself breaks. The load generator measures its own CPU use and
warns when it, rather than the coordinator, may be the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]

# Run as a script: its folder (bench/) is on sys.path.
from _loadgen import (
    CpuMeter,
    HttpConnection,
    LoopLag,
    ProtocolError,
    Recorder,
    machine_busy_seconds,
    percentile,
    pids_named,
)

API = "/api/v1/runners"
REQUEST_PATH = f"{API}/jobs/request"
ADMIN_TOKEN = "tra-bench-" + secrets.token_hex(8)
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
RUNNER_VERSION = "0.1.0"
# What a runner with every VOD processor enabled asks for (live is not created by this coordinator).
JOB_TYPES = sorted(
    [
        "vod-web-video-transcoding",
        "vod-hls-transcoding",
        "vod-audio-merge-transcoding",
        "video-studio-transcoding",
        "video-transcription",
        "generate-video-storyboard",
    ]
)

# PeerTube 6.3 on these 2-core machines, with the same generator, 50 runners (DESIGN.md, "Performance").
PEERTUBE = {"request_per_s": 333.0, "cycles_per_s": 24.0, "p99_ms": 350.0, "pickup_ms": 1000.0}
TARGET = {"request_per_s": 1700.0, "cycles_per_s": 120.0, "p99_ms": 70.0, "pickup_ms": 100.0}
GENERATOR_SATURATED_CPU = 0.85
GENERATOR_SATURATED_LAG_MS = 10.0
# Other processes using more than this share of a core during a phase make its numbers unreliable.
BACKGROUND_NOISY_CPU = 0.2

T = TypeVar("T")
TRANSPORT_ERRORS = (OSError, ProtocolError, TimeoutError, asyncio.IncompleteReadError)
# Processes whose CPU a phase measures, by name (listed again at the end of the phase).
Meters = dict[str, Callable[[], list[int]]]


# ============================================================================================== set-up


@dataclass
class SimRunner:
    index: int
    name: str
    token: str
    conn: HttpConnection
    request_body: bytes = b""

    def __post_init__(self) -> None:
        self.request_body = _dumps(
            {"runnerToken": self.token, "jobTypes": JOB_TYPES, "version": RUNNER_VERSION}
        )


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def job_path(job_uuid: str, verb: str) -> str:
    return f"{API}/jobs/{job_uuid}/{verb}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SetupError(Exception):
    """The benchmark could not be set up (coordinator did not start, registration failed...)."""


class CoordinatorProcess:
    """`python -m tuberunner coordinator serve` as a child process on loopback."""

    def __init__(self, data_dir: Path, database_url: str | None, redis_url: str | None = None) -> None:
        self.data_dir = data_dir
        self.database_url = database_url
        self.redis_url = redis_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / "coordinator.log"
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout_s: float = 60.0) -> None:
        args = [
            "-m",
            "tuberunner",
            "coordinator",
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--port",
            str(self.port),
            "--lease",
            "120",
            "--rtmp-port",
            "0",
        ]
        if self.database_url:
            args += ["--database-url", self.database_url]
        if self.redis_url:
            args += ["--redis-url", self.redis_url]
        env = {**os.environ, "TUBERUNNER_ADMIN_TOKEN": ADMIN_TOKEN}
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, *args, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        deadline = time.monotonic() + timeout_s
        probe = HttpConnection("127.0.0.1", self.port, timeout_s=2)
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise SetupError(f"coordinator exited at start:\n{self.log_tail()}")
            try:
                await probe.get(REQUEST_PATH)
                await probe.close()
                return
            except (OSError, ProtocolError, TimeoutError):
                await asyncio.sleep(0.05)
        raise SetupError(f"coordinator did not answer within {timeout_s:g} s:\n{self.log_tail()}")

    async def stop(self) -> None:
        """SIGTERM (uvicorn's graceful stop, lifespan included), SIGKILL if it takes too long."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 20)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.returncode is not None:
            raise SetupError(
                f"coordinator exited ({self.proc.returncode}) during the run:\n{self.log_tail()}"
            )

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"


async def postgres_reason_to_skip() -> str | None:
    try:
        conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"PostgreSQL at 127.0.0.1:5432 is not reachable ({type(exc).__name__}: {exc})"
    await conn.close()
    return None


async def pg_admin(statement: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=10)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def seed_jobs(data_dir: Path, database_url: str | None, count: int) -> None:
    """Pending `vod-web-video-transcoding` jobs, created by the coordinator's own JobService."""
    from tuberunner.coordinator.config import CoordinatorConfig
    from tuberunner.coordinator.database import Database
    from tuberunner.coordinator.jobs import JobService
    from tuberunner.coordinator.models import Job, JobResult, JobSpec
    from tuberunner.coordinator.storage.local import LocalStorage
    from tuberunner.protocol.jobs import JobType

    async def never_completes(job: Job, result: JobResult) -> None:
        raise AssertionError("the benchmark never sends success")

    config = CoordinatorConfig(data_dir=data_dir, database_url=database_url)
    db = Database(config.sqlalchemy_url)
    try:
        await db.migrate()
        service = JobService(
            db, config, LocalStorage(config.files_dir), notify_pending=lambda: None, completer=never_completes
        )
        video_uuid = str(uuidlib.uuid4())
        specs = []
        for _ in range(count):
            job_uuid = str(uuidlib.uuid4())
            files = f"{API}/jobs/{job_uuid}/files/videos/{video_uuid}"
            payload = {
                "input": {"videoFileUrl": files + "/max-quality", "separatedAudioFileUrl": []},
                "output": {"resolution": 720, "fps": 25},
            }
            private = {"videoUUID": video_uuid, "isNewVideo": True}
            specs.append(JobSpec(job_uuid, JobType.VOD_WEB_VIDEO, 100, payload, private))
        await service.create(None, specs)
    finally:
        await db.dispose()


async def held_tokens_in_database(data_dir: Path, database_url: str | None) -> tuple[set[str], int]:
    """Job tokens of every processing or completing job, and the number of jobs not pending."""
    from sqlalchemy import func, select

    from tuberunner.coordinator.config import CoordinatorConfig
    from tuberunner.coordinator.database import Database
    from tuberunner.coordinator.schema import jobs
    from tuberunner.protocol.jobs import JobState

    db = Database(CoordinatorConfig(data_dir=data_dir, database_url=database_url).sqlalchemy_url)
    try:
        async with db.read() as conn:
            rows = await conn.execute(
                select(jobs.c.processing_job_token).where(
                    jobs.c.state.in_([JobState.PROCESSING, JobState.COMPLETING])
                )
            )
            held = {str(r[0]) for r in rows if r[0] is not None}
            not_pending = (
                await conn.execute(
                    select(func.count()).select_from(jobs).where(jobs.c.state != JobState.PENDING)
                )
            ).scalar_one()
    finally:
        await db.dispose()
    return held, int(not_pending)


async def register_runners(ports: list[int], count: int) -> list[SimRunner]:
    """`count` runners, registered on the first process, runner i calling process i mod len(ports)."""
    admin = HttpConnection("127.0.0.1", ports[0])
    reply = await admin.get(
        f"{API}/registration-tokens", headers=[("Authorization", f"Bearer {ADMIN_TOKEN}")]
    )
    if reply.status != 200 or not reply.json().get("data"):
        raise SetupError(f"registration tokens: {reply.status} {reply.body[:300]!r}")
    registration_token = reply.json()["data"][0]["registrationToken"]
    runners = []
    for index in range(count):
        name = f"bench-runner-{index}"
        reply = await admin.post_json(
            f"{API}/register",
            {"registrationToken": registration_token, "name": name, "version": RUNNER_VERSION},
        )
        if reply.status != 200:
            raise SetupError(f"register {name}: {reply.status} {reply.body[:300]!r}")
        conn = HttpConnection("127.0.0.1", ports[index % len(ports)])
        runners.append(SimRunner(index, name, str(reply.json()["runnerToken"]), conn))
    await admin.close()
    return runners


# ============================================================================================== phases


@dataclass
class Measured:
    """What every load phase reports besides its endpoints: CPU of each side and the generator's lag."""

    duration_s: float
    cpu: dict[str, float]
    loop_lag_p99_ms: float

    def generator_saturated(self) -> bool:
        return (
            self.cpu.get("generator", 0.0) >= GENERATOR_SATURATED_CPU
            or self.loop_lag_p99_ms >= GENERATOR_SATURATED_LAG_MS
        )


async def measured(
    duration_s: float,
    meters: Meters,
    body: Callable[[float], Awaitable[None]],
) -> Measured:
    """Run `body(stop_at)` under CPU meters and a loop-lag probe."""
    async with LoopLag() as lag:
        with CpuMeter(meters) as cpu:
            await body(time.perf_counter() + duration_s)
    return Measured(duration_s, cpu.result, lag.p99_ms())


async def phase_requests(
    runners: list[SimRunner], duration_s: float, meters: Meters
) -> tuple[Recorder, Measured]:
    recorder = Recorder(0.0)

    async def loop(runner: SimRunner, stop_at: float) -> None:
        while time.perf_counter() < stop_at:
            reply = await recorder.call("jobs/request", runner.conn, REQUEST_PATH, runner.request_body)
            if reply is None:
                await asyncio.sleep(0.05)

    async def body(stop_at: float) -> None:
        recorder.stop_at = stop_at
        await asyncio.gather(*(loop(r, stop_at) for r in runners))

    return recorder, await measured(duration_s, meters, body)


@dataclass
class WriteState:
    holders: dict[str, int] = field(default_factory=dict)
    cycles: int = 0
    lost_races: int = 0
    empty_offers: int = 0
    duplicate_accepts: int = 0
    duplicate_examples: list[str] = field(default_factory=list)
    # update/abort of a job this runner holds answered anything but 204: its job was taken from it.
    held_job_rejections: collections.Counter[str] = field(default_factory=collections.Counter)
    unexpected: collections.Counter[str] = field(default_factory=collections.Counter)
    # (runner index, job uuid, job token) of every abort answered 204.
    aborted: list[tuple[int, str, str]] = field(default_factory=list)


async def write_cycles(
    runner: SimRunner, recorder: Recorder, state: WriteState, stop_at: float, rng: random.Random
) -> None:
    token = runner.token
    accept_body = _dumps({"runnerToken": token})
    while time.perf_counter() < stop_at:
        reply = await recorder.call("jobs/request", runner.conn, REQUEST_PATH, runner.request_body)
        if reply is None or reply.status != 200:
            state.unexpected[f"request {reply.status if reply else 'transport'}"] += 1
            await asyncio.sleep(0.05)
            continue
        offered = reply.json()["availableJobs"]
        if not offered:
            state.empty_offers += 1
            await asyncio.sleep(0.01)
            continue
        job_uuid = rng.choice(offered)["uuid"]
        reply = await recorder.call("accept", runner.conn, job_path(job_uuid, "accept"), accept_body)
        if reply is not None and reply.status == 409:
            state.lost_races += 1
            continue
        if reply is None or reply.status != 200:
            state.unexpected[f"accept {reply.status if reply else 'transport'}"] += 1
            continue
        job_token = reply.json()["job"]["jobToken"]
        # Held from the accept answer until the abort is sent: an accept answered 200 to anyone else in
        # that window is certainly a second holder (no false positive when an abort and a re-accept race).
        holder = state.holders.get(job_uuid)
        if holder is not None and holder != runner.index:
            state.duplicate_accepts += 1
            if len(state.duplicate_examples) < 5:
                state.duplicate_examples.append(f"{job_uuid}: runner {runner.index} while {holder} held it")
        state.holders[job_uuid] = runner.index
        complete = True
        for progress in (25, 50, 75):
            update = _dumps({"runnerToken": token, "jobToken": job_token, "progress": progress})
            reply = await recorder.call("update", runner.conn, job_path(job_uuid, "update"), update)
            if reply is None or reply.status != 204:
                state.held_job_rejections[f"update {reply.status if reply else 'transport'}"] += 1
                complete = False
                break
        if state.holders.get(job_uuid) == runner.index:
            del state.holders[job_uuid]
        abort = _dumps({"runnerToken": token, "jobToken": job_token, "reason": "load benchmark"})
        reply = await recorder.call("abort", runner.conn, job_path(job_uuid, "abort"), abort)
        if reply is None or reply.status != 204:
            state.held_job_rejections[f"abort {reply.status if reply else 'transport'}"] += 1
            continue
        state.aborted.append((runner.index, job_uuid, job_token))
        if complete and time.perf_counter() <= stop_at:
            state.cycles += 1


async def phase_writes(
    runners: list[SimRunner], duration_s: float, meters: Meters, seed: int
) -> tuple[Recorder, WriteState, Measured]:
    recorder = Recorder(0.0)
    state = WriteState()

    async def body(stop_at: float) -> None:
        recorder.stop_at = stop_at
        await asyncio.gather(
            *(write_cycles(r, recorder, state, stop_at, random.Random(seed + r.index)) for r in runners)
        )

    return recorder, state, await measured(duration_s, meters, body)


async def check_aborts_over_http(
    runners: list[SimRunner], aborted: list[tuple[int, str, str]]
) -> tuple[int, int]:
    """An update with the token of an aborted job must be 404 (the token is gone). Returns (other answers,
    calls that got no answer at all)."""
    by_runner: dict[int, list[tuple[str, str]]] = collections.defaultdict(list)
    for index, job_uuid, job_token in aborted:
        by_runner[index].append((job_uuid, job_token))
    lost = unanswered = 0

    async def check(runner: SimRunner, jobs: list[tuple[str, str]]) -> None:
        nonlocal lost, unanswered
        for job_uuid, job_token in jobs:
            body = _dumps({"runnerToken": runner.token, "jobToken": job_token, "progress": 1})
            try:
                reply = await runner.conn.post(job_path(job_uuid, "update"), body)
            except TRANSPORT_ERRORS:
                unanswered += 1
                continue
            if reply.status != 404:
                lost += 1

    await asyncio.gather(*(check(runners[i], jobs) for i, jobs in by_runner.items()))
    return lost, unanswered


@dataclass
class Pickup:
    latencies_ms: list[float] = field(default_factory=list)
    ping_ms: list[float] = field(default_factory=list)
    misses: int = 0

    def summary(self) -> dict[str, Any]:
        values = sorted(self.latencies_ms)
        pings = sorted(self.ping_ms)
        return {
            "rounds": len(values),
            "misses": self.misses,
            "p50_ms": percentile(values, 0.5),
            "p99_ms": percentile(values, 0.99),
            "max_ms": values[-1] if values else 0.0,
            "ping_p50_ms": percentile(pings, 0.5),
            "ping_max_ms": pings[-1] if pings else 0.0,
        }


async def _take_first_job(runner: SimRunner) -> tuple[str, str]:
    for _ in range(50):
        reply = await runner.conn.post(REQUEST_PATH, runner.request_body)
        for entry in reply.json()["availableJobs"]:
            accepted = await runner.conn.post(
                job_path(entry["uuid"], "accept"), _dumps({"runnerToken": runner.token})
            )
            if accepted.status == 200:
                return str(entry["uuid"]), str(accepted.json()["job"]["jobToken"])
        await asyncio.sleep(0.05)
    raise SetupError("phase C: the holder runner could not accept any job")


async def _abort(runner: SimRunner, job_uuid: str, job_token: str) -> int:
    body = _dumps({"runnerToken": runner.token, "jobToken": job_token, "reason": "load benchmark"})
    return (await runner.conn.post(job_path(job_uuid, "abort"), body)).status


async def phase_pickup(url: str, holder: SimRunner, idle: SimRunner, rounds: int) -> Pickup:
    import socketio

    result = Pickup()
    pinged = asyncio.Event()
    sio = socketio.AsyncClient(reconnection=False, logger=False, engineio_logger=False)

    async def on_ping(*_: Any) -> None:
        pinged.set()

    sio.on("available-jobs", on_ping, namespace="/runners")
    try:
        await sio.connect(
            url,
            auth={"runnerToken": idle.token},
            transports=["websocket"],
            namespaces=["/runners"],
            wait_timeout=10,
        )
    except Exception as exc:  # socketio, aiohttp and OS errors alike
        raise SetupError(f"phase C: no socket.io connection ({type(exc).__name__}: {exc})") from exc
    try:
        for _ in range(rounds):
            try:
                await _pickup_round(holder, idle, pinged, result)
            except TRANSPORT_ERRORS:
                result.misses += 1
    finally:
        await sio.disconnect()
    return result


async def _pickup_round(holder: SimRunner, idle: SimRunner, pinged: asyncio.Event, result: Pickup) -> None:
    job_uuid, job_token = await _take_first_job(holder)
    await asyncio.sleep(0.2)  # the pings of the previous round are over
    pinged.clear()
    t0 = time.perf_counter()
    if await _abort(holder, job_uuid, job_token) != 204:
        raise SetupError("phase C: the holder's abort was refused")
    try:
        await asyncio.wait_for(pinged.wait(), 2.0)
    except TimeoutError:
        result.misses += 1
        return
    ping_at = time.perf_counter()
    reply = await idle.conn.post(REQUEST_PATH, idle.request_body)
    offered = [e["uuid"] for e in reply.json()["availableJobs"]]
    if not offered:
        result.misses += 1
        return
    chosen = job_uuid if job_uuid in offered else offered[0]
    accepted = await idle.conn.post(job_path(chosen, "accept"), _dumps({"runnerToken": idle.token}))
    done_at = time.perf_counter()
    if accepted.status != 200:
        result.misses += 1
        return
    result.latencies_ms.append((done_at - t0) * 1000)
    result.ping_ms.append((ping_at - t0) * 1000)
    await _abort(idle, chosen, str(accepted.json()["job"]["jobToken"]))


# ============================================================================================== profiling


class Profiler:
    """py-spy on the coordinator during a measured phase (optional: `--profile DIR`, py-spy on PATH)."""

    def __init__(self, out_dir: Path | None) -> None:
        self.out_dir = out_dir
        self.py_spy = shutil.which("py-spy") if out_dir else None
        if out_dir and not self.py_spy:
            print("  (--profile: py-spy not found on PATH; no profile taken)")

    async def around(self, pid: int, name: str, duration_s: float, run: Coroutine[Any, Any, T]) -> T:
        if self.out_dir is None or self.py_spy is None:
            return await run
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out = self.out_dir / f"{name}.txt"
        spy = await asyncio.create_subprocess_exec(
            self.py_spy,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "200",
            "--nonblocking",
            "--format",
            "raw",
            "--duration",
            str(max(1, math.floor(duration_s))),
            "--output",
            str(out),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await asyncio.sleep(0.3)  # py-spy attaches
        try:
            return await run
        finally:
            try:
                await asyncio.wait_for(spy.wait(), 30)
            except TimeoutError:
                spy.kill()
                await spy.wait()
            if out.exists():
                print(f"  profile {name}: {out}")
                for line in summarize_profile(out):
                    print(f"    {line}")


def summarize_profile(path: Path, top: int = 12) -> list[str]:
    """Top functions by self and by inclusive time, from py-spy's collapsed (`raw`) output. Frames found
    under (nearly) every sample (interpreter start-up, uvicorn's run) are left out of the second list."""
    self_counts: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short_frame(f) for f in stack.split(";")]
        if not frames:
            continue
        # py-spy names no thread in raw output: worker threads start from Thread._bootstrap.
        threads["worker threads" if frames[0].startswith("Thread._bootstrap") else "main thread"] += count
        total += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return ["(no samples)"]
    root = inclusive.most_common(1)[0][1]
    split = ", ".join(f"{name} {100 * n / total:.0f} %" for name, n in threads.most_common())
    lines = [f"{total} samples ({split}); self time:"]
    lines += [f"  {100 * n / total:5.1f} %  {f}" for f, n in self_counts.most_common(top)]
    lines.append("inclusive time:")
    chosen = [(f, n) for f, n in inclusive.most_common() if n < 0.98 * root][: top + 8]
    lines += [f"  {100 * n / total:5.1f} %  {f}" for f, n in chosen]
    return lines


def _short_frame(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py)"
    name, _, where = frame.partition(" (")
    module = where.rsplit("/", 1)[-1].split(":", 1)[0]
    return f"{name} ({module})" if module else name


# ============================================================================================== one database


async def wait_for_quiet_machine(max_wait_s: float) -> None:
    """Other work on this 2-core machine skews every number: wait (bounded) until it stops."""
    if max_wait_s <= 0:
        return
    deadline = time.monotonic() + max_wait_s
    told = False
    while True:
        before, own = machine_busy_seconds(), time.process_time()
        await asyncio.sleep(1.0)
        others = machine_busy_seconds() - before - (time.process_time() - own)
        if others < BACKGROUND_NOISY_CPU:
            return
        if time.monotonic() >= deadline:
            print(f"  machine still busy ({100 * others:.0f} % of a core used by others); going on anyway")
            return
        if not told:
            print(f"  waiting for a quiet machine (others use {100 * others:.0f} % of a core)", flush=True)
            told = True


REDIS_URL = "redis://127.0.0.1:6379/0"


async def redis_reason_to_skip() -> str | None:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", 6379)
    except OSError as exc:
        return f"Redis at 127.0.0.1:6379 is not reachable ({exc})"
    writer.close()
    return None


async def bench_database(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    print(f"\n== {kind} ==", flush=True)
    await wait_for_quiet_machine(args.wait_quiet)
    database_url: str | None = None
    pg_name: str | None = None
    processes = 2 if kind == "postgres-x2" else 1
    if kind.startswith("postgres"):
        reason = await postgres_reason_to_skip()
        if reason is None and processes > 1:
            reason = await redis_reason_to_skip()
        if reason:
            print(f"  skipped: {reason}")
            return {"skipped": reason}
        pg_name = f"tuberunner_bench_{secrets.token_hex(6)}"
        await pg_admin(f'CREATE DATABASE "{pg_name}"')
        database_url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{pg_name}"
    data_dirs = [Path(tempfile.mkdtemp(prefix=f"tuberunner-bench-{kind}-")) for _ in range(processes)]
    redis_url = REDIS_URL if processes > 1 else None
    coordinators = [CoordinatorProcess(d, database_url, redis_url) for d in data_dirs]
    try:
        return await _bench_running(kind, args, data_dirs[0], database_url, coordinators)
    finally:
        for coordinator in coordinators:
            await coordinator.stop()
        if pg_name:
            await pg_admin(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')
        for data_dir in data_dirs:
            shutil.rmtree(data_dir, ignore_errors=True)


async def _bench_running(
    kind: str,
    args: argparse.Namespace,
    data_dir: Path,
    database_url: str | None,
    coordinators: list[CoordinatorProcess],
) -> dict[str, Any]:
    started = time.perf_counter()
    await seed_jobs(data_dir, database_url, args.jobs)
    print(f"  seeded {args.jobs} pending jobs in {time.perf_counter() - started:.1f} s", flush=True)
    for process in coordinators:  # one after the other: the first one migrates
        await process.start()
    coordinator = coordinators[0]
    if args.pin and len(coordinators) == 1:
        os.sched_setaffinity(coordinator.pid, {0})
        os.sched_setaffinity(0, {1})
    pids = [process.pid for process in coordinators]
    meters: Meters = {"coordinator": lambda: pids}
    if kind.startswith("postgres"):
        meters["postgres"] = lambda: pids_named("postgres")
    profiler = Profiler(Path(args.profile) if args.profile else None)
    # Runner i calls process i mod N: with an even count, the holder (-2) and the idle runner (-1) of
    # phase C are on different processes.
    count = args.runners + 2 + (args.runners % 2 if len(coordinators) > 1 else 0)
    runners = await register_runners([process.port for process in coordinators], count)
    load_runners, holder, idle = runners[: args.runners], runners[-2], runners[-1]
    result: dict[str, Any] = {"runners": args.runners, "jobs": args.jobs, "processes": len(coordinators)}

    # Phase A ------------------------------------------------------------------------------------
    await phase_requests(load_runners, args.warmup, meters)
    recorder, meta = await profiler.around(
        coordinator.pid, f"{kind}-phase-a", args.duration, phase_requests(load_runners, args.duration, meters)
    )
    stats = recorder.stats("jobs/request").summary(meta.duration_s)
    result["phase_a"] = {"jobs/request": stats, **_meta_json(meta, stats["calls"])}
    _print_phase(
        f"phase A: {args.runners} runners × jobs/request, {args.duration:g} s",
        recorder,
        meta,
        ["jobs/request"],
    )

    # Phase B ------------------------------------------------------------------------------------
    _, warm_state, _ = await phase_writes(load_runners, args.warmup, meters, seed=1)
    recorder, state, meta = await profiler.around(
        coordinator.pid,
        f"{kind}-phase-b",
        args.duration,
        phase_writes(load_runners, args.duration, meters, seed=2),
    )
    aborted = warm_state.aborted + state.aborted
    lost_http, unanswered = await check_aborts_over_http(load_runners, aborted)
    endpoints = ["jobs/request", "accept", "update", "abort"]
    all_calls = recorder.all_latencies().summary(meta.duration_s)
    result["phase_b"] = {
        **{e: recorder.stats(e).summary(meta.duration_s) for e in endpoints},
        "all": all_calls,
        "cycles": state.cycles,
        "cycles_per_s": state.cycles / meta.duration_s,
        "lost_races": state.lost_races,
        "empty_offers": state.empty_offers,
        "duplicate_accepts": state.duplicate_accepts,
        "duplicate_examples": state.duplicate_examples,
        "held_job_rejections": dict(state.held_job_rejections),
        "unexpected": dict(state.unexpected),
        "aborts_checked": len(aborted),
        "lost_aborts_http": lost_http,
        "aborts_unchecked": unanswered,
        **_meta_json(meta, all_calls["calls"]),
    }
    _print_phase(
        f"phase B: {args.runners} runners × write cycles, {args.duration:g} s", recorder, meta, endpoints
    )
    b = result["phase_b"]
    print(
        f"  cycles {state.cycles} → {b['cycles_per_s']:.1f}/s; lost races (409) {state.lost_races}; "
        f"duplicate accepts {state.duplicate_accepts}; "
        f"held-job rejections {sum(state.held_job_rejections.values())}; "
        f"lost aborts (HTTP) {lost_http} of {len(aborted)}"
    )
    for example in state.duplicate_examples:
        print(f"    duplicate: {example}")
    if state.unexpected or state.held_job_rejections:
        print(f"    unexpected answers: {dict(state.unexpected)} {dict(state.held_job_rejections)}")

    if unanswered:
        print(f"    {unanswered} abort checks got no answer")
    for process in coordinators:
        process.check_alive()

    # Phase C ------------------------------------------------------------------------------------
    pickup = await phase_pickup(coordinators[-1].url, holder, idle, args.pickup_rounds)
    result["phase_c"] = pickup.summary()
    c = result["phase_c"]
    print(
        f"phase C: pickup latency (abort → ping → request → accept), {c['rounds']} rounds: "
        f"p50 {c['p50_ms']:.1f} ms, p99 {c['p99_ms']:.1f} ms, max {c['max_ms']:.1f} ms "
        f"(ping arrives after p50 {c['ping_p50_ms']:.1f} ms); misses {c['misses']}"
    )

    for process in coordinators:
        process.check_alive()
    for runner in runners:
        await runner.conn.close()
    for process in coordinators:
        await process.stop()
    held, not_pending = await held_tokens_in_database(data_dir, database_url)
    lost_db = sum(1 for _, _, token in aborted if token in held)
    b["lost_aborts_db"] = lost_db
    b["lost_aborts"] = max(lost_db, lost_http)
    b["jobs_not_pending_at_end"] = not_pending
    print(f"  after stop: lost aborts in the database {lost_db}; jobs not pending {not_pending} (expected 0)")
    return result


def _meta_json(meta: Measured, calls: int) -> dict[str, Any]:
    coordinator_cpu = meta.cpu.get("coordinator", 0.0)
    return {
        "cpu": meta.cpu,
        "coordinator_cpu_us_per_call": coordinator_cpu * meta.duration_s / calls * 1e6 if calls else 0.0,
        "generator_loop_lag_p99_ms": meta.loop_lag_p99_ms,
        "generator_saturated": meta.generator_saturated(),
    }


def _print_phase(title: str, recorder: Recorder, meta: Measured, endpoints: list[str]) -> None:
    print(title)
    print(f"  {'endpoint':<14}{'calls':>8}{'calls/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}  statuses")
    merged = recorder.all_latencies()
    rows = [(e, recorder.stats(e)) for e in endpoints]
    if len(endpoints) > 1:
        rows.append(("all", merged))
    for name, stats in rows:
        s = stats.summary(meta.duration_s)
        statuses = " ".join(f"{k}:{v}" for k, v in s["statuses"].items())
        if s["transport_errors"]:
            statuses += f" transport-errors:{s['transport_errors']}"
        print(
            f"  {name:<14}{s['calls']:>8}{s['calls_per_s']:>10.1f}{s['p50_ms']:>9.1f}{s['p99_ms']:>9.1f}"
            f"{s['max_ms']:>9.1f}  {statuses}"
        )
    calls = len(merged.latencies_s)
    cpu = meta.cpu
    us_per_call = cpu.get("coordinator", 0.0) * meta.duration_s / calls * 1e6 if calls else 0.0
    line = f"  CPU: coordinator {100 * cpu.get('coordinator', 0):.0f} % ({us_per_call:.0f} µs/call)"
    if "postgres" in cpu:
        line += f", postgres {100 * cpu['postgres']:.0f} %"
    line += f", generator {100 * cpu.get('generator', 0):.0f} % (loop lag p99 {meta.loop_lag_p99_ms:.1f} ms)"
    line += f", other processes {100 * cpu.get('background', 0):.0f} %"
    print(line)
    if cpu.get("background", 0.0) >= BACKGROUND_NOISY_CPU:
        print("  WARNING: other processes were busy on this machine during the phase: numbers are skewed")
    if meta.generator_saturated():
        print(
            "  WARNING: the load generator is saturated (CPU or loop lag): these numbers are a lower bound "
            "of the coordinator's"
        )


# ============================================================================================== summary


def print_summary(results: dict[str, dict[str, Any]], runners: int) -> None:
    print(f"\nSummary at {runners} runners, against PeerTube 6.3 on the same machines (×: times better)")
    header = (
        f"  {'metric':<34}{'database':<10}{'tuberunner':>11}{'PeerTube':>10}{'ratio':>8}{'target':>9}  met"
    )
    print(header)
    for kind, result in results.items():
        if "skipped" in result:
            print(f"  {'(all)':<34}{kind:<10}  skipped: {result['skipped']}")
            continue
        a, b, c = result["phase_a"], result["phase_b"], result["phase_c"]
        rows: list[tuple[str, float, str, bool]] = [
            ("jobs/request calls/s (A)", a["jobs/request"]["calls_per_s"], "request_per_s", True),
            ("write cycles/s (B)", b["cycles_per_s"], "cycles_per_s", True),
            ("p99 jobs/request ms (A)", a["jobs/request"]["p99_ms"], "p99_ms", False),
            ("p99 all calls ms (B)", b["all"]["p99_ms"], "p99_ms", False),
            ("pickup p99 ms (C)", c["p99_ms"], "pickup_ms", False),
        ]
        for label, value, key, higher_is_better in rows:
            base, target = PEERTUBE[key], TARGET[key]
            if higher_is_better:
                ratio, met, goal = value / base, value >= target, f"≥{target:g}"
            else:
                ratio, met, goal = (base / value if value else math.inf), value <= target, f"≤{target:g}"
            verdict = "yes" if met else "NO"
            print(f"  {label:<34}{kind:<10}{value:>11.1f}{base:>10g}{ratio:>7.1f}×{goal:>9}  {verdict}")
        print(
            f"  {'duplicate accepts (must be 0)':<34}{kind:<10}{b['duplicate_accepts']:>11}"
            f"{'':>27}  {'yes' if b['duplicate_accepts'] == 0 else 'NO'}"
        )
        print(
            f"  {'lost aborts (must be 0)':<34}{kind:<10}{b['lost_aborts']:>11}"
            f"{'':>27}  {'yes' if b['lost_aborts'] == 0 else 'NO'}"
        )
        if a["generator_saturated"] or b["generator_saturated"]:
            print(f"  {'':<34}{kind:<10}  WARNING: generator saturated in phase A or B (lower bounds)")


# ============================================================================================== main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runners", type=int, default=50, help="simulated runners (default 50)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load phase (default 10)")
    parser.add_argument(
        "--database",
        choices=["sqlite", "postgres", "postgres-x2", "both", "scale-out", "all"],
        default="both",
        help="both: sqlite and postgres; scale-out: sqlite and postgres-x2 (two processes); all: the three",
    )
    parser.add_argument("--jobs", type=int, default=500, help="pending jobs seeded (default 500)")
    parser.add_argument("--quick", action="store_true", help="3 s phases, short warm-up, 10 pickup rounds")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--profile", metavar="DIR", help="py-spy the coordinator in phases A and B")
    parser.add_argument(
        "--pin", action="store_true", help="pin the coordinator to CPU 0 and the generator to CPU 1"
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="wait up to S seconds for other processes to go quiet before each database",
    )
    args = parser.parse_args(argv)
    args.warmup = 0.5 if args.quick else 1.0
    args.pickup_rounds = 10 if args.quick else 30
    if args.quick:
        args.duration = min(args.duration, 3.0)
    if args.runners < 1 or args.jobs < args.runners or args.duration <= 0:
        parser.error("need --runners ≥ 1, --jobs ≥ --runners and --duration > 0")
    return args


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kinds = {
        "both": ["sqlite", "postgres"],
        "scale-out": ["sqlite", "postgres-x2"],
        "all": ["sqlite", "postgres", "postgres-x2"],
    }.get(args.database, [args.database])
    print(
        f"Tuberunner coordinator load: {args.runners} runners, {args.duration:g} s phases, {args.jobs} jobs, "
        f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs{', pinned' if args.pin else ''}"
    )
    results: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        with asyncio.Runner(loop_factory=_new_loop) as runner:
            try:
                results[kind] = runner.run(bench_database(kind, args))
            except SetupError as exc:
                print(f"  setup failed: {exc}", file=sys.stderr)
                return 2
    print_summary(results, args.runners)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"peertube": PEERTUBE, "target": TARGET, "results": results}, indent=2)
        )
        print(f"\nJSON results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
