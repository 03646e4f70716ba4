"""Running one ffmpeg process so that it can never hang a job, leak a process or block on a pipe.

`run_ffmpeg` starts ffmpeg in its own session (so its whole process group can be killed at once), with an
asyncio subprocess *protocol*: the event loop hands us every chunk of stdout and stderr as it arrives, so both
pipes are always drained without reader tasks, and ffmpeg can never block on a full pipe.

* stdout carries `-progress pipe:1` blocks, parsed as they come and passed to `on_progress`;
* stderr is kept as a tail of the last `STDERR_TAIL_LINES` lines for the error message;
* a watchdog kills the process group when nothing advances for `stall_timeout_s` seconds, and when the run
  exceeds `max_duration_s`. "Advancing" means the output time or frame count grew, or (on Linux) the process
  read more input bytes (`/proc/<pid>/io`): ffmpeg reports nothing until every output has started, and the
  storyboard's only frame is written at the very end of a decode that can take minutes. A SIGSTOPped ffmpeg
  advances in no way and is killed like a hung one (SIGKILL works on stopped processes);
* whatever ends the run (success, failure, stall, timeout, cancellation of the awaiting task, an exception
  from `on_progress`), the `finally` block SIGKILLs the process group if the leader still runs and awaits its
  exit, so no process and no zombie outlives the call.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import dataclasses
import functools
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tuberunner.media.errors import FfmpegFailed, FfmpegStalled, FfmpegTimedOut, FfmpegUnavailable
from tuberunner.media.live import redact_urls
from tuberunner.media.progress import Progress, ProgressParser, percent

logger = logging.getLogger(__name__)

STDERR_TAIL_LINES = 50
# How long to wait for the kernel to deliver SIGKILL and asyncio to reap the child. Only a process stuck in
# uninterruptible sleep (a dead NFS mount) can take longer; we then stop waiting and say so in the log.
_REAP_TIMEOUT_S = 5.0
# How long to wait, after ffmpeg exited, for the last bytes of its pipes (they are normally already there).
_PIPE_DRAIN_TIMEOUT_S = 2.0
# Longest pause between two watchdog checks.
_MAX_CHECK_INTERVAL_S = 1.0


_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _child_setup(nice: int, parent_pid: int) -> None:
    """Runs in the child between fork and exec.

    ffmpeg sits in a session of its own (so a cancel can kill its whole group), which also puts it out of
    reach of anything that kills the runner's group: the kernel kills it when its parent dies, even by
    SIGKILL, so a killed runner never leaves a transcode running. Every ffmpeg thread inherits the niceness.
    """
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before the request took effect
            os._exit(1)
    if nice:
        os.nice(nice)


async def run_ffmpeg(
    ffmpeg: Path,
    args: Sequence[str],
    *,
    duration_s: float | None,
    on_progress: Callable[[Progress], None] | None = None,
    stall_timeout_s: float = 60,
    max_duration_s: float | None = None,
    nice: int = 0,
    cwd: Path | None = None,
    on_start: Callable[[int], None] | None = None,
) -> None:
    """Run `ffmpeg args…` to completion; raise if it does not produce its output.

    `duration_s` is the duration of the main input; it turns `out_time` into `Progress.percent`. Commands
    built by `commands.py` already ask for `-progress pipe:1 -nostats`; other argument lists get them added.
    `on_progress` is called on the event loop for each progress block (some commands, like the storyboard,
    report nothing until the end: liveness is the watchdog's business, not the callback's). `nice` (0-19) is
    applied in the child before ffmpeg starts. `on_start` receives the pid, which is also the process group.

    Raises `FfmpegFailed` (non-zero exit, with the stderr tail), `FfmpegStalled`, `FfmpegTimedOut`,
    `FfmpegUnavailable` (the binary cannot be started), or whatever `on_progress` raised.
    """
    if nice < 0:
        raise ValueError(f"nice must be 0 or more (lowering priority only), got {nice}")
    if stall_timeout_s <= 0:
        raise ValueError(f"stall_timeout_s must be positive, got {stall_timeout_s}")
    argv = [os.fspath(ffmpeg), *_with_progress_reporting(args)]
    loop = asyncio.get_running_loop()
    watchdog = _Watchdog(started_at=loop.time())

    def on_block(block: Progress) -> None:
        watchdog.saw_progress(block, loop.time())
        if on_progress is not None:
            on_progress(dataclasses.replace(block, percent=percent(block, duration_s)))

    try:
        transport, protocol = await loop.subprocess_exec(
            lambda: _FfmpegProtocol(loop, on_block),
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            cwd=cwd,
            preexec_fn=functools.partial(_child_setup, nice, os.getpid()),
        )
    except (FileNotFoundError, PermissionError) as exc:
        raise FfmpegUnavailable(f"cannot start ffmpeg at {ffmpeg}: {exc.strerror}") from exc

    pid = transport.get_pid()
    # A live's input URL carries its pull secret: never in a log.
    logger.debug("ffmpeg started (pid %d): %s", pid, redact_urls(" ".join(argv)))
    try:
        if on_start is not None:
            on_start(pid)
        await _watch(loop, protocol, watchdog, pid, stall_timeout_s, max_duration_s)
        # Exited: collect the last stderr lines before judging the exit code.
        await asyncio.wait((protocol.pipes_closed,), timeout=_PIPE_DRAIN_TIMEOUT_S)
        returncode = transport.get_returncode()
        if returncode != 0:
            raise FfmpegFailed(returncode if returncode is not None else -1, protocol.stderr_tail())
    finally:
        await _kill_and_reap(transport, protocol, pid)


def _with_progress_reporting(args: Sequence[str]) -> list[str]:
    # The stall watchdog and progress reports depend on it; ffmpeg's stats on stderr would only add noise.
    if "-progress" in args:
        return list(args)
    return ["-progress", "pipe:1", "-nostats", *args]


@dataclasses.dataclass(slots=True)
class _Watchdog:
    """When did ffmpeg last show any sign of moving forward?"""

    started_at: float
    last_advance_at: float = 0.0
    out_time_s: float | None = None
    frame: int | None = None
    bytes_read: int | None = None

    def __post_init__(self) -> None:
        self.last_advance_at = self.started_at

    def saw_progress(self, block: Progress, now: float) -> None:
        advanced = block.ended
        if _grew(self.out_time_s, block.out_time_s):
            self.out_time_s = block.out_time_s
            advanced = True
        if _grew(self.frame, block.frame):
            self.frame = block.frame
            advanced = True
        if advanced:
            self.last_advance_at = now

    def saw_bytes_read(self, bytes_read: int | None, now: float) -> None:
        if bytes_read is not None and _grew(self.bytes_read, bytes_read):
            self.bytes_read = bytes_read
            self.last_advance_at = now

    def describe_position(self) -> str:
        if self.out_time_s is None:
            return "before any output"
        return f"at {self.out_time_s:.1f} s of output"


def _grew(previous: float | None, current: float | None) -> bool:
    if current is None:
        return False
    return previous is None or current > previous


async def _watch(
    loop: asyncio.AbstractEventLoop,
    protocol: _FfmpegProtocol,
    watchdog: _Watchdog,
    pid: int,
    stall_timeout_s: float,
    max_duration_s: float | None,
) -> None:
    """Return when ffmpeg exits; raise when it stalls, overruns, or `on_progress` failed."""
    check_interval_s = min(_MAX_CHECK_INTERVAL_S, stall_timeout_s / 4)
    while True:
        now = loop.time()
        wake_at = min(now + check_interval_s, watchdog.last_advance_at + stall_timeout_s)
        if max_duration_s is not None:
            wake_at = min(wake_at, watchdog.started_at + max_duration_s)
        await asyncio.wait(
            (protocol.exited, protocol.callback_failed),
            timeout=max(0.0, wake_at - now),
            return_when=asyncio.FIRST_COMPLETED,
        )
        if protocol.callback_failed.done():
            raise protocol.callback_failed.result()
        if protocol.exited.done():
            return
        now = loop.time()
        if max_duration_s is not None and now - watchdog.started_at >= max_duration_s:
            raise FfmpegTimedOut(max_duration_s)
        watchdog.saw_bytes_read(_bytes_read(pid), now)
        stalled_for_s = now - watchdog.last_advance_at
        if stalled_for_s >= stall_timeout_s:
            raise FfmpegStalled(stalled_for_s, watchdog.describe_position())


def _bytes_read(pid: int) -> int | None:
    """Bytes the process has read so far (Linux `/proc/<pid>/io` rchar), None where unavailable."""
    try:
        with open(f"/proc/{pid}/io", encoding="ascii") as io_stats:
            for line in io_stats:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


async def _kill_and_reap(transport: asyncio.SubprocessTransport, protocol: _FfmpegProtocol, pid: int) -> None:
    """Kill the process group unless ffmpeg already exited, and wait until the child is reaped.

    A second cancellation while we wait is held back until the child is gone, then re-raised.
    """
    if not protocol.exited.done():
        # The pid cannot have been reused: the leader is not reaped yet, so it still owns its group id.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    cancelled_again = False
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + _REAP_TIMEOUT_S
    while not protocol.exited.done():
        remaining = give_up_at - loop.time()
        if remaining <= 0:
            logger.warning(
                "ffmpeg (pid %d) still there %.0f s after SIGKILL; left to the OS", pid, _REAP_TIMEOUT_S
            )
            break
        try:
            await asyncio.wait((protocol.exited,), timeout=remaining)
        except asyncio.CancelledError:
            cancelled_again = True
    transport.close()
    if cancelled_again:
        raise asyncio.CancelledError


class _LineTail:
    """The last `size` lines of a byte stream that arrives in arbitrary chunks."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._lines: collections.deque[str] = collections.deque(maxlen=size)
        self._partial = ""

    def feed(self, chunk: bytes) -> None:
        # ffmpeg ends status lines with \r; treat it as a line end too.
        text = self._partial + chunk.decode("utf-8", errors="replace").replace("\r", "\n")
        *complete, self._partial = text.split("\n")
        self._lines.extend(line for line in complete if line.strip())

    def text(self) -> str:
        lines = list(self._lines)
        if self._partial.strip():
            lines.append(self._partial)
        return "\n".join(lines[-self._size :])


class _FfmpegProtocol(asyncio.SubprocessProtocol):
    """Receives ffmpeg's output and exit from the event loop; holds no task of its own."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_block: Callable[[Progress], None]) -> None:
        self._on_block = on_block
        self._parser = ProgressParser()
        self._stderr = _LineTail(STDERR_TAIL_LINES)
        self.exited: asyncio.Future[None] = loop.create_future()
        self.pipes_closed: asyncio.Future[None] = loop.create_future()
        # Set when `on_block` raised: the run must stop and surface that error, not lose it in the loop's log.
        self.callback_failed: asyncio.Future[Exception] = loop.create_future()

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        chunk = data.encode() if isinstance(data, str) else data
        if fd == 2:
            self._stderr.feed(chunk)
            return
        if fd != 1 or self.callback_failed.done():
            return
        try:
            for block in self._parser.feed(chunk):
                self._on_block(block)
        except Exception as exc:  # the caller's callback: hand it to the awaiting coroutine
            self.callback_failed.set_result(exc)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        # Called once the process has exited *and* every pipe is closed.
        if not self.pipes_closed.done():
            self.pipes_closed.set_result(None)

    def stderr_tail(self) -> str:
        return self._stderr.text()
