"""What can go wrong in the media layer, as one small hierarchy.

```
MediaError                      base: every failure of ffmpeg discovery, probing or a run
├── FfmpegUnavailable           no usable ffmpeg (missing, not executable, lacks libx264/aac)
├── ProbeError                  the file is unreadable or not audio/video (message names the cause)
├── NoAudioStream               the input has no audio where the job needs it (transcription, audio merge)
├── NoVideoStream               the input has no picture but the job asks for a video resolution
└── FfmpegRunError              one ffmpeg run did not produce its output
    ├── FfmpegFailed            ffmpeg exited non-zero (or died of a signal); carries the stderr tail
    ├── FfmpegStalled           no progress for the stall timeout; the process group was killed
    └── FfmpegTimedOut          ran past the maximum duration; the process group was killed
```

Kind, in the sense of the runner's error classes: all of these are *job errors* (report the job as errored
with the message, never retry in a loop). `FfmpegUnavailable` is also a *runner* problem: no job can succeed
until ffmpeg is fixed, so the runner should stop accepting transcoding jobs. Messages are written to be shown
to an administrator as they are: they name the file or binary and the cause.
"""

from __future__ import annotations

import signal


class MediaError(Exception):
    """Base class of every error raised by `tuberunner.media`."""


class FfmpegUnavailable(MediaError):
    """ffmpeg cannot be found or run, or lacks an encoder the default profile needs."""


class ProbeError(MediaError):
    """A file could not be probed: unreadable, not a media file, no stream, or the probe itself died."""


class NoAudioStream(MediaError):
    """The input has no audio stream but the job needs one."""


class NoVideoStream(MediaError):
    """The input has no video stream but the job asks for a video output."""


class FfmpegRunError(MediaError):
    """An ffmpeg run ended without producing its output (base of the three outcomes below)."""


class FfmpegFailed(FfmpegRunError):
    """ffmpeg exited with a non-zero code, or was killed by a signal it did not get from us.

    `exit_code` is the process return code (negative: the signal number that killed it). `stderr_tail` is the
    last lines ffmpeg wrote to stderr, kept whole for logs; the message carries only the last meaningful ones.
    """

    def __init__(self, exit_code: int, stderr_tail: str) -> None:
        self.exit_code = exit_code
        self.stderr_tail = stderr_tail
        super().__init__(_failed_message(exit_code, stderr_tail))


class FfmpegStalled(FfmpegRunError):
    """ffmpeg made no progress for `stalled_for_s` seconds; its process group was killed."""

    def __init__(self, stalled_for_s: float, detail: str = "") -> None:
        self.stalled_for_s = stalled_for_s
        message = f"ffmpeg made no progress for {stalled_for_s:.0f} s and was killed"
        super().__init__(f"{message} ({detail})" if detail else message)


class FfmpegTimedOut(FfmpegRunError):
    """ffmpeg ran longer than the `limit_s` seconds allowed; its process group was killed."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        super().__init__(f"ffmpeg ran longer than the {limit_s:.0f} s limit and was killed")


# How many stderr lines the message of FfmpegFailed quotes: enough for ffmpeg's usual
# "[demuxer @ 0x…] reason / Error opening input / Error opening input files" chain.
_MESSAGE_LINES = 4

# ffmpeg's closing lines that repeat the failure without saying anything about its cause.
_UNINFORMATIVE_PREFIXES = ("Conversion failed!", "Exiting normally", "frame=", "size=")


def _failed_message(exit_code: int, stderr_tail: str) -> str:
    if exit_code < 0:
        head = f"ffmpeg was killed by {_signal_name(-exit_code)}"
    else:
        head = f"ffmpeg exited with code {exit_code}"
    lines = [
        line.strip()
        for line in stderr_tail.splitlines()
        if line.strip() and not line.strip().startswith(_UNINFORMATIVE_PREFIXES)
    ]
    if not lines:
        return head
    return f"{head}: " + " | ".join(lines[-_MESSAGE_LINES:])


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
