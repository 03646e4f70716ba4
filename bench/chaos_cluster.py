"""The system under chaos: a coordinator process (or N of them: the scale-out set-up), K runner daemons, a TCP
proxy and a tmpfs per runner, the admin API client, and the monitor that everything else waits on.

    root/
        coordinator/                 `coordinator serve --data-dir` (SQLite, files, uploads)
        coordinator-<n>.log          one log per incarnation (n = 1, 2, ... after each SIGKILL and restart)
        coordinator-<c>/             with N coordinators: the data folder of coordinator c (uploads, spool)
        coordinator-<c>-<n>.log      and its log per incarnation
        moto.log                     with N coordinators: the S3 server's log
        runner-<i>/config/           XDG_CONFIG_HOME of runner i (its config.toml with its registration)
        runner-<i>/cache/            XDG_CACHE_HOME of runner i: a small tmpfs when we may mount one
        runner-<i>/daemon.log        every incarnation of runner i, appended

Every runner reaches the coordinator through its own `ChaosProxy` (registered with the proxy's URL), so one
runner can be partitioned while the others work. With N coordinators (`SharedServices`: a PostgreSQL database
made for the run, Redis, moto's S3 server, the last two behind proxies of their own), runner i's proxy
forwards to coordinator i mod N and, when that one refuses connections (killed), to the next: the failover
an L4 load balancer does. The admin client and the uploads go through a front proxy over all of them.

Child processes run in sessions of their own: a Ctrl-C in the terminal reaches only this script, which
stops them in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from tests.support.tcp_proxy import Direction, Plan, TcpProxy

from tuberunner.runner.paths import RunnerPaths, runner_paths
from tuberunner.runner.state import DaemonState, read_state

__all__ = [
    "CANCELLED",
    "COMPLETED",
    "COMPLETING",
    "ERRORED",
    "FINAL_STATES",
    "LIVE_JOB",
    "PARENT_CANCELLED",
    "PARENT_ERRORED",
    "PENDING",
    "PROCESSING",
    "TMPFS_SOURCE",
    "UNFINISHED_STATES",
    "WAITING",
    "Admin",
    "ChaosProxy",
    "Child",
    "Cluster",
    "CoordinatorNode",
    "FfmpegProcess",
    "JobView",
    "LiveView",
    "Monitor",
    "RunnerNode",
    "RunnerSettings",
    "SetupError",
    "SharedServices",
    "Snapshot",
    "ffmpeg_processes",
    "free_port",
    "mount_tmpfs",
    "parse_time",
    "reset_plans",
    "run_cli",
    "unmount",
]

# Job states (protocol/jobs.py): pending 1, processing 2, completed 3, errored 4, waiting for parent 5,
# cancelled 6, parent errored 7, parent cancelled 8, completing 9.
PENDING, PROCESSING, COMPLETED, ERRORED, WAITING, CANCELLED, PARENT_ERRORED, PARENT_CANCELLED, COMPLETING = (
    range(1, 10)
)
FINAL_STATES = frozenset({COMPLETED, ERRORED, CANCELLED, PARENT_ERRORED, PARENT_CANCELLED})
LIVE_JOB = "live-rtmp-hls-transcoding"
UNFINISHED_STATES = (PENDING, PROCESSING, WAITING, COMPLETING)
TMPFS_SOURCE = "tuberunner-chaos"


class SetupError(Exception):
    """The system could not be set up (exit 2): not a finding about it."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_time(value: str | None) -> float | None:
    """An ISO time of the API (`...Z`) as epoch seconds."""
    if not value:
        return None
    return datetime.fromisoformat(value).timestamp()


def log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------ processes


class Child:
    """One child process in its own session, its output appended to a log file."""

    def __init__(
        self, name: str, args: list[str], env: Mapping[str, str], log_path: Path, cwd: Path | None = None
    ) -> None:
        self.name = name
        self.args = args
        self.env = dict(env)
        self.log_path = log_path
        self.cwd = cwd
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.proc = await asyncio.create_subprocess_exec(
                *self.args,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.cwd,
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.alive and self.proc is not None else None

    async def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self, timeout_s: float) -> int | None:
        """SIGTERM, then SIGKILL after `timeout_s`; the exit code (None: it had to be killed)."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            await self.kill()
            return None


def python_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("TUBERUNNER_")}
    return {**inherited, **(extra or {})}


async def run_cli(env: Mapping[str, str], *args: str, timeout_s: float = 60) -> tuple[int, str]:
    """`python -m tuberunner ARGS` to its end: (exit code, output)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tuberunner",
        *args,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        return -1, f"timed out after {timeout_s:g} s"
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace")


# ------------------------------------------------------------------------------------------ admin API


class Admin:
    """The admin and ingest APIs of the coordinator. Calls are retried while the coordinator cannot be
    reached (it may be down for a restart) or answers 503 (its database or storage is unreachable for a
    while), up to `deadline_s`; another HTTP error is raised at once."""

    def __init__(self, url: str, token: str, *, deadline_s: float = 45.0) -> None:
        self.url = url
        self.deadline_s = deadline_s
        self.http = httpx.AsyncClient(
            base_url=url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(10.0, connect=2.0),
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def call(
        self, method: str, path: str, *, deadline_s: float | None = None, **kwargs: Any
    ) -> httpx.Response:
        deadline = time.monotonic() + (self.deadline_s if deadline_s is None else deadline_s)
        while True:
            try:
                answer = await self.http.request(method, path, **kwargs)
                if answer.status_code != 503 or time.monotonic() >= deadline:
                    return answer
            except httpx.TransportError:
                if time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(0.2)  # a retry pace, the coordinator may be restarting

    async def json(self, path: str, **kwargs: Any) -> Any:
        answer = await self.call("GET", path, **kwargs)
        answer.raise_for_status()
        return answer.json()

    async def registration_token(self) -> str:
        (await self.call("POST", "/api/v1/runners/registration-tokens/generate")).raise_for_status()
        body = await self.json(
            "/api/v1/runners/registration-tokens", params={"sort": "-createdAt", "count": 1}
        )
        token: str = body["data"][0]["registrationToken"]
        return token

    async def runners(self) -> list[dict[str, Any]]:
        return await self._all("/api/v1/runners", {})

    async def jobs(self, states: Iterable[int] | None = None, **kwargs: Any) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"sort": "createdAt"}
        if states is not None:
            params["stateOneOf"] = [str(s) for s in states]
        return await self._all("/api/v1/runners/jobs", params, **kwargs)

    async def count_jobs(self, states: Iterable[int], **kwargs: Any) -> int:
        params = {"stateOneOf": [str(s) for s in states], "count": 0}
        body = await self.json("/api/v1/runners/jobs", params=params, **kwargs)
        return int(body["total"])

    async def job(self, job_uuid: str, **kwargs: Any) -> dict[str, Any] | None:
        body = await self.json("/api/v1/runners/jobs", params={"search": job_uuid}, **kwargs)
        found = [j for j in body["data"] if j["uuid"] == job_uuid]
        return found[0] if found else None

    async def videos(self) -> list[dict[str, Any]]:
        return await self._all("/api/v1/videos", {"sort": "createdAt"})

    async def video(self, ident: str) -> dict[str, Any]:
        body: dict[str, Any] = await self.json(f"/api/v1/videos/{ident}")
        return body

    async def create_live(self, name: str, resolutions: str, *, permanent: bool) -> dict[str, Any]:
        """`POST /api/v1/videos/live`: {"video": {"id", "uuid"}, "live": {...}}."""
        answer = await self.call(
            "POST",
            "/api/v1/videos/live",
            json={"name": name, "resolutions": resolutions, "permanentLive": permanent},
        )
        answer.raise_for_status()
        created: dict[str, Any] = answer.json()
        return created

    async def live(self, video_uuid: str, **kwargs: Any) -> dict[str, Any] | None:
        """The `live` object of a live video (state, session, jobUuid, ...); None when it is gone."""
        answer = await self.call("GET", f"/api/v1/videos/live/{video_uuid}", **kwargs)
        if answer.status_code == 404:
            return None
        answer.raise_for_status()
        found: dict[str, Any] = answer.json()
        return found

    async def _all(self, path: str, params: dict[str, Any], **kwargs: Any) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        while True:
            body = await self.json(path, params={**params, "start": len(found), "count": 100}, **kwargs)
            found.extend(body["data"])
            if not body["data"] or len(found) >= body["total"]:
                return found


# ------------------------------------------------------------------------------------------ network


class ChaosProxy(TcpProxy):
    """A runner's way to the coordinator. Faults apply to new connections and, where the fault needs
    it, to the open ones (a black hole stops forwarding on them; other faults reset them so that every
    connection meets the fault). `heal` forwards again and resets what the fault left stuck."""

    def blackhole(self) -> None:
        self.clear_plans()
        self.default = Plan.blackhole()
        for conn in list(self._connections):
            conn.stalled = True

    def resets(self, plans: Iterable[Plan]) -> None:
        """Each new connection takes the next plan (then: reset at once); open ones are reset now."""
        self.clear_plans()
        for plan in plans:
            self.plan_next(plan)
        self.default = Plan.reset_after(0)
        self.reset_all()

    def shape(self, plan: Plan) -> None:
        """Latency or throttling for every connection from now on."""
        self.clear_plans()
        self.default = plan
        self.reset_all()

    def heal(self) -> None:
        self.clear_plans()
        self.default = Plan.forward()
        self.reset_all()


def reset_plans(rng_choices: Iterable[tuple[bool, int, bool]]) -> list[Plan]:
    """(at once?, after how many bytes, downstream?) → plans for `ChaosProxy.resets`."""
    return [
        Plan.reset_after(0)
        if at_once
        else Plan.reset_after(after, Direction.DOWN if downstream else Direction.UP)
        for at_once, after, downstream in rng_choices
    ]


# ------------------------------------------------------------------------------------------ disks


def mount_tmpfs(path: Path, size_mb: int) -> str | None:
    """Mount a tmpfs of `size_mb` on `path`; None when done, else why not."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return "not running as root: cannot mount a tmpfs"
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", TMPFS_SOURCE, str(path)],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"mount failed: {exc}"
    if done.returncode != 0:
        first = (done.stderr or done.stdout).strip().splitlines()
        return f"mount failed: {first[0] if first else f'exit code {done.returncode}'}"
    return None


def unmount(path: Path) -> None:
    for args in (["umount", str(path)], ["umount", "-l", str(path)]):
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            if subprocess.run(args, capture_output=True, timeout=10).returncode == 0:
                return


# ------------------------------------------------------------------------------------------ ffmpeg


@dataclass(frozen=True)
class FfmpegProcess:
    pid: int
    ppid: int
    state: str  # R, S, T (stopped), Z, ...
    cwd: Path | None


def ffmpeg_processes() -> list[FfmpegProcess]:
    """Every ffmpeg process on the machine (the bundled binary's name starts with `ffmpeg` too)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        if not comm.startswith("ffmpeg"):
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        try:
            cwd: Path | None = Path(os.readlink(Path(entry.path, "cwd")))
        except OSError:
            cwd = None
        found.append(FfmpegProcess(int(entry.name), int(fields[1]), fields[0], cwd))
    return found


# ------------------------------------------------------------------------------------------ nodes


class CoordinatorNode:
    def __init__(
        self,
        root: Path,
        *,
        lease_s: float,
        admin_token: str,
        name: str = "coordinator",
        shared: SharedServices | None = None,
        rtmp: bool = False,
    ) -> None:
        self.root = root
        self.name = name
        self.data_dir = root / name
        self.lease_s = lease_s
        self.admin_token = admin_token
        self.shared = shared
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The RTMP server for lives (0: off); the same port after each restart, as publishers expect.
        self.rtmp_port = free_port() if rtmp else 0
        self.incarnation = 0
        self.child: Child | None = None

    @property
    def log_paths(self) -> list[Path]:
        return [self.root / f"{self.name}-{n}.log" for n in range(1, self.incarnation + 1)]

    @property
    def alive(self) -> bool:
        return self.child is not None and self.child.alive

    async def start(self, timeout_s: float = 60.0) -> None:
        self.incarnation += 1
        args = [
            sys.executable,
            "-m",
            "tuberunner",
            "coordinator",
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--port",
            str(self.port),
            "--lease",
            f"{self.lease_s:g}",
            "--rtmp-port",
            str(self.rtmp_port),
        ]
        extra_env: dict[str, str] = {"TUBERUNNER_ADMIN_TOKEN": self.admin_token}
        if self.shared is not None:
            args += self.shared.coordinator_args()
            extra_env.update(self.shared.coordinator_env())
        self.child = Child(self.name, args, python_env(extra_env), self.log_paths[-1])
        await self.child.start()
        await self.wait_ready(timeout_s)

    async def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=2.0) as http:
            while time.monotonic() < deadline:
                if not self.alive:
                    raise SetupError(f"the coordinator exited: {log_tail(self.log_paths[-1])}")
                try:
                    answer = await http.get(
                        self.url + "/api/v1/runners",
                        headers={"Authorization": f"Bearer {self.admin_token}"},
                    )
                    if answer.status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)  # polling an external process, with a deadline
        raise SetupError(f"the coordinator did not answer within {timeout_s:g} s")

    async def kill(self) -> None:
        if self.child is not None:
            await self.child.kill()

    async def stop(self) -> None:
        if self.child is not None:
            await self.child.stop(20)


@dataclass(frozen=True)
class RunnerSettings:
    """`TUBERUNNER_*` settings of every runner daemon: small numbers, so that faults resolve quickly."""

    lease_s: float
    stall_s: float
    concurrency: int
    ffmpeg_nice: int
    min_free_disk_bytes: int
    input_cache_bytes: int
    # Live slots, apart from the VOD ones (`[jobs] live_concurrency`).
    live_concurrency: int = 1

    def env(self) -> dict[str, str]:
        return {
            "TUBERUNNER_JOBS_CONCURRENCY": str(self.concurrency),
            "TUBERUNNER_JOBS_LIVE_CONCURRENCY": str(self.live_concurrency),
            "TUBERUNNER_JOBS_UPDATE_INTERVAL_S": "0.5",
            "TUBERUNNER_JOBS_LEASE_S": f"{self.lease_s:g}",
            "TUBERUNNER_JOBS_SHUTDOWN_GRACE_S": "1",
            "TUBERUNNER_JOBS_REPORT_DEADLINE_S": "20",
            "TUBERUNNER_JOBS_MIN_FREE_DISK_BYTES": str(self.min_free_disk_bytes),
            "TUBERUNNER_FFMPEG_THREADS": "1",
            "TUBERUNNER_FFMPEG_NICE": str(self.ffmpeg_nice),
            "TUBERUNNER_FFMPEG_STALL_TIMEOUT_S": f"{self.stall_s:g}",
            "TUBERUNNER_INPUTS_CACHE_MAX_BYTES": str(self.input_cache_bytes),
            "TUBERUNNER_NETWORK_POLL_INTERVAL_S": "5",
            "TUBERUNNER_NETWORK_SOCKET_RETRY_MAX_S": "1",
            "TUBERUNNER_NETWORK_CONNECT_TIMEOUT_S": "2",
            "TUBERUNNER_NETWORK_READ_TIMEOUT_S": "5",
            "TUBERUNNER_NETWORK_WRITE_TIMEOUT_S": "5",
            "TUBERUNNER_NETWORK_CALL_TIMEOUT_S": "8",
            "TUBERUNNER_NETWORK_SUCCESS_TIMEOUT_S": "40",
            "TUBERUNNER_DAEMON_STATE_INTERVAL_S": "0.5",
            "TUBERUNNER_DAEMON_CONFIG_CHECK_INTERVAL_S": "0.5",
        }


class RunnerNode:
    def __init__(
        self, root: Path, index: int, settings: RunnerSettings, coordinator_ports: list[int]
    ) -> None:
        self.index = index
        self.runner_id = f"r{index}"
        self.name = f"chaos-runner-{index}"
        self.home = root / f"runner-{index}"
        self.config_home = self.home / "config"
        self.cache_home = self.home / "cache"
        self.log_path = self.home / "daemon.log"
        self.filler = self.cache_home / "chaos-filler.bin"
        self.env = python_env(
            {
                "XDG_CONFIG_HOME": str(self.config_home),
                "XDG_CACHE_HOME": str(self.cache_home),
                **settings.env(),
            }
        )
        self.paths: RunnerPaths = runner_paths(self.runner_id, env=self.env)
        self.live_slots = settings.live_concurrency
        # Its coordinator first, the others when that one refuses connections.
        home, *others = coordinator_ports
        self.proxy = ChaosProxy("127.0.0.1", home, fallbacks=[("127.0.0.1", p) for p in others])
        self.tmpfs: bool = False
        self.tmpfs_problem: str | None = None
        self.child: Child | None = None
        self.starts = 0

    @property
    def alive(self) -> bool:
        return self.child is not None and self.child.alive

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None

    def state(self) -> DaemonState | None:
        return read_state(self.paths.state_file)

    async def register(self, admin: Admin) -> None:
        token = await admin.registration_token()
        code, output = await run_cli(
            self.env,
            "register",
            "--id",
            self.runner_id,
            "--url",
            self.proxy.url,
            "--registration-token",
            token,
            "--runner-name",
            self.name,
        )
        if code != 0:
            raise SetupError(f"`tuberunner register` of {self.name} failed ({code}): {output.strip()}")

    async def start(self) -> None:
        self.starts += 1
        args = [sys.executable, "-m", "tuberunner", "server", "--id", self.runner_id]
        self.child = Child(self.name, args, self.env, self.log_path)
        with self.log_path.open("a") as log:
            log.write(f"=== chaos: start #{self.starts} of {self.name} at {time.time():.3f}\n")
        await self.child.start()

    async def kill(self) -> None:
        if self.child is not None:
            await self.child.kill()

    async def stop(self) -> int | None:
        if self.child is None:
            return None
        return await self.child.stop(20)


# ------------------------------------------------------------------------------------------ monitor


@dataclass(frozen=True)
class JobView:
    uuid: str
    type: str
    state: int
    runner: str | None
    updated_at: float
    progress: int | None
    video_uuid: str | None
    failures: int
    error: str | None
    # A live job's segment duration (its payload's `output.segmentDuration`), else None.
    segment_s: float | None = None
    started_at: float | None = None
    # A live job's session (its private payload's `sessionId`).
    session: int | None = None

    @property
    def is_live(self) -> bool:
        return self.type == LIVE_JOB

    @classmethod
    def of(cls, job: dict[str, Any]) -> JobView:
        runner = job.get("runner") or {}
        private = job.get("privatePayload") or {}
        output = (job.get("payload") or {}).get("output") or {}
        segment = output.get("segmentDuration") if job["type"] == LIVE_JOB else None
        return cls(
            uuid=job["uuid"],
            type=job["type"],
            state=int(job["state"]["id"]),
            runner=runner.get("name"),
            updated_at=parse_time(job.get("updatedAt")) or 0.0,
            progress=job.get("progress"),
            video_uuid=private.get("videoUUID"),
            failures=int(job.get("failures") or 0),
            error=job.get("error"),
            segment_s=float(segment) if isinstance(segment, int | float) else None,
            started_at=parse_time(job.get("startedAt")),
            session=int(private["sessionId"]) if str(private.get("sessionId", "")).isdigit() else None,
        )


@dataclass(frozen=True)
class LiveView:
    """A live as `GET /api/v1/videos/live/{uuid}` shows it."""

    video_uuid: str
    state: str  # waiting, live, ended
    session: int
    job_uuid: str | None
    publisher_connected: bool
    error: str | None

    @classmethod
    def of(cls, video_uuid: str, live: dict[str, Any]) -> LiveView:
        return cls(
            video_uuid=video_uuid,
            state=str(live["state"]),
            session=int(live.get("session") or 0),
            job_uuid=live.get("jobUuid"),
            publisher_connected=bool(live.get("publisherConnected")),
            error=live.get("error"),
        )


@dataclass
class RunnerView:
    alive: bool
    state: DaemonState | None
    live_slots: int = 1

    def full(self, live: bool = False) -> bool:
        """Every VOD slot (or every live slot) taken: a pending job of that kind cannot be its fault."""
        if self.state is None:
            return False
        held = sum(1 for j in self.state.jobs if (j.type == LIVE_JOB) == live)
        return held >= (self.live_slots if live else self.state.concurrency)

    def holds(self, job_uuid: str) -> bool:
        return self.state is not None and any(j.uuid == job_uuid for j in self.state.jobs)

    def serving_since(self, since: float) -> bool:
        """Alive, its loop turning since `since`, registered, socket connected, and in contact."""
        state = self.state
        if not self.alive or state is None or state.updated_at <= since or not state.instances:
            return False
        return all(
            i.registration == "registered"
            and i.socket_connected
            and i.last_contact_at is not None
            and i.last_contact_at > since
            for i in state.instances
        )


@dataclass
class Snapshot:
    at: float
    coordinator_up: bool
    processing: dict[str, JobView] = field(default_factory=dict)
    # Jobs a fault watches: None when the job does not exist (deleted).
    tracked: dict[str, JobView | None] = field(default_factory=dict)
    unfinished: int | None = None
    runners: dict[str, RunnerView] = field(default_factory=dict)
    ffmpeg: list[FfmpegProcess] = field(default_factory=list)
    # Lives a fault watches (None: the live is gone), and the current job of each (None: deleted).
    lives: dict[str, LiveView | None] = field(default_factory=dict)
    live_jobs: dict[str, JobView | None] = field(default_factory=dict)

    def job(self, job_uuid: str) -> JobView | None:
        return self.processing.get(job_uuid) or self.tracked.get(job_uuid) or self.live_jobs.get(job_uuid)


class Monitor:
    """Looks at the whole system every `interval_s` (admin API, runners' status files, /proc) and wakes
    whoever waits for a condition on what it saw. Polling is the only way to watch other processes; every
    wait has a deadline."""

    def __init__(self, cluster: Cluster, interval_s: float = 0.3) -> None:
        self.cluster = cluster
        self.interval_s = interval_s
        self.latest = Snapshot(at=0.0, coordinator_up=False)
        self._tracked: dict[str, int] = {}
        self._tracked_lives: dict[str, int] = {}
        # Every live job seen processing, and its live (video uuid): a fault that hit one knows its live
        # even once the job is gone.
        self.live_of_job: dict[str, str] = {}
        self._new = asyncio.Condition()

    def track(self, job_uuids: Iterable[str]) -> None:
        _count_in(self._tracked, job_uuids)

    def untrack(self, job_uuids: Iterable[str]) -> None:
        _count_out(self._tracked, job_uuids)

    def track_lives(self, video_uuids: Iterable[str]) -> None:
        _count_in(self._tracked_lives, video_uuids)

    def untrack_lives(self, video_uuids: Iterable[str]) -> None:
        _count_out(self._tracked_lives, video_uuids)

    async def run(self) -> None:
        while True:
            try:
                snapshot = await self._look()
            except Exception:  # a look that failed is skipped, never the end of the monitoring
                traceback.print_exc()
                await asyncio.sleep(self.interval_s)
                continue
            async with self._new:
                self.latest = snapshot
                self._new.notify_all()
            await asyncio.sleep(self.interval_s)  # the polling period

    async def _look(self) -> Snapshot:
        cluster = self.cluster
        snapshot = Snapshot(at=time.time(), coordinator_up=False)
        for node in cluster.runners:
            snapshot.runners[node.name] = RunnerView(node.alive, node.state(), node.live_slots)
        snapshot.ffmpeg = ffmpeg_processes()
        try:
            jobs = await cluster.admin.jobs([PROCESSING], deadline_s=0)
            snapshot.processing = {j["uuid"]: JobView.of(j) for j in jobs}
            for view in snapshot.processing.values():
                if view.is_live and view.video_uuid:
                    self.live_of_job[view.uuid] = view.video_uuid
            snapshot.unfinished = await cluster.admin.count_jobs(UNFINISHED_STATES, deadline_s=0)
            for job_uuid in list(self._tracked):
                found = await cluster.admin.job(job_uuid, deadline_s=0)
                snapshot.tracked[job_uuid] = JobView.of(found) if found else None
            for video_uuid in list(self._tracked_lives):
                live = await cluster.admin.live(video_uuid, deadline_s=0)
                live_view = LiveView.of(video_uuid, live) if live else None
                snapshot.lives[video_uuid] = live_view
                if live_view is not None and live_view.job_uuid is not None:
                    current = snapshot.job(live_view.job_uuid)
                    if current is None:
                        found = await cluster.admin.job(live_view.job_uuid, deadline_s=0)
                        current = JobView.of(found) if found else None
                    snapshot.live_jobs[live_view.job_uuid] = current
            snapshot.coordinator_up = True
        except (httpx.HTTPError, KeyError, ValueError):
            snapshot.coordinator_up = False
        # Taken after the reads: a condition seen here held at this time or later.
        snapshot.at = time.time()
        return snapshot

    async def until(self, condition: Callable[[Snapshot], bool], timeout_s: float) -> Snapshot | None:
        """The first snapshot taken from now on where `condition` holds; None after `timeout_s`."""
        try:
            async with asyncio.timeout(timeout_s), self._new:
                while True:
                    await self._new.wait()
                    if condition(self.latest):
                        return self.latest
        except TimeoutError:
            return None


def _count_in(counts: dict[str, int], keys: Iterable[str]) -> None:
    for key in keys:
        counts[key] = counts.get(key, 0) + 1


def _count_out(counts: dict[str, int], keys: Iterable[str]) -> None:
    for key in keys:
        left = counts.get(key, 0) - 1
        if left <= 0:
            counts.pop(key, None)
        else:
            counts[key] = left


# ------------------------------------------------------------------------------------------ cluster


class SharedServices:
    """What N coordinator processes share: a PostgreSQL database made for the run (dropped at the end),
    Redis (the machine's, at 127.0.0.1:6379) and moto's S3 server (a child process), the last two behind
    `ChaosProxy`s so that faults can make them unreachable. PostgreSQL faults kill its connections
    (`pg_terminate_backend`), which is what a server restart or a failover does to them."""

    PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
    REDIS_PORT = 6379
    BUCKET = "tuberunner-chaos"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.database = f"tuberunner_chaos_{os.getpid()}_{int(time.time())}"
        self.s3_port = free_port()
        self.moto: Child | None = None
        self.s3_proxy = ChaosProxy("127.0.0.1", self.s3_port)
        self.redis_proxy = ChaosProxy("127.0.0.1", self.REDIS_PORT)
        self._created = False

    @property
    def database_url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:5432/{self.database}"

    def coordinator_args(self) -> list[str]:
        return [
            "--database-url",
            self.database_url,
            "--redis-url",
            f"redis://127.0.0.1:{self.redis_proxy.port}/0",
            "--storage",
            f"s3://{self.BUCKET}/farm",
        ]

    def coordinator_env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.s3_proxy.url,
            "AWS_ACCESS_KEY_ID": "chaos",
            "AWS_SECRET_ACCESS_KEY": "chaos",
            "AWS_REGION": "us-east-1",
        }

    async def start(self) -> None:
        try:
            admin = await asyncpg.connect(self.PG_ADMIN, timeout=5)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise SetupError(
                f"PostgreSQL at 127.0.0.1:5432 is needed for several coordinators: {exc}"
            ) from exc
        try:
            await admin.execute(f'CREATE DATABASE "{self.database}"')
            self._created = True
        finally:
            await admin.close()
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", self.REDIS_PORT)
            writer.close()
        except OSError as exc:
            raise SetupError(
                f"Redis at 127.0.0.1:{self.REDIS_PORT} is needed for several coordinators"
            ) from exc
        args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.s3_port)]
        self.moto = Child("s3", args, python_env(), self.root / "moto.log")
        await self.moto.start()
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient(timeout=2) as http:
            while True:
                try:
                    (await http.put(f"http://127.0.0.1:{self.s3_port}/{self.BUCKET}")).raise_for_status()
                    break
                except httpx.HTTPError as exc:
                    if time.monotonic() > deadline or not self.moto.alive:
                        raise SetupError(f"moto's S3 server did not start: {exc}") from exc
                    await asyncio.sleep(0.1)  # polling an external process, with a deadline
        await self.s3_proxy.start()
        await self.redis_proxy.start()

    async def kill_database_connections(self) -> int:
        admin = await asyncpg.connect(self.PG_ADMIN, timeout=5)
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid()",
                self.database,
            )
        finally:
            await admin.close()
        return int(killed or 0)

    async def stop(self) -> None:
        for proxy in (self.s3_proxy, self.redis_proxy):
            with contextlib.suppress(Exception):
                await proxy.close()
        if self.moto is not None:
            await self.moto.stop(10)
        if self._created:
            with contextlib.suppress(Exception):
                admin = await asyncpg.connect(self.PG_ADMIN, timeout=5)
                try:
                    await admin.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
                finally:
                    await admin.close()


class Cluster:
    """Everything started for a run, and the one place that stops it all again."""

    def __init__(
        self,
        root: Path,
        *,
        runners: int,
        lease_s: float,
        admin_token: str,
        settings: RunnerSettings,
        tmpfs_mb: int,
        coordinators: int = 1,
        lives: bool = False,
    ) -> None:
        self.root = root
        self.admin_token = admin_token
        self.shared = SharedServices(root) if coordinators > 1 else None
        # Lives need the one process that serves RTMP (docs/scale-out.md): only with one coordinator.
        self.coordinators = [
            CoordinatorNode(root, lease_s=lease_s, admin_token=admin_token, rtmp=lives)
            if coordinators == 1
            else CoordinatorNode(
                root, lease_s=lease_s, admin_token=admin_token, name=f"coordinator-{c}", shared=self.shared
            )
            for c in range(1, coordinators + 1)
        ]
        ports = [node.port for node in self.coordinators]
        # Uploads and the admin API: one coordinator, or any live one through the front proxy.
        self.front = (
            TcpProxy("127.0.0.1", ports[0], fallbacks=[("127.0.0.1", p) for p in ports[1:]])
            if coordinators > 1
            else None
        )
        self.url = self.coordinators[0].url
        self.admin = Admin(self.url, admin_token)
        self.runners = [
            RunnerNode(root, i, settings, ports[(i - 1) % len(ports) :] + ports[: (i - 1) % len(ports)])
            for i in range(1, runners + 1)
        ]
        self.tmpfs_mb = tmpfs_mb
        self.monitor = Monitor(self)
        self._monitor_task: asyncio.Task[None] | None = None

    @property
    def coordinator_logs(self) -> list[Path]:
        return [path for node in self.coordinators for path in node.log_paths]

    def runner(self, name: str) -> RunnerNode:
        return next(r for r in self.runners if r.name == name)

    async def start(self, say: Callable[[str], None]) -> None:
        if self.shared is not None:
            await self.shared.start()
            say(f"PostgreSQL database {self.shared.database}, Redis and moto's S3 server ready")
        for node in self.coordinators:  # one after the other: the first one creates the schema
            await node.start()
            say(f"{node.name} up at {node.url} (lease {node.lease_s:g} s)")
        if self.front is not None:
            await self.front.start()
            self.url = self.front.url
            await self.admin.aclose()
            self.admin = Admin(self.url, self.admin_token)
            say(f"{len(self.coordinators)} coordinators behind {self.url}")

        async def set_up(node: RunnerNode) -> None:
            node.tmpfs_problem = await asyncio.to_thread(mount_tmpfs, node.cache_home, self.tmpfs_mb)
            node.tmpfs = node.tmpfs_problem is None
            await node.proxy.start()
            await node.register(self.admin)
            await node.start()

        async with asyncio.TaskGroup() as tg:
            for node in self.runners:
                tg.create_task(set_up(node))
        mounted = sum(n.tmpfs for n in self.runners)
        say(
            f"{len(self.runners)} runner(s) registered through their proxies and started; "
            f"{mounted} work folder(s) on a {self.tmpfs_mb} MB tmpfs"
            + ("" if mounted else f" ({self.runners[0].tmpfs_problem})")
        )
        self._monitor_task = asyncio.create_task(self.monitor.run(), name="monitor")

    async def stop(self) -> None:
        """Stop everything, whatever state it is in (also after a failure or Ctrl-C)."""
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            await asyncio.gather(self._monitor_task, return_exceptions=True)
        for proc in ffmpeg_processes():  # a SIGSTOPped one must not outlive us
            if proc.state == "T" and proc.cwd is not None and proc.cwd.is_relative_to(self.root):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
        await asyncio.gather(*(n.stop() for n in self.runners), return_exceptions=True)
        await asyncio.gather(*(n.stop() for n in self.coordinators), return_exceptions=True)
        if self.front is not None:
            with contextlib.suppress(Exception):
                await self.front.close()
        if self.shared is not None:
            await self.shared.stop()
        for node in self.runners:
            with contextlib.suppress(Exception):
                await node.proxy.close()
        for proc in ffmpeg_processes():
            if proc.cwd is not None and proc.cwd.is_relative_to(self.root):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
        for node in self.runners:
            node.filler.unlink(missing_ok=True)
            if node.tmpfs:
                unmount(node.cache_home)
                node.tmpfs = False
        await self.admin.aclose()
