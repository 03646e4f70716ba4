from __future__ import annotations

import pytest

from tuberunner.media.progress import Progress, ProgressParser, parse_progress, percent

# Captured from `ffmpeg -progress pipe:1` (ffmpeg 9), first block before any output time, last one the end.
CAPTURED = """\
frame=0
fps=0.00
stream_0_0_q=0.0
bitrate=N/A
total_size=48
out_time_us=N/A
out_time_ms=N/A
out_time=N/A
dup_frames=0
drop_frames=0
speed=N/A
progress=continue
frame=230
fps=114.85
stream_0_0_q=28.0
bitrate= 120.3kbits/s
total_size=138342
out_time_us=9200000
out_time_ms=9200000
out_time=00:00:09.200000
dup_frames=0
drop_frames=0
speed=4.59x
progress=continue
frame=250
fps=113.20
stream_0_0_q=-1.0
bitrate= 122.1kbits/s
total_size=152611
out_time_us=10000000
out_time_ms=10000000
out_time=00:00:10.000000
dup_frames=0
drop_frames=0
speed=4.53x
progress=end
"""


def test_parses_every_block_of_a_captured_run() -> None:
    blocks = parse_progress(CAPTURED)

    assert blocks == [
        Progress(out_time_s=None, speed=None, frame=0, fps=0.0, ended=False),
        Progress(out_time_s=9.2, speed=4.59, frame=230, fps=114.85, ended=False),
        Progress(out_time_s=10.0, speed=4.53, frame=250, fps=113.2, ended=True),
    ]


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_blocks_split_across_chunks_are_reassembled(chunk_size: int) -> None:
    parser = ProgressParser()
    data = CAPTURED.encode()

    blocks = [
        block for i in range(0, len(data), chunk_size) for block in parser.feed(data[i : i + chunk_size])
    ]

    assert blocks == parse_progress(CAPTURED)


def test_an_incomplete_block_is_held_back() -> None:
    parser = ProgressParser()

    assert parser.feed("frame=3\nout_time_us=120000\n") == []
    assert parser.feed("progress=contin") == []
    assert parser.feed("ue\n") == [Progress(out_time_s=0.12, speed=None, frame=3, fps=None, ended=False)]


def test_out_time_falls_back_to_the_clock_form_including_negative_starts() -> None:
    (block,) = parse_progress("out_time=-00:00:00.040000\nprogress=continue\n")
    assert block.out_time_s == pytest.approx(-0.04)
    (block,) = parse_progress("out_time=01:02:03.500000\nprogress=continue\n")
    assert block.out_time_s == pytest.approx(3723.5)


def _at(out_time_s: float | None, *, ended: bool = False) -> Progress:
    return Progress(out_time_s=out_time_s, speed=None, frame=None, fps=None, ended=ended)


@pytest.mark.parametrize(
    ("progress", "duration_s", "expected"),
    [
        (_at(5.0), 10.0, 50.0),
        (_at(-0.04), 10.0, 0.0),
        (_at(10.3), 10.0, 100.0),
        (_at(None), 10.0, None),
        (_at(5.0), None, None),
        (_at(5.0), 0.0, None),
        (_at(None, ended=True), None, 100.0),
    ],
)
def test_percent_is_clamped_and_unknown_when_it_cannot_be_known(
    progress: Progress, duration_s: float | None, expected: float | None
) -> None:
    assert percent(progress, duration_s) == expected
