"""Parsing ffmpeg's `-progress pipe:1` output.

ffmpeg writes blocks of `key=value` lines, each closed by `progress=continue` (or `progress=end` for the last
one), about twice a second once every output has started:

```
frame=230
fps=114.85
out_time_us=9200000
out_time=00:00:09.200000
speed=4.59x
progress=continue
```

Values are "N/A" while unknown. `out_time_ms` is, despite its name, in microseconds too; `out_time_us` is
read first. Bytes arrive in arbitrary chunks, so `ProgressParser` keeps a partial line between feeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Progress:
    """One progress block. `percent` is filled in by `run_ffmpeg` from the duration it was given."""

    out_time_s: float | None
    speed: float | None
    frame: int | None
    fps: float | None
    ended: bool
    percent: float | None = None


def percent(progress: Progress, duration_s: float | None) -> float | None:
    """How far the output is, 0-100, or None when either side is unknown. A finished run is 100."""
    if progress.ended:
        return 100.0
    if progress.out_time_s is None or not duration_s or duration_s <= 0:
        return None
    return min(100.0, max(0.0, progress.out_time_s / duration_s * 100.0))


@dataclass(slots=True)
class ProgressParser:
    """Incremental parser: feed it chunks of ffmpeg's stdout, get the blocks they complete."""

    _partial_line: str = ""
    _block: dict[str, str] = field(default_factory=dict)

    def feed(self, chunk: bytes | str) -> list[Progress]:
        text = chunk.decode("utf-8", errors="replace") if isinstance(chunk, bytes) else chunk
        lines = (self._partial_line + text).split("\n")
        self._partial_line = lines.pop()
        completed: list[Progress] = []
        for raw_line in lines:
            key, sep, value = raw_line.strip().partition("=")
            if not sep:
                continue
            self._block[key.strip()] = value.strip()
            if key.strip() == "progress":
                completed.append(_progress_from_block(self._block))
                self._block = {}
        return completed


def parse_progress(text: str) -> list[Progress]:
    """Every complete block of a captured `-progress` output."""
    return ProgressParser().feed(text)


def _progress_from_block(block: dict[str, str]) -> Progress:
    return Progress(
        out_time_s=_out_time_s(block),
        speed=_float(block.get("speed", "").removesuffix("x")),
        frame=_int(block.get("frame", "")),
        fps=_float(block.get("fps", "")),
        ended=block.get("progress") == "end",
    )


def _out_time_s(block: dict[str, str]) -> float | None:
    for key in ("out_time_us", "out_time_ms"):
        microseconds = _int(block.get(key, ""))
        if microseconds is not None:
            return microseconds / 1_000_000
    return _clock_s(block.get("out_time", ""))


def _clock_s(value: str) -> float | None:
    # "HH:MM:SS.micro", possibly negative at the very start ("-00:00:00.040000").
    sign = -1.0 if value.startswith("-") else 1.0
    parts = value.lstrip("-").split(":")
    if len(parts) != 3:
        return None
    try:
        hours, minutes, seconds = int(parts[0]), int(parts[1]), float(parts[2])
    except ValueError:
        return None
    return sign * (hours * 3600 + minutes * 60 + seconds)


def _int(value: str) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None


def _float(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if number == number else None  # "nan" is no better than N/A
