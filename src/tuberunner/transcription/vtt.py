"""WebVTT: writing the cues an engine decoded, and reading a file back (checks and tests).

Engines hand out segments whose times can overlap, go backwards or end before they start (a model that
hallucinates timestamps); the writer makes cues a player accepts: ordered by start time, each one ending
after it starts, inside the media's duration, text escaped (`&`, `<`, `>`: so no `-->` either) and never a
blank line inside a cue.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Cue", "VttError", "format_timestamp", "parse_vtt", "write_vtt"]

# Shortest cue written: a segment that ends where it starts still shows for a moment.
_MIN_CUE_S = 0.01
_STAMP = r"(?:\d{2,}:)?[0-5]\d:[0-5]\d\.\d{3}"
_TIMING = re.compile(rf"^(?P<start>{_STAMP})[ \t]+-->[ \t]+(?P<end>{_STAMP})(?:[ \t]+.*)?$")


class VttError(ValueError):
    """The text is not well-formed WebVTT."""


@dataclass(frozen=True)
class Cue:
    start_s: float
    end_s: float
    text: str


def format_timestamp(seconds: float) -> str:
    """`HH:MM:SS.mmm`."""
    millis = round(max(seconds, 0.0) * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}.{millis:03d}"


def _escape(text: str) -> str:
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    lines = [line.strip() for line in text.replace("\r", "\n").split("\n")]
    return "\n".join(line for line in lines if line)


def write_vtt(segments: Iterable[Cue], *, duration_s: float | None = None) -> str:
    """The WebVTT document of `segments` (in decoding order), normalised as the module docstring says."""
    lines = ["WEBVTT", ""]
    previous_start = 0.0
    for segment in segments:
        text = _escape(segment.text)
        if not text:
            continue
        start = max(segment.start_s, previous_start, 0.0)
        end = segment.end_s
        if duration_s is not None and duration_s > 0:
            start = min(start, max(duration_s - _MIN_CUE_S, 0.0))
            end = min(end, duration_s)
        end = max(end, start + _MIN_CUE_S)
        # Rounded as written, so that the next cue compares with what a reader sees.
        start, end = round(start, 3), round(end, 3)
        previous_start = start
        lines += [f"{format_timestamp(start)} --> {format_timestamp(end)}", text, ""]
    return "\n".join(lines) + "\n"


def _seconds(stamp: str) -> float:
    parts = stamp.split(":")
    hours = int(parts[0]) if len(parts) == 3 else 0
    minutes, seconds = int(parts[-2]), float(parts[-1])
    return hours * 3600 + minutes * 60 + seconds


def parse_vtt(text: str, *, strict: bool = True) -> list[Cue]:
    """The cues of a WebVTT document; VttError when it is not one and, when `strict`, when a cue does not
    end after it starts or starts before the previous one (`write_vtt` puts such cues right)."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    blocks = text.split("\n\n")
    header = blocks[0].split("\n")[0]
    if not (header == "WEBVTT" or header.startswith(("WEBVTT ", "WEBVTT\t"))):
        raise VttError("no WEBVTT header")
    cues: list[Cue] = []
    for block in blocks[1:]:
        lines = [line for line in block.split("\n") if line != ""] if block.strip() else []
        if not lines or lines[0].startswith(("NOTE", "STYLE", "REGION")):
            continue
        timing_index = 0 if "-->" in lines[0] else 1
        if timing_index >= len(lines):
            raise VttError(f"a cue has no timing line: {block!r}")
        match = _TIMING.match(lines[timing_index])
        if match is None:
            raise VttError(f"bad cue timing {lines[timing_index]!r}")
        start, end = _seconds(match["start"]), _seconds(match["end"])
        if strict and end <= start:
            raise VttError(f"cue ends at {match['end']}, not after its start {match['start']}")
        if strict and cues and start < cues[-1].start_s:
            raise VttError(f"cue at {match['start']} starts before the previous one")
        cues.append(Cue(start, end, "\n".join(lines[timing_index + 1 :])))
    return cues
