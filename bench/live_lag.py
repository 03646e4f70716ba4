"""Live lag and CPU of one live through runner + coordinator vs the same ffmpeg ladder run by hand.

    .venv/bin/python bench/live_lag.py [--duration 40] [--resolutions 480,240] [--runs 1]

Both ways get the same publisher (`ffmpeg -re`, 854x480 at 25 fps, the frame number burnt into every
picture, a keyframe every 2 s) and the same ladder with PeerTube's normal latency (4 s segments):

* **through**: `tuberunner coordinator serve` (RTMP on a free port) and `tuberunner server` as child
  processes; the publisher pushes to the coordinator, the runner pulls from it, transcodes with its live
  command and uploads; a viewer reads the coordinator's live HLS over HTTP every 0.1 s;
* **by hand**: the runner's own live command (`media.live.live_command`), ffmpeg listening for the publisher
  itself (`-listen 1`), writing HLS into a folder the viewer reads every 0.1 s. This ffmpeg reads the
  stream from its first frame in real time, so its input analysis (5 s by default) delays its output; the
  runner's ffmpeg starts on the coordinator's kept GOP, which comes as a burst.

The viewer polls the coordinator's master and media playlists every 0.1 s: most of the coordinator's CPU in
these numbers is answering it.

Numbers: first segment of each rendition after the first frame was published; lag when a segment first
appears (wall clock minus the stream time of its last frame, read from the picture), median and max; CPU
seconds (user + system) spent from the first frame published to the end of the live, by each process with
its reaped children (the runner's ffmpeg counts for the runner; the daemons' start-up does not count), from
/proc and `wait4`. The publisher's CPU is left out of both. Prints numbers, never fails on them.
Needs a runner with the live processor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

FPS = 25
SEGMENT_S = 4
ADMIN_TOKEN = "tra-bench-live-lag"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def publisher_args(ffmpeg: str, url: str, duration_s: float) -> list[str]:
    from tuberunner.media.samples import frame_counter_filter

    return [
        ffmpeg, "-hide_banner", "-loglevel", "error", "-re",
        "-f", "lavfi", "-i", f"testsrc2=size=854x480:rate={FPS}",
        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100",
        "-t", f"{duration_s:g}", "-vf", frame_counter_filter(), "-pix_fmt", "yuv420p",
        "-c:v", "libx264", "-preset", "ultrafast", "-g", str(2 * FPS), "-c:a", "aac", "-f", "flv", url,
    ]  # fmt: skip


@dataclass
class Child:
    """A child process whose CPU time (with its reaped children) is read by `wait4` when it ends."""

    name: str
    process: subprocess.Popen[bytes]
    cpu_s: float | None = None

    async def wait(self) -> float:
        _, _, usage = await asyncio.to_thread(os.wait4, self.process.pid, 0)
        self.process.returncode = 0
        self.cpu_s = usage.ru_utime + usage.ru_stime
        return self.cpu_s


_TICKS_S = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system seconds of `pid` and of its children it has waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / _TICKS_S


def start_publisher(ffmpeg: str, url: str, duration_s: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen(publisher_args(ffmpeg, url, duration_s), stdin=subprocess.DEVNULL)


def spawn(name: str, args: list[str], log: Path, env: dict[str, str] | None = None) -> Child:
    with log.open("ab") as out:
        process = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    return Child(name, process)


@dataclass
class Viewer:
    """Reads a live HLS every 0.1 s through `read(name) -> bytes | None`; keeps what the runs report."""

    read: Callable[[str], Awaitable[bytes | None]]
    started_at: float
    first_segment_s: dict[str, float] = field(default_factory=dict)
    lags_s: list[float] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    last_frame: int = -1

    async def run(self, until: Callable[[], bool]) -> None:
        from tuberunner.media.binaries import find_ffmpeg
        from tuberunner.media.samples import frame_counters

        ffmpeg = find_ffmpeg()
        while True:
            last_pass = until()  # one more pass once it is over: the last segments are listed by then
            master = await self.read("master.m3u8")
            playlists = (
                [
                    line
                    for line in master.decode().splitlines()
                    if line.endswith(".m3u8") and not line.startswith("#")
                ]
                if master
                else []
            )
            for name in playlists:
                text = await self.read(name)
                if text is None:
                    continue
                listed = [line for line in text.decode().splitlines() if line.endswith(".ts")]
                if listed and name not in self.first_segment_s:
                    self.first_segment_s[name] = time.time() - self.started_at
                new = [segment for segment in listed if segment not in self.seen]
                if not new:
                    continue
                self.seen.update(new)
                data = await self.read(new[-1])
                if data:
                    frames = await frame_counters(ffmpeg, [data])
                    if frames:
                        self.lags_s.append(time.time() - (self.started_at + (frames[-1] + 1) / FPS))
                        self.last_frame = max(self.last_frame, frames[-1])
            if last_pass:
                return
            await asyncio.sleep(0.1)

    def report(self) -> dict[str, Any]:
        lags = self.lags_s or [float("nan")]
        return {
            "first_segment_s": {k: round(v, 2) for k, v in sorted(self.first_segment_s.items())},
            "lag_median_s": round(statistics.median(lags), 2),
            "lag_max_s": round(max(lags), 2),
            "segments_seen": len(self.seen),
            "last_frame_seen": self.last_frame,
        }


async def through(folder: Path, duration_s: float, resolutions: str) -> dict[str, Any]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TUBERUNNER_")},
        "TUBERUNNER_ADMIN_TOKEN": ADMIN_TOKEN,
        "XDG_CONFIG_HOME": str(folder / "config"),
        "XDG_CACHE_HOME": str(folder / "cache"),
        "TUBERUNNER_JOBS_MIN_FREE_DISK_BYTES": "0",
    }
    port, rtmp = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    python = [sys.executable, "-m", "tuberunner"]
    coordinator = spawn(
        "coordinator",
        [*python, "coordinator", "serve", "--data-dir", str(folder / "data"), "--port", str(port),
         "--rtmp-port", str(rtmp)],
        folder / "coordinator.log",
        env,
    )  # fmt: skip
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as http:
        for _ in range(200):
            try:
                if (await http.get("/readyz")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
        (await http.post("/api/v1/runners/registration-tokens/generate")).raise_for_status()
        token = (await http.get("/api/v1/runners/registration-tokens", params={"sort": "-createdAt"})).json()
        registration = token["data"][0]["registrationToken"]
        await asyncio.to_thread(
            subprocess.run,
            [
                *python,
                "register",
                "--url",
                url,
                "--registration-token",
                registration,
                "--runner-name",
                "bench",
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        runner = spawn("runner", [*python, "server"], folder / "runner.log", env)
        created = (
            await http.post("/api/v1/videos/live", json={"name": "bench", "resolutions": resolutions})
        ).json()
        live = created["live"]
        base = live["hlsUrl"].rsplit("/", 1)[0]

        async def read(name: str) -> bytes | None:
            answer = await http.get(f"{base}/{name}")
            return answer.content if answer.status_code == 200 else None

        from tuberunner.media.binaries import find_ffmpeg

        baseline = {child.name: cpu_s(child.process.pid) for child in (runner, coordinator)}
        started = time.time()
        publisher = start_publisher(str(find_ffmpeg()), f"{live['rtmpUrl']}/{live['streamKey']}", duration_s)
        viewer = Viewer(read, started)

        async def ended() -> bool:
            state = (await http.get(f"/api/v1/videos/live/{created['video']['uuid']}")).json()
            return bool(state["state"] == "ended")

        done = False

        async def watch_end() -> None:
            nonlocal done
            while not await ended():  # noqa: ASYNC110 - the state of another process, over HTTP
                await asyncio.sleep(0.2)
            done = True

        watcher = asyncio.create_task(watch_end())
        await asyncio.gather(viewer.run(lambda: done), watcher)
        ended_after_s = time.time() - started - duration_s
        await asyncio.to_thread(publisher.wait)
        runner_cpu = cpu_s(runner.process.pid) - baseline["runner"]
        coordinator_cpu = cpu_s(coordinator.process.pid) - baseline["coordinator"]
    runner.process.terminate()
    coordinator.process.terminate()
    await runner.wait()
    await coordinator.wait()
    return {
        "way": "through runner + coordinator",
        **viewer.report(),
        "ended_after_publisher_s": round(ended_after_s, 2),
        "cpu_s": {"runner+ffmpeg": round(runner_cpu, 2), "coordinator": round(coordinator_cpu, 2)},
        "cpu_total_s": round(runner_cpu + coordinator_cpu, 2),
    }


async def by_hand(folder: Path, duration_s: float, resolutions: str) -> dict[str, Any]:
    from tuberunner.media.binaries import find_ffmpeg
    from tuberunner.media.commands import EncodeSettings
    from tuberunner.media.live import LiveRendition, live_command
    from tuberunner.media.probe import probe
    from tuberunner.media.profiles import compute_output_fps

    ffmpeg = str(find_ffmpeg())
    out = folder / "hls"
    out.mkdir(parents=True)
    # The input's description, as the runner's probe of the stream gives it: a few seconds recorded once.
    sample = folder / "sample.flv"
    recording = publisher_args(ffmpeg, str(sample), 2)
    recording.remove("-re")
    await asyncio.to_thread(subprocess.run, recording, check=True)
    info = await probe(sample)
    ladder = [int(r) for r in resolutions.split(",")]
    renditions = [LiveRendition(r, compute_output_fps(FPS, r, r == 480)) for r in ladder]
    rtmp = f"rtmp://127.0.0.1:{free_port()}/live/bench"
    command = live_command(
        info,
        rtmp,
        renditions,
        output_dir=out,
        segment_duration_s=SEGMENT_S,
        segment_list_size=15,
        settings=EncodeSettings(threads=0, has_libfdk_aac=False),
    )
    args = list(command.args)
    args.insert(args.index("-i"), "-listen")
    args.insert(args.index("-i"), "1")
    ladder_ffmpeg = spawn("ffmpeg", [ffmpeg, *args], folder / "ffmpeg.log")
    await asyncio.sleep(0.5)
    started = time.time()
    publisher = start_publisher(ffmpeg, rtmp, duration_s)

    async def read(name: str) -> bytes | None:
        try:
            return (out / name).read_bytes()
        except OSError:
            return None

    viewer = Viewer(read, started)
    viewing = asyncio.create_task(viewer.run(lambda: ladder_ffmpeg.cpu_s is not None))
    cpu = await ladder_ffmpeg.wait()
    ended_after_s = time.time() - started - duration_s
    await viewing
    await asyncio.to_thread(publisher.wait)
    return {
        "way": "ffmpeg ladder by hand",
        **viewer.report(),
        "ended_after_publisher_s": round(ended_after_s, 2),
        "cpu_s": {"ffmpeg": round(cpu, 2)},
        "cpu_total_s": round(cpu, 2),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=40.0, help="seconds published")
    parser.add_argument("--resolutions", default="480,240")
    parser.add_argument("--runs", type=int, default=1)
    options = parser.parse_args()
    results = []
    for run in range(options.runs):
        for way in (through, by_hand):
            with tempfile.TemporaryDirectory(prefix="live-lag-") as tmp:
                result = await way(Path(tmp), options.duration, options.resolutions)
            result["run"] = run + 1
            print(json.dumps(result), flush=True)
            results.append(result)
    for way in ("through runner + coordinator", "ffmpeg ladder by hand"):
        mine = [r for r in results if r["way"] == way]
        print(
            f"{way:30s} lag median {statistics.median(r['lag_median_s'] for r in mine):5.2f} s"
            f"  max {max(r['lag_max_s'] for r in mine):5.2f} s"
            f"  CPU {statistics.median(r['cpu_total_s'] for r in mine):6.2f} s"
        )
    through_cpu = statistics.median(r["cpu_total_s"] for r in results if r["way"].startswith("through"))
    hand_cpu = statistics.median(r["cpu_total_s"] for r in results if r["way"].startswith("ffmpeg"))
    print(f"CPU ratio (through / by hand): {through_cpu / hand_cpu:.3f}")


if __name__ == "__main__":
    asyncio.run(main())
