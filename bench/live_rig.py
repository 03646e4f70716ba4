"""Lives on a real PeerTube (the rig of ../shared/rigs/peertube-6.3): our runner next to the official one.

    PEERTUBE_RIG=$HOME/peertube-rig .venv/bin/python bench/live_rig.py [--duration 40] [--runs 1]
        [--runners ours,official]

Needs the rig's server up (`pt.sh start server`); the official runner is started and stopped by the script
(`pt.sh start|stop runner`), ours runs as `tuberunner server` in a folder of its own. Each runner in turn
serves the instance alone. Per run and runner:

* a live (normal latency: PeerTube's 4 s segments; the rig's ladder, 480p + 240p) is published with
  `ffmpeg -re` (854x480, 25 fps, the frame number burnt into every picture, a keyframe every 2 s) for
  `--duration` s, while a viewer reads PeerTube's live HLS every 0.1 s: time from the first frame published
  to the job processing and to the first segment of each rendition, lag (wall clock minus the stream time of
  the last frame of each new segment) median and max, the end of the stream lost (frames published after
  the last one a viewer could get), the job's end state, the runner's CPU (with its ffmpeg) during the live;
* a second live, published then deleted once its segments flow: seconds until the runner's ffmpeg is gone.

Prints numbers; never fails on them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from live_lag import FPS, Viewer, cpu_s, spawn, start_publisher

URL = "http://localhost:9000"


def rig() -> Path:
    return Path(os.environ.get("PEERTUBE_RIG", Path.home() / "peertube-rig"))


def pt(*args: str) -> str:
    done = subprocess.run([str(rig() / "pt.sh"), *args], check=True, capture_output=True, text=True)
    return done.stdout.strip()


def ffmpeg_children(parent: int) -> list[int]:
    """ffmpeg processes whose parent is `parent`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and name == "ffmpeg":
            found.append(int(entry.name))
    return found


class Rig:
    def __init__(self) -> None:
        self.http = httpx.AsyncClient(base_url=URL, timeout=30)

    async def login(self) -> None:
        token = await asyncio.to_thread(pt, "token")
        self.http.headers["Authorization"] = f"Bearer {token}"

    async def create_live(self, name: str) -> dict[str, Any]:
        answer = await self.http.post(
            "/api/v1/videos/live",
            data={"channelId": "1", "name": name, "privacy": "1", "saveReplay": "false"},
        )
        answer.raise_for_status()
        video = answer.json()["video"]
        live = (await self.http.get(f"/api/v1/videos/live/{video['id']}")).json()
        return {"id": video["id"], "uuid": video["uuid"], "publish": f"{live['rtmpUrl']}/{live['streamKey']}"}

    async def live_job(self, since: float) -> dict[str, Any] | None:
        answer = await self.http.get("/api/v1/runners/jobs", params={"count": 20, "sort": "-createdAt"})
        for job in answer.json()["data"]:
            created = time.mktime(time.strptime(job["createdAt"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
            if job["type"] == "live-rtmp-hls-transcoding" and created >= since - 2:
                found: dict[str, Any] = job
                return found
        return None

    async def read(self, uuid: str, name: str) -> bytes | None:
        answer = await self.http.get(f"/static/streaming-playlists/hls/{uuid}/{name}")
        return answer.content if answer.status_code == 200 else None


async def start_ours(folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith("TUBERUNNER_") or k == "TUBERUNNER_LOG_LEVEL"
        },
        "XDG_CONFIG_HOME": str(folder / "config"),
        "XDG_CACHE_HOME": str(folder / "cache"),
        "XDG_STATE_HOME": str(folder / "state"),
        "TUBERUNNER_JOBS_MIN_FREE_DISK_BYTES": "0",
    }
    python = [sys.executable, "-m", "tuberunner"]
    registration = await asyncio.to_thread(pt, "regtoken")
    await asyncio.to_thread(
        subprocess.run,
        [*python, "register", "--url", URL, "--registration-token", registration, "--runner-name",
         f"bench-ours-{int(time.time())}"],
        env=env, check=True, capture_output=True,
    )  # fmt: skip
    child = spawn("ours", [*python, "server"], folder / "runner.log", env)
    await asyncio.sleep(3)  # registered and polling
    return child.process, child.process.pid


async def start_official() -> tuple[None, int]:
    await asyncio.to_thread(pt, "start", "runner")
    return None, int((rig() / "logs" / "runner.pid").read_text())


async def one_live(rig_api: Rig, runner_pid: int, duration_s: float) -> dict[str, Any]:
    from tuberunner.media.binaries import find_ffmpeg

    live = await rig_api.create_live("bench live")
    baseline = cpu_s(runner_pid)
    started = time.time()
    publisher = start_publisher(str(find_ffmpeg()), live["publish"], duration_s)
    viewer = Viewer(lambda name: rig_api.read(live["uuid"], name), started)
    processing_s: float | None = None
    final: dict[str, Any] | None = None

    async def follow_job() -> None:
        nonlocal processing_s, final
        while True:
            job = await rig_api.live_job(started)
            if job is not None:
                label = job["state"]["label"]
                if label == "Processing" and processing_s is None:
                    processing_s = time.time() - started
                if label not in ("Pending", "Processing", "Waiting for a parent job"):
                    final = job
                    return
            await asyncio.sleep(0.2)

    follower = asyncio.create_task(follow_job())
    published_end = started + duration_s
    await viewer.run(lambda: follower.done() or time.time() > published_end + 20)
    await asyncio.to_thread(publisher.wait)
    if not follower.done():
        follower.cancel()
    cpu = cpu_s(runner_pid) - baseline
    frames = int(duration_s * FPS)
    return {
        **viewer.report(),
        "processing_after_s": None if processing_s is None else round(processing_s, 2),
        "end_lost_s": round((frames - 1 - viewer.last_frame) / FPS, 2),
        "job_end": None if final is None else final["state"]["label"],
        "job_error": None if final is None else final.get("error"),
        "runner_cpu_s": round(cpu, 2),
    }


async def deletion(rig_api: Rig, runner_pid: int) -> float | None:
    from tuberunner.media.binaries import find_ffmpeg

    live = await rig_api.create_live("bench delete")
    publisher = start_publisher(str(find_ffmpeg()), live["publish"], 60)
    try:
        for _ in range(300):
            playlist = await rig_api.read(live["uuid"], "master.m3u8")
            if playlist and ffmpeg_children(runner_pid):
                break
            await asyncio.sleep(0.1)
        else:
            return None
        await asyncio.sleep(2)
        pids = ffmpeg_children(runner_pid)
        asked = time.time()
        (await rig_api.http.delete(f"/api/v1/videos/{live['id']}")).raise_for_status()
        while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.time() - asked < 120:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        return round(time.time() - asked, 2)
    finally:
        publisher.kill()
        publisher.wait()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=40.0, help="seconds published")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--runners", default="ours,official")
    parser.add_argument("--logs", type=Path, help="keep our runner's log there")
    options = parser.parse_args()
    rig_api = Rig()
    await rig_api.login()
    results = []
    for run in range(options.runs):
        for kind in options.runners.split(","):
            await asyncio.to_thread(pt, "stop", "runner")
            with tempfile.TemporaryDirectory(prefix="live-rig-") as tmp:
                ours, pid = await (start_ours(Path(tmp)) if kind == "ours" else start_official())
                try:
                    result = await one_live(rig_api, pid, options.duration)
                    result["ffmpeg_gone_after_delete_s"] = await deletion(rig_api, pid)
                finally:
                    if ours is not None:
                        ours.terminate()
                        ours.wait()
                        if options.logs is not None:
                            options.logs.mkdir(parents=True, exist_ok=True)
                            log = (Path(tmp) / "runner.log").read_bytes()
                            (options.logs / f"ours-{run + 1}.log").write_bytes(log)
                    else:
                        await asyncio.to_thread(pt, "stop", "runner")
            result.update(runner=kind, run=run + 1)
            print(json.dumps(result), flush=True)
            results.append(result)
    for kind in options.runners.split(","):
        mine = [r for r in results if r["runner"] == kind]
        firsts = [max(r["first_segment_s"].values()) for r in mine if r["first_segment_s"]] or [float("nan")]
        print(
            f"{kind:9s} first segment (all renditions) {statistics.median(firsts):5.2f} s"
            f"  lag median {statistics.median(r['lag_median_s'] for r in mine):5.2f} s"
            f"  max {max(r['lag_max_s'] for r in mine):5.2f} s"
            f"  end lost {statistics.median(r['end_lost_s'] for r in mine):5.2f} s"
            f"  ffmpeg gone after delete {[r['ffmpeg_gone_after_delete_s'] for r in mine]}"
        )


if __name__ == "__main__":
    asyncio.run(main())
