"""run_ffmpeg against real ffmpeg processes: failures, stalls, limits and, above all, cancellation."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tuberunner.media import process as process_module
from tuberunner.media.commands import EncodeSettings, storyboard_command
from tuberunner.media.errors import FfmpegFailed, FfmpegStalled, FfmpegTimedOut, FfmpegUnavailable
from tuberunner.media.process import STDERR_TAIL_LINES, _LineTail, run_ffmpeg
from tuberunner.media.profiles import StoryboardSprites
from tuberunner.media.progress import Progress

# An endless encode paced at real time (-re): progress every half second, little CPU.
ENDLESS = [
    "-hide_banner",
    "-nostdin",
    "-re",
    "-f",
    "lavfi",
    "-i",
    "testsrc2=size=160x90:rate=25",
    "-f",
    "null",
    "-",
]


def _gone(pid: int) -> bool:
    """True when neither the process nor its group exist (killed *and* reaped: no zombie)."""
    for send_signal in (os.kill, os.killpg):
        try:
            send_signal(pid, 0)
        except ProcessLookupError:
            continue
        return False
    return True


class _Started:
    """Collects the pid and wakes the test at the first progress block: an event, not a sleep."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.progress: list[Progress] = []
        self.first_progress = asyncio.Event()

    def on_start(self, pid: int) -> None:
        self.pid = pid

    def on_progress(self, progress: Progress) -> None:
        self.progress.append(progress)
        self.first_progress.set()

    async def running(self, task: asyncio.Task[None]) -> int:
        waiter = asyncio.ensure_future(self.first_progress.wait())
        done, _ = await asyncio.wait({waiter, task}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        assert waiter in done, "ffmpeg never reported progress"
        assert self.pid is not None
        return self.pid


def _start(ffmpeg_path: Path, started: _Started, **kwargs: object) -> asyncio.Task[None]:
    return asyncio.create_task(
        run_ffmpeg(
            ffmpeg_path,
            ENDLESS,
            duration_s=None,
            on_start=started.on_start,
            on_progress=started.on_progress,
            **kwargs,  # type: ignore[arg-type]
        )
    )


async def test_successful_run_reports_progress_up_to_the_end(ffmpeg_path: Path, sample_clip: Path) -> None:
    progress: list[Progress] = []

    await run_ffmpeg(
        ffmpeg_path,
        ["-i", str(sample_clip), "-f", "null", "-"],
        duration_s=3.0,
        on_progress=progress.append,
    )

    assert progress, "no progress block was parsed"
    assert progress[-1].ended
    assert progress[-1].percent == 100.0
    assert progress[-1].out_time_s == pytest.approx(3.0, abs=0.1)


async def test_failure_carries_ffmpegs_reason(ffmpeg_path: Path, tmp_path: Path) -> None:
    with pytest.raises(FfmpegFailed) as caught:
        await run_ffmpeg(
            ffmpeg_path, ["-i", str(tmp_path / "missing.mp4"), "-f", "null", "-"], duration_s=None
        )

    assert caught.value.exit_code != 0
    assert "No such file or directory" in str(caught.value)
    assert "missing.mp4" in caught.value.stderr_tail


async def test_the_logged_command_line_hides_the_path_of_rtmp_urls(
    ffmpeg_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A live's input URL carries its stream key or pull secret: the debug line of the command hides it."""
    caplog.set_level(logging.DEBUG, logger=process_module.__name__)
    url = "rtmp://127.0.0.1:1/live/a-secret-stream-key"  # nothing listens: ffmpeg fails at once
    with pytest.raises(FfmpegFailed):
        await run_ffmpeg(ffmpeg_path, ["-nostdin", "-i", url, "-f", "null", "-"], duration_s=None)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ffmpeg started")]
    assert "-i rtmp://127.0.0.1:1/… -f null -" in line
    assert "a-secret-stream-key" not in line


async def test_missing_binary_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(FfmpegUnavailable, match="cannot start ffmpeg"):
        await run_ffmpeg(tmp_path / "no-ffmpeg", ["-version"], duration_s=None)


async def test_cancellation_kills_the_process_group_at_once(ffmpeg_path: Path) -> None:
    started = _Started()
    task = _start(ffmpeg_path, started)
    pid = await started.running(task)

    cancelled_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert time.monotonic() - cancelled_at < 1.0
    assert _gone(pid)


async def test_a_second_cancellation_while_reaping_still_reaps(
    ffmpeg_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    killed = asyncio.Event()
    real_killpg = os.killpg

    def killpg_and_tell(pid: int, sig: int) -> None:
        real_killpg(pid, sig)
        if sig == signal.SIGKILL:
            killed.set()

    monkeypatch.setattr(os, "killpg", killpg_and_tell)
    started = _Started()
    task = _start(ffmpeg_path, started)
    pid = await started.running(task)

    task.cancel()
    await killed.wait()  # the task now waits for the exit, in its finally block: cancel it there
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert _gone(pid)


async def test_stopped_ffmpeg_is_a_stall_and_is_killed(ffmpeg_path: Path) -> None:
    started = _Started()
    stall_timeout_s = 1.0
    task = _start(ffmpeg_path, started, stall_timeout_s=stall_timeout_s)
    pid = await started.running(task)

    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    with pytest.raises(FfmpegStalled) as caught:
        await task

    # Detected within the timeout plus one watchdog check (a quarter of the timeout here).
    assert time.monotonic() - stopped_at < stall_timeout_s * 1.25 + 0.5
    assert caught.value.stalled_for_s >= stall_timeout_s
    assert _gone(pid)


async def test_max_duration_kills_a_run_that_is_still_progressing(ffmpeg_path: Path) -> None:
    started = _Started()
    began = time.monotonic()
    task = _start(ffmpeg_path, started, max_duration_s=1.0)
    await started.running(task)

    with pytest.raises(FfmpegTimedOut) as caught:
        await task

    assert 1.0 <= time.monotonic() - began < 2.5
    assert caught.value.limit_s == 1.0
    assert started.pid is not None
    assert _gone(started.pid)


async def test_an_exception_from_on_progress_stops_the_run(ffmpeg_path: Path) -> None:
    pids: list[int] = []

    def explode(progress: Progress) -> None:
        raise RuntimeError("reporter is broken")

    with pytest.raises(RuntimeError, match="reporter is broken"):
        await run_ffmpeg(ffmpeg_path, ENDLESS, duration_s=None, on_progress=explode, on_start=pids.append)

    assert _gone(pids[0])


async def test_nice_is_applied_to_ffmpeg(ffmpeg_path: Path) -> None:
    started = _Started()
    task = _start(ffmpeg_path, started, nice=7)
    pid = await started.running(task)
    try:
        # Field 19 of /proc/<pid>/stat is the nice value (fields counted after the ")" of the command name).
        stat = Path(f"/proc/{pid}/stat").read_text()
        nice = int(stat.rsplit(")", 1)[1].split()[16])
        assert nice == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 7)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# Longer than one check interval plus the longest gap between two reads of `detailed_clip` at real speed
# (about 0.35 s), shorter than the silent phase of the slow storyboard (about 2.4 s).
SILENT_STALL_TIMEOUT_S = 1.2


def _slow_storyboard_args(clip: Path, tmp_path: Path) -> list[str]:
    # The storyboard writes its only frame at the end, so ffmpeg prints no progress at all until then.
    # Four sprites a second apart never fill the tile of a 3 s clip: the sheet is written at the end of the
    # input, which is read at real speed, so the silent phase lasts the whole clip.
    sprites = StoryboardSprites(width=96, height=54, columns=4, rows=1, duration_s=1)
    args = storyboard_command(clip, tmp_path / "sb.jpg", sprites, EncodeSettings())
    position = args.index("-i")
    return [*args[: position - 2], "-readrate", "1", *args[position - 2 :]]


async def test_reading_input_counts_as_progress(
    ffmpeg_path: Path, detailed_clip: Path, tmp_path: Path
) -> None:
    block_times: list[float] = []
    began = time.monotonic()

    await run_ffmpeg(
        ffmpeg_path,
        _slow_storyboard_args(detailed_clip, tmp_path),
        duration_s=3.0,
        stall_timeout_s=SILENT_STALL_TIMEOUT_S,
        on_progress=lambda block: block_times.append(time.monotonic()),
    )

    assert (tmp_path / "sb.jpg").stat().st_size > 0
    # It really was silent for longer than the stall timeout: the first progress block came with the sheet,
    # at the end (ffmpeg 5.1 writes a last "continue" block just before "end", later releases only "end").
    assert block_times, "ffmpeg reported no progress at all"
    assert block_times[0] - began > SILENT_STALL_TIMEOUT_S + 0.5


async def test_without_input_accounting_the_silent_storyboard_would_stall(
    ffmpeg_path: Path, detailed_clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The counter-proof of the test above: the /proc reading is what keeps that run alive.
    no_accounting: Callable[[int], int | None] = lambda pid: None  # noqa: E731
    monkeypatch.setattr(process_module, "_bytes_read", no_accounting)

    with pytest.raises(FfmpegStalled, match="before any output"):
        await run_ffmpeg(
            ffmpeg_path,
            _slow_storyboard_args(detailed_clip, tmp_path),
            duration_s=3.0,
            stall_timeout_s=SILENT_STALL_TIMEOUT_S,
        )


def test_stderr_tail_keeps_the_last_lines_across_chunks() -> None:
    tail = _LineTail(STDERR_TAIL_LINES)
    data = "".join(f"line {i}\n" for i in range(200)).encode() + b"partial"

    for start in range(0, len(data), 13):
        tail.feed(data[start : start + 13])

    lines = tail.text().splitlines()
    assert len(lines) == STDERR_TAIL_LINES
    assert lines[-2:] == ["line 199", "partial"]


def test_nice_must_not_be_negative(ffmpeg_path: Path) -> None:
    with pytest.raises(ValueError, match="nice"):
        asyncio.run(run_ffmpeg(ffmpeg_path, ["-version"], duration_s=None, nice=-1))
