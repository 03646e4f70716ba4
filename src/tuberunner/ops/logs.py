"""The one logging set-up of every entry point (`tuberunner ...`, both daemons, the one-shot mode).

    configure_logging(level, fmt)   one handler on the root logger, on stderr:
        text   human-readable lines (the level coloured when stderr is a terminal)
        json   one JSON object per line: time, level, logger, message, context fields, exception

Context fields say what a line is about without repeating it in every message: `bind(job_id=...,
instance=...)` stores them in a context variable of the current task, and every task created from it
afterwards inherits them (asyncio copies the context), so a job's heartbeat, downloads, ffmpeg runs and
fate report all log with the job id and its instance. `bound(...)` does the same for a block.

Tokens never reach a log: every formatted line (message, arguments, traceback) goes through `redact`,
which replaces what follows the prefixes of runner (`ptrt-`), job (`ptrjt-`), registration (`ptrrt-`) and
admin (`tra-`) tokens.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import IO, Final

from tuberunner.protocol.jobs import JOB_TOKEN_PREFIX, REGISTRATION_TOKEN_PREFIX, RUNNER_TOKEN_PREFIX

__all__ = [
    "ADMIN_TOKEN_PREFIX",
    "CONTEXT_FIELDS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "JsonFormatter",
    "TextFormatter",
    "bind",
    "bound",
    "configure_logging",
    "context_fields",
    "redact",
]

LOG_FORMATS: Final = ("text", "json")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
# The coordinator's admin tokens (`coordinator.admin_auth` generates them; a test checks both agree).
ADMIN_TOKEN_PREFIX: Final = "tra-"
# Fields a line may carry, in the order text lines show them.
CONTEXT_FIELDS: Final = ("runner", "instance", "job_id", "job_type")

_PREFIXES = (REGISTRATION_TOKEN_PREFIX, JOB_TOKEN_PREFIX, RUNNER_TOKEN_PREFIX, ADMIN_TOKEN_PREFIX)
# A prefix not glued to a word before it ("ultra-fast" is no token), then the secret part.
_TOKEN = re.compile(r"(?<![A-Za-z0-9_])(" + "|".join(re.escape(p) for p in _PREFIXES) + r")[A-Za-z0-9_-]{8,}")
_REDACTED = "[redacted]"

_EMPTY: Mapping[str, str] = MappingProxyType({})
_context: ContextVar[Mapping[str, str]] = ContextVar("tuberunner_log_context", default=_EMPTY)
# Libraries that log a line per request or migration step: shown only when debugging.
_NOISY = ("alembic", "httpx", "httpcore")


def redact(text: str) -> str:
    """`text` with the secret part of every token replaced (`ptrt-[redacted]`)."""
    return _TOKEN.sub(lambda match: match.group(1) + _REDACTED, text)


def bind(**fields: str | None) -> None:
    """Add fields to the log context of the current task and of the tasks it creates from now on
    (None removes a field)."""
    _context.set(_merged(fields))


@contextlib.contextmanager
def bound(**fields: str | None) -> Iterator[None]:
    """Add fields to the log context for the lines logged inside the block."""
    token = _context.set(_merged(fields))
    try:
        yield
    finally:
        _context.reset(token)


def context_fields() -> Mapping[str, str]:
    return _context.get()


def _merged(fields: Mapping[str, str | None]) -> Mapping[str, str]:
    merged = dict(_context.get())
    for name, value in fields.items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = value
    return MappingProxyType(merged)


def _fields_of(record: logging.LogRecord) -> dict[str, str]:
    """The context of the task that logged, plus fields given with `extra={...}`."""
    fields = dict(_context.get())
    for name in CONTEXT_FIELDS:
        value = record.__dict__.get(name)
        if value is not None:
            fields[name] = str(value)
    return fields


class _ContextFilter(logging.Filter):
    """Captures the context when the record is made (a handler may format it later, elsewhere)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.tuberunner_fields = _fields_of(record)
        return True


def _recorded_fields(record: logging.LogRecord) -> dict[str, str]:
    fields = record.__dict__.get("tuberunner_fields")
    return dict(fields) if isinstance(fields, dict) else _fields_of(record)


_COLOURS = {
    logging.DEBUG: "\x1b[2m",
    logging.WARNING: "\x1b[33m",
    logging.ERROR: "\x1b[31m",
    logging.CRITICAL: "\x1b[1;31m",
}
_RESET = "\x1b[0m"


class TextFormatter(logging.Formatter):
    """`2025-01-31 12:00:00,123 INFO    tuberunner.runner.supervisor: message [job_id=… instance=…]`"""

    def __init__(self, *, colour: bool = False) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self.colour = colour

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = _recorded_fields(record)
        if fields:
            ordered: list[str] = [name for name in CONTEXT_FIELDS if name in fields]
            ordered += sorted(set(fields) - set(ordered))
            line += " [" + " ".join(f"{name}={fields[name]}" for name in ordered) + "]"
        colour = _COLOURS.get(record.levelno) if self.colour else None
        return f"{colour}{line}{_RESET}" if colour else line

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line; newlines inside a message (an ffmpeg stderr tail) stay escaped in it."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_recorded_fields(record),
        }
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            body["exception"] = record.exc_text
        if record.stack_info:
            body["stack"] = self.formatStack(record.stack_info)
        return redact(json.dumps(body, ensure_ascii=False, default=str))


class _OurHandler(logging.StreamHandler[IO[str]]):
    """Marks the handler `configure_logging` installs, so that calling it again replaces only it (a test
    runner's capture handlers stay)."""


def configure_logging(
    level: str = "info", fmt: str = "text", stream: IO[str] | None = None
) -> logging.Handler:
    """Send every log line to `stream` (stderr) as `fmt` at `level` and above; idempotent. Returns the
    handler (replaced by the next call)."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    stream = stream or sys.stderr
    handler = _OurHandler(stream)
    handler.addFilter(_ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        colour = _is_terminal(stream) and "NO_COLOR" not in os.environ
        handler.setFormatter(TextFormatter(colour=colour))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.NOTSET if numeric <= logging.DEBUG else logging.WARNING)
    # Its debug lines are every statement with its parameters (tokens): never wanted.
    logging.getLogger("aiosqlite").setLevel(logging.INFO)
    return handler


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
