"""Finding ffmpeg and checking that it can do what the default profile needs.

Supported: ffmpeg 5.1 (Debian 12's, the oldest release the suite runs on) and later; `check_ffmpeg` refuses
an older release by its version number, so a runner, a coordinator or a one-shot run stops at start-up with
the reason rather than run commands never checked on it. A build whose version is no release number (a git
snapshot: "N-113000-g…") cannot be placed and is accepted.

Order of discovery: an explicitly configured path, then `FFMPEG_PATH` (the variable fluent-ffmpeg and the
community NVENC wrappers use), then `ffmpeg` on `PATH`, then the static build inside the `imageio-ffmpeg`
wheel, so that `pip install` alone gives a working runner. An explicit setting that points nowhere is an
error, never a silent fall-through: running a different ffmpeg than the one configured would hide a mistake.

There is no ffprobe here: probing uses PyAV (see `probe.py`).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg

from tuberunner.media.errors import FfmpegUnavailable

FFMPEG_PATH_ENV = "FFMPEG_PATH"

# Encoders the default PeerTube profile cannot do without: video is libx264 only; audio is libfdk_aac when
# present, otherwise ffmpeg's native aac.
REQUIRED_VIDEO_ENCODER = "libx264"
AUDIO_ENCODERS = ("libfdk_aac", "aac")
MINIMUM_RELEASE = (5, 1)
# Version words: "5.1.9-0+deb12u1" (Debian), "n9.0.2-17-g2a571b6068-20260930" (static builds), "7.0.2-static".
_RELEASE_PATTERN = re.compile(r"n?(\d+)\.(\d+)")


@dataclass(frozen=True, slots=True)
class FfmpegCapabilities:
    """What `check_ffmpeg` learnt about one ffmpeg binary."""

    version: str
    release: tuple[int, int] | None
    """(major, minor) read from `version`; None for a build that carries no release number."""
    encoders: frozenset[str]
    has_libfdk_aac: bool


def find_ffmpeg(configured: str | None = None) -> Path:
    """Locate the ffmpeg binary to use (see the module docstring for the order).

    `configured` may be a path or a bare command name looked up on PATH. Raises `FfmpegUnavailable` when
    the configured or `FFMPEG_PATH` value does not name an executable, or when nothing is found at all.
    """
    if configured:
        return _executable(configured, "configured ffmpeg path")
    from_env = os.environ.get(FFMPEG_PATH_ENV)
    if from_env:
        return _executable(from_env, FFMPEG_PATH_ENV)

    on_path = shutil.which("ffmpeg")
    if on_path is not None:
        return Path(on_path)

    try:
        bundled: str = imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError as exc:
        raise FfmpegUnavailable(
            f"no ffmpeg found: set {FFMPEG_PATH_ENV}, put ffmpeg on PATH or install imageio-ffmpeg ({exc})"
        ) from exc
    return Path(bundled)


def _executable(value: str, origin: str) -> Path:
    # A bare name ("ffmpeg", "ffmpeg-nvenc") means "look it up on PATH", like a shell would.
    if os.sep not in value and (os.altsep is None or os.altsep not in value):
        found = shutil.which(value)
        if found is None:
            raise FfmpegUnavailable(f"{origin} {value!r} is not a command on PATH")
        return Path(found)
    path = Path(value).expanduser()
    if not path.is_file():
        raise FfmpegUnavailable(f"{origin} {str(path)!r} does not exist or is not a file")
    if not os.access(path, os.X_OK):
        raise FfmpegUnavailable(f"{origin} {str(path)!r} is not executable")
    return path


async def check_ffmpeg(path: Path, *, timeout_s: float = 10.0) -> FfmpegCapabilities:
    """Run `ffmpeg -version` and `ffmpeg -encoders`: check the release and the encoders the profile needs.

    Raises `FfmpegUnavailable` with the reason when the binary cannot run, does not answer within
    `timeout_s`, is older than `MINIMUM_RELEASE`, or lacks libx264 or an AAC encoder.
    """
    # Both questions at once (start-up waits for them); the answers are read in order, so a binary that
    # cannot run or is too old is reported as such whatever `-encoders` said.
    version_answer, encoders_answer = await asyncio.gather(
        _run_for_output(path, ["-hide_banner", "-version"], timeout_s),
        _run_for_output(path, ["-hide_banner", "-encoders"], timeout_s),
        return_exceptions=True,
    )
    version_text = _answer(version_answer)
    first_line = version_text.strip().splitlines()[0] if version_text.strip() else ""
    if not first_line.startswith("ffmpeg version"):
        raise FfmpegUnavailable(f"{path} does not look like ffmpeg: -version printed {first_line[:80]!r}")
    words = first_line.split()
    version = words[2] if len(words) > 2 else "unknown"
    release = parse_release(version)
    if release is not None and release < MINIMUM_RELEASE:
        raise FfmpegUnavailable(
            f"ffmpeg at {path} is version {version}, older than {_dotted(MINIMUM_RELEASE)}, the oldest that "
            f"Tuberunner supports: install a newer one or set {FFMPEG_PATH_ENV} (the runner's [ffmpeg] path "
            f"too) to one{_bundled_hint()}"
        )

    encoders = parse_encoders(_answer(encoders_answer))
    if REQUIRED_VIDEO_ENCODER not in encoders:
        raise FfmpegUnavailable(
            f"ffmpeg at {path} has no {REQUIRED_VIDEO_ENCODER} encoder (needed for video)"
        )
    if not any(name in encoders for name in AUDIO_ENCODERS):
        raise FfmpegUnavailable(f"ffmpeg at {path} has neither the aac nor the libfdk_aac encoder")
    return FfmpegCapabilities(
        version=version, release=release, encoders=encoders, has_libfdk_aac="libfdk_aac" in encoders
    )


def _answer(answer: str | BaseException) -> str:
    if isinstance(answer, BaseException):
        raise answer
    return answer


def _dotted(release: tuple[int, int]) -> str:
    return ".".join(map(str, release))


def _bundled_hint() -> str:
    try:
        return f", such as the one of the imageio-ffmpeg package: {imageio_ffmpeg.get_ffmpeg_exe()}"
    except RuntimeError:
        return ""


def parse_release(version: str) -> tuple[int, int] | None:
    """(major, minor) of an `ffmpeg -version` version word, None when it names no release."""
    match = _RELEASE_PATTERN.match(version)
    return (int(match[1]), int(match[2])) if match else None


def parse_encoders(text: str) -> frozenset[str]:
    """Encoder names from `ffmpeg -encoders` output (the lines after the `------` separator)."""
    names: set[str] = set()
    listing = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("------"):
            listing = True
            continue
        parts = stripped.split()
        # Each line is "<6 capability flags> <name> <description…>", e.g. "V....D libx264  libx264 H.264 …".
        if listing and len(parts) >= 2 and len(parts[0]) == 6:
            names.add(parts[1])
    return frozenset(names)


async def _run_for_output(path: Path, args: list[str], timeout_s: float) -> str:
    try:
        process = await asyncio.create_subprocess_exec(
            str(path),
            *args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        raise FfmpegUnavailable(f"cannot run ffmpeg at {path}: {exc.strerror or exc}") from exc
    try:
        async with asyncio.timeout(timeout_s):
            stdout, stderr = await process.communicate()
    except TimeoutError as exc:
        raise FfmpegUnavailable(f"ffmpeg at {path} did not answer {args[-1]} within {timeout_s:g} s") from exc
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    if process.returncode != 0:
        last_lines = stderr.decode(errors="replace").strip().splitlines()[-1:]
        reason = last_lines[0] if last_lines else f"exit code {process.returncode}"
        raise FfmpegUnavailable(f"ffmpeg at {path} failed on {args[-1]}: {reason}")
    return stdout.decode(errors="replace")
