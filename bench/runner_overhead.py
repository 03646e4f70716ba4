"""Runner overhead benchmark: the same jobs through `tuberunner server` + coordinator vs ffmpeg run by hand,
and the memory of an idle runner daemon.

    python bench/runner_overhead.py [--quick] [--rounds 3] [--keep] [--runner-log-level debug]

Everything runs on loopback, in a temporary folder: a generated clip (60 s of 1280x720 at 25 fps with a
stereo tone; `--quick`: 10 s of 640x360), `tuberunner coordinator serve` and `tuberunner server` as child
processes (the runner registered with `tuberunner register`, its XDG folders inside the temporary folder,
its configuration the defaults: socket pings, ffmpeg threads chosen by ffmpeg, niceness 19, input cache).

Each round uploads the clip through the ingest API with only its own resolution, HLS and web video, no
separate audio and no storyboard: a graph of two jobs, a web video (the parent) and the HLS rendition made
from it. Wall times, from the coordinator's timestamps:

* web video: from the upload's creation to the job's completion (pickup through the socket ping, input
  download, probe, ffmpeg, result upload, the coordinator's check and move of the result);
* HLS: from the parent's completion (when the HLS job became pending) to its own completion.

By hand: the very command the runner builds (`tuberunner.media.commands`, same threads, same niceness), on
the same input (the uploaded clip; for HLS, the web video the coordinator serves as the job's input, which
the runner packages with `-c copy`: it kept that encode), timed around the ffmpeg process alone, right
after the same job went through the system. The ratio is the first
over the second (target: <= 1.05 on the full clip), printed per round, as the median of the rounds and as
best of N on each side (interference from other work on the machine only ever adds time; the load average
is printed so that a noisy run can be recognised). Because ffmpeg's own speed varies from run to run on a
shared machine, the daemon's ffmpeg is timed too (a /proc scan every 10 ms and a pidfd): the job's time
outside its ffmpeg run is the runner's overhead proper, also shown as the ratio it gives on top of the
by-hand time.

RSS: the daemon's VmRSS once it is connected and idle (target: < 80 MB), after each round, and again, idle,
after the jobs.
The script prints numbers and never fails on them; it exits non-zero only when the setup itself breaks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from tuberunner.media.binaries import find_ffmpeg
from tuberunner.media.commands import EncodeSettings, hls_remux_command, web_video_command
from tuberunner.media.probe import probe
from tuberunner.media.samples import make_sample_clip

ADMIN_TOKEN = "tra-bench-" + secrets.token_hex(8)
# `tuberunner server` defaults: ffmpeg.threads = 0 (ffmpeg decides), ffmpeg.nice = 20 (applied as 19).
THREADS = 0
NICE = 19
TARGET_RATIO = 1.05
TARGET_RSS_MB = 80.0
STARTUP_TIMEOUT_S = 60.0
JOB_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class Clip:
    duration_s: float
    width: int
    height: int
    fps: int = 25

    @property
    def resolution(self) -> int:
        return min(self.width, self.height)


FULL = Clip(60, 1280, 720)
QUICK = Clip(10, 640, 360)


@dataclass
class Round:
    web_system_s: float
    web_by_hand_s: float
    hls_system_s: float
    hls_by_hand_s: float
    web_pickup_s: float
    hls_pickup_s: float
    # How long the daemon's own ffmpeg ran for each job, and what came before it (pickup, download, probe)
    # and after it (upload, the coordinator's check and move of the result).
    web_runner_ffmpeg_s: float
    hls_runner_ffmpeg_s: float
    web_before_s: float
    hls_before_s: float
    web_after_s: float
    hls_after_s: float

    @property
    def web_ratio(self) -> float:
        return self.web_system_s / self.web_by_hand_s

    @property
    def hls_ratio(self) -> float:
        return self.hls_system_s / self.hls_by_hand_s

    @property
    def web_overhead_s(self) -> float:
        """Time of the job outside its ffmpeg run: pickup, download, probe, upload, completion."""
        return self.web_system_s - self.web_runner_ffmpeg_s

    @property
    def hls_overhead_s(self) -> float:
        return self.hls_system_s - self.hls_runner_ffmpeg_s


class FfmpegTimer:
    """Wall-clock start and end of each ffmpeg child of one process: seen within `poll_s` of its start
    (a scan of /proc), its end noticed through a pidfd. In order of start."""

    def __init__(self, parent: int, poll_s: float = 0.01) -> None:
        self.parent = parent
        self.poll_s = poll_s
        self.runs: dict[int, list[float]] = {}
        self._task: asyncio.Task[None] | None = None
        # Only new pids are looked at: a scan costs a readdir, not a read per process.
        self._seen = {int(e.name) for e in os.scandir("/proc") if e.name.isdigit()}

    def __enter__(self) -> FfmpegTimer:
        self._task = asyncio.get_running_loop().create_task(self._watch())
        return self

    def __exit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()

    def spans(self) -> list[tuple[float, float]]:
        """(start, end) wall-clock times of the ffmpeg runs that ended, in order of start."""
        return [(run[0], run[1]) for run in self.runs.values() if len(run) == 2]

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            for pid in self._children():
                self.runs[pid] = [time.time()]
                try:
                    fd = os.pidfd_open(pid)
                except ProcessLookupError:
                    self.runs[pid].append(time.time())
                    continue
                loop.add_reader(fd, self._ended, pid, fd)
            await asyncio.sleep(self.poll_s)

    def _ended(self, pid: int, fd: int) -> None:
        asyncio.get_running_loop().remove_reader(fd)
        os.close(fd)
        self.runs[pid].append(time.time())

    def _children(self) -> list[int]:
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) in self._seen:
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            if int(stat[stat.rindex(")") + 2 :].split()[1]) != self.parent:
                self._seen.add(int(entry.name))
            elif comm.startswith("ffmpeg"):
                self._seen.add(int(entry.name))
                found.append(int(entry.name))
            # A child of the daemon that is not ffmpeg (yet: between fork and exec; or a probe) is read
            # again at the next scan.
        return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timestamp(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of `pid`, in kB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


class Bench:
    def __init__(self, folder: Path, clip: Clip, runner_log_level: str = "info") -> None:
        self.folder = folder
        self.clip = clip
        self.runner_log_level = runner_log_level
        self.ffmpeg = find_ffmpeg()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TUBERUNNER_")},
            "XDG_CONFIG_HOME": str(folder / "runner-config"),
            "XDG_CACHE_HOME": str(folder / "runner-cache"),
            "TUBERUNNER_ADMIN_TOKEN": ADMIN_TOKEN,
        }
        self.processes: list[subprocess.Popen[bytes]] = []
        self.http = httpx.AsyncClient(
            base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=120
        )

    # ------------------------------------------------------------------ processes

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with (self.folder / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "tuberunner", *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.folder,
            )
        self.processes.append(process)
        return process

    async def start_coordinator(self) -> None:
        data = self.folder / "coordinator"
        self.coordinator = self.spawn(
            "coordinator", "coordinator", "serve", "--data-dir", str(data), "--port", str(self.port),
            "--rtmp-port", "0",
        )  # fmt: skip
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.coordinator.poll() is not None:
                raise RuntimeError(f"the coordinator exited; see {self.folder / 'coordinator.log'}")
            try:
                await self.http.get("/api/v1/videos")
                return
            except httpx.TransportError:
                await asyncio.sleep(0.1)
        raise RuntimeError("the coordinator did not answer in time")

    async def start_runner(self) -> int:
        """Register with the CLI, start the daemon, wait until it is connected and idle; its pid."""
        (await self.http.post("/api/v1/runners/registration-tokens/generate")).raise_for_status()
        tokens = await self.http.get("/api/v1/runners/registration-tokens", params={"sort": "-createdAt"})
        token = tokens.json()["data"][0]["registrationToken"]
        registered = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "tuberunner", "register", "--url", self.url),
            *("--registration-token", token, "--runner-name", "bench"),
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        _, stderr = await registered.communicate()
        if registered.returncode != 0:
            raise RuntimeError(f"tuberunner register failed: {stderr.decode(errors='replace')}")
        self.runner = self.spawn("runner", "--log-level", self.runner_log_level, "server")
        await self.wait_idle()
        return self.runner.pid

    async def wait_idle(self) -> None:
        state_file = self.folder / "runner-cache" / "tuberunner" / "default" / "state.json"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.runner.poll() is not None:
                raise RuntimeError(f"the runner exited; see {self.folder / 'runner.log'}")
            try:
                state = json.loads(state_file.read_text())
            except (OSError, ValueError):
                state = None
            if state and not state["jobs"] and all(i["socket_connected"] for i in state["instances"]):
                return
            await asyncio.sleep(0.1)
        raise RuntimeError("the runner did not become idle in time")

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    # ------------------------------------------------------------------ measurements

    async def through_the_system(
        self, clip_path: Path
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Upload, wait until published; (video, web-video job, HLS job) as the coordinator reports them."""
        files = {"videofile": (clip_path.name, clip_path.read_bytes(), "video/mp4")}
        fields = {
            "resolutions": str(self.clip.resolution),
            "hls": "true",
            "webVideo": "true",
            "splitAudio": "false",
            "storyboard": "false",
        }
        answer = await self.http.post("/api/v1/videos", data=fields, files=files)
        answer.raise_for_status()
        video_uuid = answer.json()["video"]["uuid"]
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while True:
            video = (await self.http.get(f"/api/v1/videos/{video_uuid}")).json()
            if video["state"] != "processing":
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"video {video_uuid} not published in time")
            # The timings come from the coordinator's timestamps: a slow poll costs no precision.
            await asyncio.sleep(0.25)
        if video["state"] != "published":
            raise RuntimeError(f"video {video_uuid} {video['state']}: {video['errors']}")
        jobs = {job["type"]: job for job in video["jobs"]["list"]}
        return video, jobs["vod-web-video-transcoding"], jobs["vod-hls-transcoding"]

    def by_hand(self, args: list[str], cwd: Path) -> float:
        """Wall time of `ffmpeg args` alone, with the runner's niceness."""
        cwd.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        subprocess.run(
            [str(self.ffmpeg), *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=lambda: os.nice(NICE),
            check=True,
        )
        return time.perf_counter() - started

    async def one_round(self, index: int, clip_path: Path) -> Round:
        with FfmpegTimer(self.runner.pid) as timer:
            video, web, hls = await self.through_the_system(clip_path)
        # The graph runs one job after the other: the web video's ffmpeg, then the HLS one.
        (web_start, web_end), (hls_start, hls_end) = timer.spans()
        created = timestamp(video["createdAt"])
        web_done = timestamp(web["finishedAt"])
        hls_done = timestamp(hls["finishedAt"])
        settings = EncodeSettings(threads=THREADS)
        work = self.folder / f"by-hand-{index}"

        source = await probe(clip_path)
        web_args = web_video_command(
            source, work / "web.mp4", resolution=web["resolution"], fps=web["fps"], settings=settings
        )
        web_by_hand = self.by_hand(web_args, work)

        # The HLS job's input is the web video: the same bytes, fetched from the static URL.
        (web_output,) = video["outputs"]["webVideos"]
        hls_input = work / "hls-input.mp4"
        hls_input.write_bytes((await self.http.get(web_output["url"])).content)
        # The runner packages the web video it encoded (it kept it) instead of encoding it again: the
        # by-hand command is that packaging.
        hls_args = hls_remux_command(
            hls_input, work / "hls.m3u8", work / "hls-fragmented.mp4", with_video=True, with_audio=True
        )
        hls_by_hand = self.by_hand(hls_args, work)
        shutil.rmtree(work, ignore_errors=True)
        return Round(
            web_system_s=web_done - created,
            web_by_hand_s=web_by_hand,
            hls_system_s=hls_done - web_done,
            hls_by_hand_s=hls_by_hand,
            web_pickup_s=timestamp(web["startedAt"]) - created,
            hls_pickup_s=timestamp(hls["startedAt"]) - web_done,
            web_runner_ffmpeg_s=web_end - web_start,
            hls_runner_ffmpeg_s=hls_end - hls_start,
            web_before_s=web_start - created,
            hls_before_s=hls_start - web_done,
            web_after_s=web_done - web_end,
            hls_after_s=hls_done - hls_end,
        )


def mb(kb: int) -> float:
    return kb / 1024


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


async def run(args: argparse.Namespace) -> int:
    clip = QUICK if args.quick else FULL
    folder = Path(tempfile.mkdtemp(prefix="tuberunner-overhead-"))
    bench = Bench(folder, clip, args.runner_log_level)
    print(f"runner overhead benchmark: {clip.duration_s:g} s of {clip.width}x{clip.height} at {clip.fps} fps")
    print(f"  {os.cpu_count()} CPU(s), ffmpeg {bench.ffmpeg}, work folder {folder}")
    print(f"  load average at start: {load_average()} (other work on the machine skews the times)")
    try:
        clip_path = await make_sample_clip(
            bench.ffmpeg,
            folder / "clip.mp4",
            duration_s=clip.duration_s,
            width=clip.width,
            height=clip.height,
            fps=clip.fps,
        )
        await bench.start_coordinator()
        pid = await bench.start_runner()
        await asyncio.sleep(2.0)  # let start-up settle: a steady idle daemon, not its start
        idle_before = memory_kb(pid)
        print(
            f"idle runner daemon (pid {pid}): VmRSS {mb(idle_before['VmRSS']):.1f} MB "
            f"(peak {mb(idle_before['VmHWM']):.1f} MB); target < {TARGET_RSS_MB:g} MB"
        )
        rounds = []
        for index in range(args.rounds):
            measured = await bench.one_round(index, clip_path)
            rounds.append(measured)
            print(
                f"round {index + 1}: web video {measured.web_system_s:.2f} s vs "
                f"{measured.web_by_hand_s:.2f} s by hand (x{measured.web_ratio:.3f}; its ffmpeg "
                f"{measured.web_runner_ffmpeg_s:.2f} s, before it {measured.web_before_s:.2f} s with a "
                f"{measured.web_pickup_s * 1000:.0f} ms pickup, after it {measured.web_after_s:.2f} s)"
            )
            print(
                f"         HLS {measured.hls_system_s:.2f} s vs {measured.hls_by_hand_s:.2f} s by hand "
                f"(x{measured.hls_ratio:.3f}; its ffmpeg {measured.hls_runner_ffmpeg_s:.2f} s, "
                f"before it {measured.hls_before_s:.2f} s with a {measured.hls_pickup_s * 1000:.0f} ms "
                f"pickup, after it {measured.hls_after_s:.2f} s); "
                f"runner RSS {mb(memory_kb(pid)['VmRSS']):.1f} MB"
            )
        await bench.wait_idle()
        await asyncio.sleep(2.0)
        idle_after = memory_kb(pid)
        hls_ratio = statistics.median(r.hls_ratio for r in rounds)
        web_ratio = statistics.median(r.web_ratio for r in rounds)
        # Best of N on each side: what other processes on the machine add is always positive.
        hls_best = min(r.hls_system_s for r in rounds) / min(r.hls_by_hand_s for r in rounds)
        web_best = min(r.web_system_s for r in rounds) / min(r.web_by_hand_s for r in rounds)
        # The overhead proper does not depend on how fast ffmpeg happened to run: added to the by-hand time.
        hls_overhead = statistics.median(r.hls_overhead_s for r in rounds)
        web_overhead = statistics.median(r.web_overhead_s for r in rounds)
        hls_by_hand = statistics.median(r.hls_by_hand_s for r in rounds)
        web_by_hand = statistics.median(r.web_by_hand_s for r in rounds)
        print()
        print(
            f"HLS job wall-time ratio (runner + coordinator / ffmpeg by hand): median {hls_ratio:.3f}, "
            f"best of {len(rounds)} {hls_best:.3f}; target <= {TARGET_RATIO}"
        )
        print(
            f"  time outside ffmpeg {hls_overhead:.2f} s per job (median): "
            f"x{(hls_by_hand + hls_overhead) / hls_by_hand:.3f} of the by-hand time"
        )
        print(f"web-video job wall-time ratio: median {web_ratio:.3f}, best of {len(rounds)} {web_best:.3f}")
        print(
            f"  time outside ffmpeg {web_overhead:.2f} s per job (median): "
            f"x{(web_by_hand + web_overhead) / web_by_hand:.3f} of the by-hand time"
        )
        print(
            f"idle runner RSS: {mb(idle_before['VmRSS']):.1f} MB before the jobs, "
            f"{mb(idle_after['VmRSS']):.1f} MB after (peak {mb(idle_after['VmHWM']):.1f} MB); "
            f"target < {TARGET_RSS_MB:g} MB"
        )
        print(f"load average at the end: {load_average()}")
    finally:
        bench.stop()
        await bench.http.aclose()
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="10 s of 360p instead of 60 s of 720p")
    parser.add_argument("--rounds", type=int, default=3, help="uploads measured (default: 3)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, database, files)")
    parser.add_argument(
        "--runner-log-level", default="info", help="the daemon's log level (debug: its ffmpeg commands)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
