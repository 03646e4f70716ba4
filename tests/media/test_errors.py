from __future__ import annotations

import signal

import pytest

from tuberunner.media.errors import (
    FfmpegFailed,
    FfmpegRunError,
    FfmpegStalled,
    FfmpegTimedOut,
    FfmpegUnavailable,
    MediaError,
    NoAudioStream,
    NoVideoStream,
    ProbeError,
)


@pytest.mark.parametrize(
    "error",
    [
        FfmpegUnavailable("x"),
        ProbeError("x"),
        NoAudioStream("x"),
        NoVideoStream("x"),
        FfmpegFailed(1, ""),
        FfmpegStalled(60),
        FfmpegTimedOut(10),
    ],
)
def test_every_error_is_a_media_error(error: MediaError) -> None:
    assert isinstance(error, MediaError)


def test_run_outcomes_share_a_base() -> None:
    assert issubclass(FfmpegFailed, FfmpegRunError)
    assert issubclass(FfmpegStalled, FfmpegRunError)
    assert issubclass(FfmpegTimedOut, FfmpegRunError)
    assert not issubclass(ProbeError, FfmpegRunError)


def test_failed_message_quotes_the_last_meaningful_stderr_lines() -> None:
    tail = "\n".join(
        [
            "Input #0, lavfi, from 'testsrc':",
            "[in#0 @ 0x1] Error opening input: No such file or directory",
            "Error opening input file /nope.mp4.",
            "",
            "Error opening input files: No such file or directory",
            "Conversion failed!",
        ]
    )
    error = FfmpegFailed(254, tail)

    assert error.exit_code == 254
    assert error.stderr_tail == tail
    message = str(error)
    assert message.startswith("ffmpeg exited with code 254: ")
    assert "Error opening input files: No such file or directory" in message
    assert "Conversion failed!" not in message


def test_failed_message_names_the_signal() -> None:
    assert str(FfmpegFailed(-signal.SIGKILL, "")) == "ffmpeg was killed by SIGKILL"


def test_stall_and_timeout_messages_carry_their_numbers() -> None:
    assert "60 s" in str(FfmpegStalled(60.2, "at 12.0 s of output"))
    assert "at 12.0 s of output" in str(FfmpegStalled(60.2, "at 12.0 s of output"))
    assert FfmpegTimedOut(3600).limit_s == 3600
    assert "3600 s" in str(FfmpegTimedOut(3600))
