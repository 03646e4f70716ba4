"""Progress of a one-shot transcode: Rich bars on a terminal (one per job, one overall, speed and ETA),
plain log lines elsewhere."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

_FINAL = {"Completed", "Errored", "Cancelled", "Parent job failed", "Parent job cancelled"}


def job_label(job: dict[str, Any]) -> str:
    kind: str = {
        "vod-web-video-transcoding": "MP4",
        "vod-hls-transcoding": "HLS",
        "vod-audio-merge-transcoding": "MP4 (audio)",
        "generate-video-storyboard": "storyboard",
        "video-transcription": "captions",
        "video-studio-transcoding": "studio",
    }.get(job["type"], str(job["type"]))
    resolution = job.get("resolution")
    if resolution is None or job["type"] in ("generate-video-storyboard", "video-transcription"):
        return kind
    return f"{kind} {'audio' if resolution == 0 else f'{resolution}p'}"


class _SpeedColumn(ProgressColumn):
    """Seconds of video made per second of work (needs the source duration)."""

    def __init__(self, duration_s: float) -> None:
        super().__init__()
        self.duration_s = duration_s

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed
        if not elapsed or not task.completed or not self.duration_s or task.total is None:
            return Text("     ", style="dim")
        speed = (task.completed / task.total) * self.duration_s / elapsed
        return Text(f"{speed:4.1f}×", style="cyan")


class Display:
    """Fed with the video JSON on every poll."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._overall: TaskID | None = None
        self._last: dict[str, tuple[str, int]] = {}

    def __enter__(self) -> Display:
        return self

    def __exit__(self, *_: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, video: dict[str, Any]) -> None:
        jobs = video["jobs"].get("list", [])
        if self.live:
            self._bars(video, jobs)
        else:
            self._lines(jobs)

    def _bars(self, video: dict[str, Any], jobs: list[dict[str, Any]]) -> None:
        if self._progress is None:
            duration = float((video.get("source") or {}).get("durationS") or 0)
            self._progress = Progress(
                TextColumn("{task.description:<16}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                _SpeedColumn(duration),
                TimeRemainingColumn(),
                TextColumn("{task.fields[state]}", style="dim"),
                console=self.console,
            )
            self._progress.start()
            self._overall = self._progress.add_task("overall", total=100 * max(len(jobs), 1), state="")
        progress = self._progress
        total_done = 0.0
        for job in jobs:
            done = _percent(job)
            total_done += done
            task = self._tasks.get(job["uuid"])
            if task is None:
                # Timing (speed, ETA) starts when the job does, not while it waits for its parent.
                task = progress.add_task(job_label(job), total=100, state="", start=False)
                self._tasks[job["uuid"]] = task
            label = job["state"]["label"]
            if label in ("Processing", "Completing") or label in _FINAL:
                progress.start_task(task)
            if label in _FINAL:
                progress.stop_task(task)
            progress.update(task, completed=done, state=label)
        assert self._overall is not None
        progress.update(
            self._overall, completed=total_done, total=100 * max(len(jobs), 1), state=video["state"]
        )
        if video["state"] != "processing":
            progress.stop_task(self._overall)

    def _lines(self, jobs: list[dict[str, Any]]) -> None:
        for job in jobs:
            state = job["state"]["label"]
            done = int(_percent(job))
            previous = self._last.get(job["uuid"])
            if previous is not None and previous[0] == state and done < previous[1] + 25:
                continue
            self._last[job["uuid"]] = (state, done)
            line = f"{time.strftime('%H:%M:%S')} {job_label(job):<16} {state}"
            if state == "Processing":
                line += f" {done}%"
            if job.get("error") and state in _FINAL:
                line += f": {job['error']}"
            print(line, file=sys.stderr, flush=True)


def _percent(job: dict[str, Any]) -> float:
    if job["state"]["label"] in _FINAL:
        return 100.0
    return float(job.get("progress") or 0)
