"""A whole ladder: `tuberunner transcode` against the single-ffmpeg limit, and the quality of what it makes.

    python bench/ladder.py [--quick] [--rounds 2] [--runners 2] [--no-vmaf]

For each generated clip (30 s of 1280x720 and of 1920x1080 at 30 fps, `testsrc2` with a stereo tone;
`--quick`: 8 s of 640x360), in the same run and alternating:

* **limit**: one ffmpeg that decodes the clip once and encodes every rung once, with the runner's own x264
  settings (`media.commands.ladder_command`: veryfast, b-strategy 1, 16 B-frames, GOP 2 s, the job's VBV
  caps), then the HLS renditions packaged from those MP4s with `-c copy` (video renditions and the
  audio-only one), timed around the ffmpeg processes alone;
* **one-shot**: `tuberunner transcode CLIP -o OUT --resolutions ... --runners N` as a child process, wall
  time from start to exit (embedded coordinator and runners start-up, every job, the export).

It prints each round, the medians and their ratio (target: one-shot <= 1.15 x the limit), and the CPU time
(user + system, of every process involved) of both sides: on a machine shared with other work the wall
times wander with the load, the CPU time much less, and its ratio says how much work the pipeline adds.

Quality (`--no-vmaf` skips it): each output of the last one-shot run against *today's encode of the same
rung*, the outputs the PeerTube-shaped pipeline made before encodes were shared, rebuilt here with the
very commands of that pipeline: the max-resolution web video from the clip, each lower web video and every
HLS rendition encoded from that max-resolution file. VMAF (libvmaf, every 3rd frame) is printed per output
with what replaced the encode: `same encode`, `input copied` (the max-resolution HLS rendition is the
max-resolution file packaged, where today's was a second encode of it), `ladder rung` (encoded from the
clip in the ladder instead of from the max-resolution file: >= 95 expected), and, to tell which one lost
quality, both outputs against the clip itself. Last, the remux every runner does on any server: today's
HLS encode of a rung against the web video of the same rung it now packages instead (>= 99 expected).
libvmaf comes from the ffmpeg of the `imageio-ffmpeg` wheel (Debian's 5.1 has none);
the encodes use the ffmpeg the runner would (FFMPEG_PATH, else the system's).

The script prints numbers and never fails on them; it exits 2 only when the setup itself breaks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tuberunner.media.binaries import find_ffmpeg
from tuberunner.media.commands import (
    EncodeSettings,
    LadderRung,
    hls_command,
    hls_remux_command,
    ladder_command,
    web_video_command,
)
from tuberunner.media.probe import MediaInfo, probe
from tuberunner.media.profiles import compute_output_fps
from tuberunner.media.samples import make_sample_clip

TARGET_RATIO = 1.15
VMAF_SUBSAMPLE = 3


@dataclass(frozen=True)
class Clip:
    name: str
    width: int
    height: int
    duration_s: float
    fps: int = 30

    @property
    def ladder(self) -> tuple[int, ...]:
        return tuple(r for r in (1080, 720, 480, 360, 240) if r <= self.height)


FULL = (Clip("720p", 1280, 720, 30), Clip("1080p", 1920, 1080, 30))
QUICK = (Clip("360p", 640, 360, 8),)


@dataclass
class Cost:
    wall_s: float = 0.0
    cpu_s: float = 0.0  # user + system of the process and every descendant it waited for

    def __iadd__(self, other: Cost) -> Cost:
        self.wall_s += other.wall_s
        self.cpu_s += other.cpu_s
        return self


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measured(command: list[str], cwd: Path | None = None) -> Cost:
    cpu, started = children_cpu_s(), time.monotonic()
    subprocess.run(command, cwd=cwd, check=True, capture_output=True)
    return Cost(time.monotonic() - started, children_cpu_s() - cpu)


def run(ffmpeg: Path, args: list[str], cwd: Path) -> Cost:
    return measured([os.fspath(ffmpeg), *args], cwd)


async def limit_once(ffmpeg: Path, source: MediaInfo, clip: Clip, folder: Path) -> Cost:
    folder.mkdir(parents=True, exist_ok=True)
    settings = EncodeSettings()
    top = clip.ladder[0]
    rungs = [
        LadderRung(r, compute_output_fps(clip.fps, r, r == top), folder / f"rung-{r}.mp4")
        for r in clip.ladder
    ]
    cost = run(ffmpeg, ladder_command(source, rungs, settings=settings), folder)
    for rung in rungs:
        args = hls_remux_command(
            rung.output,
            folder / f"{rung.resolution}.m3u8",
            folder / f"{rung.resolution}-fragmented.mp4",
            with_video=True,
            with_audio=False,
        )
        cost += run(ffmpeg, args, folder)
    audio = hls_remux_command(
        rungs[0].output, folder / "0.m3u8", folder / "0-fragmented.mp4", with_video=False, with_audio=True
    )
    cost += run(ffmpeg, audio, folder)
    return cost


def oneshot_once(clip_path: Path, clip: Clip, out: Path, runners: int) -> Cost:
    return measured(
        [
            sys.executable,
            "-m",
            "tuberunner",
            "transcode",
            os.fspath(clip_path),
            "-o",
            os.fspath(out),
            "--resolutions",
            ",".join(str(r) for r in clip.ladder),
            "--runners",
            str(runners),
        ]
    )


async def todays_encodes(ffmpeg: Path, source: MediaInfo, clip: Clip, folder: Path) -> dict[str, Path]:
    """The outputs of the pipeline before encodes were shared: every rung encoded from the top file."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = EncodeSettings()
    top = clip.ladder[0]
    top_file = folder / f"web-{top}.mp4"
    top_fps = compute_output_fps(clip.fps, top, True)
    run(ffmpeg, web_video_command(source, top_file, resolution=top, fps=top_fps, settings=settings), folder)
    top_info = await probe(top_file)
    outputs = {f"web {top}": top_file}
    for r in clip.ladder:
        fps = compute_output_fps(clip.fps, r, r == top)
        if r != top:
            path = folder / f"web-{r}.mp4"
            run(ffmpeg, web_video_command(top_info, path, resolution=r, fps=fps, settings=settings), folder)
            outputs[f"web {r}"] = path
        playlist, fragmented = folder / f"hls-{r}.m3u8", folder / f"hls-{r}-fragmented.mp4"
        command = hls_command(
            top_info, playlist, fragmented, resolution=r, fps=fps, settings=settings, separated_audio=True
        )
        run(ffmpeg, command, folder)
        outputs[f"hls {r}"] = fragmented
    return outputs


def new_outputs(out: Path) -> dict[str, Path]:
    summary = json.loads((out / "summary.json").read_text())
    outputs = {f"web {w['resolution']}": out / w["file"] for w in summary["webVideos"]}
    for rendition in summary["hls"]["renditions"]:
        if rendition["resolution"]:
            outputs[f"hls {rendition['resolution']}"] = out / rendition["file"]
    return outputs


def vmaf(vmaf_ffmpeg: Path, distorted: Path, reference: Path) -> float | None:
    """VMAF of `distorted` with `reference` (scaled to its size when they differ) as the reference."""
    graph = (
        "[1:v][0:v]scale2ref=flags=bicubic[ref][dist];"
        f"[dist][ref]libvmaf=n_subsample={VMAF_SUBSAMPLE}:n_threads={os.cpu_count() or 1}"
    )
    answer = subprocess.run(
        [
            os.fspath(vmaf_ffmpeg),
            "-hide_banner",
            "-i",
            os.fspath(distorted),
            "-i",
            os.fspath(reference),
            "-lavfi",
            graph,
            "-f",
            "null",
            "-",
        ],
        capture_output=True,
        text=True,
    )
    found = re.search(r"VMAF score: ([0-9.]+)", answer.stderr)
    return float(found.group(1)) if found else None


def bundled_ffmpeg() -> Path | None:
    try:
        import imageio_ffmpeg

        return Path(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError):
        return None


async def bench_clip(args: argparse.Namespace, ffmpeg: Path, clip: Clip, root: Path) -> None:
    folder = root / clip.name
    folder.mkdir()
    clip_path = folder / f"clip-{clip.name}.mp4"
    await make_sample_clip(
        ffmpeg, clip_path, duration_s=clip.duration_s, width=clip.width, height=clip.height, fps=clip.fps
    )
    source = await probe(clip_path)
    size = f"{clip.width}x{clip.height}@{clip.fps}"
    print(f"\n== {clip.name}: {clip.duration_s:g} s of {size}, ladder {clip.ladder}")
    limits: list[Cost] = []
    oneshots: list[Cost] = []
    out = folder / "out"
    for index in range(args.rounds):
        limit = await limit_once(ffmpeg, source, clip, folder / f"limit-{index}")
        out = folder / f"out-{index}"
        oneshot = oneshot_once(clip_path, clip, out, args.runners)
        limits.append(limit)
        oneshots.append(oneshot)
        load = os.getloadavg()[0]
        print(
            f"round {index + 1}: limit {limit.wall_s:6.2f} s   one-shot {oneshot.wall_s:6.2f} s   "
            f"ratio {oneshot.wall_s / limit.wall_s:.2f}   "
            f"CPU {limit.cpu_s:6.1f} s vs {oneshot.cpu_s:6.1f} s: {oneshot.cpu_s / limit.cpu_s:.2f}   "
            f"(load {load:.1f})"
        )
    limit_s = statistics.median(c.wall_s for c in limits)
    oneshot_s = statistics.median(c.wall_s for c in oneshots)
    best = min(c.wall_s for c in oneshots) / min(c.wall_s for c in limits)
    cpu = statistics.median(c.cpu_s for c in oneshots) / statistics.median(c.cpu_s for c in limits)
    print(
        f"median: limit {limit_s:.2f} s, one-shot {oneshot_s:.2f} s: ratio {oneshot_s / limit_s:.2f} "
        f"(target <= {TARGET_RATIO}); best of {args.rounds}: {best:.2f}; CPU time ratio {cpu:.2f}"
    )
    if args.no_vmaf:
        return
    vmaf_ffmpeg = bundled_ffmpeg()
    if vmaf_ffmpeg is None:
        print("VMAF: no ffmpeg with libvmaf (imageio-ffmpeg is not installed)")
        return
    today = await todays_encodes(ffmpeg, source, clip, folder / "today")
    produced = new_outputs(out)
    top = clip.ladder[0]
    print(
        "VMAF of the one-shot's outputs against today's encode of the same rung; then each of the two "
        "against the clip (scaled to the rung):"
    )
    print(f"  {'output':9s} {'made by':18s} {'vs today':>9s} {'new/clip':>9s} {'today/clip':>11s}")
    for name, reference in today.items():
        kind, resolution = name.split()
        if int(resolution) == top:
            how = "same encode" if kind == "web" else "input copied"
        else:
            how = "ladder rung"
        new = produced.get(name)
        scores = [
            vmaf(vmaf_ffmpeg, new, reference) if new else None,
            vmaf(vmaf_ffmpeg, new, clip_path) if new else None,
            vmaf(vmaf_ffmpeg, reference, clip_path),
        ]
        shown = " ".join(f"{score:9.2f}" if score is not None else "      n/a" for score in scores)
        print(f"  {name:9s} {how:18s} {shown}")
    print("Any server: an HLS rendition packaged from the kept web video of the same input and settings,")
    print("against today's HLS encode of that rung:")
    for rung in clip.ladder[1:]:
        score = vmaf(vmaf_ffmpeg, today[f"web {rung}"], today[f"hls {rung}"])
        kept = f"{score:9.2f}" if score is not None else "      n/a"
        print(f"  hls {rung:<5d} kept web video     {kept}")


async def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one 8 s 360p clip")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runners", type=int, default=2)
    parser.add_argument("--no-vmaf", action="store_true")
    args = parser.parse_args()
    try:
        ffmpeg = find_ffmpeg(os.environ.get("FFMPEG_PATH"))
    except Exception as exc:
        print(f"setup failed: {exc}", file=sys.stderr)
        return 2
    print(f"ffmpeg {ffmpeg}; {os.cpu_count()} cores; one-shot with --runners {args.runners}")
    with tempfile.TemporaryDirectory(prefix="bench-ladder-") as tmp:
        try:
            for clip in QUICK if args.quick else FULL:
                await bench_clip(args, ffmpeg, clip, Path(tmp))
        except (subprocess.CalledProcessError, OSError) as exc:
            stderr = getattr(exc, "stderr", b"") or b""
            print(f"setup failed: {exc}\n{stderr.decode(errors='replace')[-2000:]}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
