"""The official runner's engines: `whisper-ctranslate2` and `openai-whisper` run as a child process.

Command lines as the official runner builds them (notes §3.7), plus what it does not expose (device,
compute type, threads, greedy decoding, a requested language). The child runs in a session of its own, so
its whole process group is killed when the job is cancelled, when it prints nothing for `stall_timeout_s`
(verbose mode prints each segment as `[00:01.000 --> 00:04.000] text`, which is also the progress) or when
it runs longer than `max_duration_s`; it never outlives the call. The VTT and the language (from the JSON
output) are read from the output folder under the input's base name. `ffmpeg` on the child's PATH is the
runner's own.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import re
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from tuberunner.transcription.engine import (
    Limits,
    Transcript,
    TranscriptionError,
    TranscriptionStalled,
    TranscriptionTimedOut,
)
from tuberunner.transcription.settings import CLI_ENGINES, TranscriptionSettings
from tuberunner.transcription.vtt import VttError, parse_vtt

__all__ = ["CliEngine", "cli_command"]

_SEGMENT = re.compile(r"^\[(?:(\d+):)?(\d+):(\d+(?:\.\d+)?) --> (?:(\d+):)?(\d+):(\d+(?:\.\d+)?)\]")
_TAIL_LINES = 40
_REAP_TIMEOUT_S = 5.0


def cli_command(
    settings: TranscriptionSettings, media: Path, output_dir: Path, language: str | None
) -> list[str]:
    binary = settings.engine_path or CLI_ENGINES[settings.engine]
    argv = [binary, str(media)]
    if settings.engine == "whisper-ctranslate2":
        if settings.model_path:
            argv += ["--model_directory", settings.model_path]
        else:
            argv += ["--model", settings.model]
        argv += ["--word_timestamps", str(settings.word_timestamps)]
        if settings.vad:
            argv += ["--vad_filter", "true", "--vad_min_silence_duration_ms", "5000"]
        argv += ["--device", settings.device, "--compute_type", settings.compute_type]
    else:
        argv += ["--model", settings.model_ref, "--word_timestamps", str(settings.word_timestamps)]
        if settings.device != "auto":
            argv += ["--device", settings.device]
        if settings.device == "cpu":
            argv += ["--fp16", "False"]
    if settings.threads:
        argv += ["--threads", str(settings.threads)]
    if not settings.temperature_fallback:
        argv += ["--temperature", "0", "--temperature_increment_on_fallback", "None"]
    argv += ["--beam_size", str(settings.beam_size), "--verbose", "True"]
    argv += ["--output_format", "all", "--output_dir", str(output_dir)]
    if language:
        argv += ["--language", language]
    return argv


def _seconds(hours: str | None, minutes: str, seconds: str) -> float:
    return int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds)


class _Output(asyncio.SubprocessProtocol):
    """Drains both pipes as data arrives; each complete line is proof of life, segment lines are progress."""

    def __init__(self, on_line: Callable[[str], None]) -> None:
        self.on_line = on_line
        self.partial = {1: "", 2: ""}
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self.exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
        lines = (self.partial.get(fd, "") + text.replace("\r", "\n")).split("\n")
        self.partial[fd] = lines.pop()
        for line in lines:
            if line.strip():
                self.tail.append(line)
                self.on_line(line)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)


class CliEngine:
    def __init__(self, settings: TranscriptionSettings) -> None:
        self.settings = settings

    async def transcribe(
        self,
        media: Path,
        work_dir: Path,
        *,
        duration_s: float,
        language: str | None,
        limits: Limits,
        on_progress: Callable[[float], None],
    ) -> Transcript:
        loop = asyncio.get_running_loop()
        output_dir = work_dir / "transcription"
        output_dir.mkdir(parents=True, exist_ok=True)
        argv = cli_command(self.settings, media, output_dir, language)
        started = progressed_at = loop.time()

        def on_line(line: str) -> None:
            nonlocal progressed_at
            progressed_at = loop.time()
            match = _SEGMENT.match(line.strip())
            if match and duration_s > 0:
                end = _seconds(match[4], match[5], match[6])
                on_progress(min(max(end / duration_s, 0.0), 1.0))

        # openai-whisper runs `ffmpeg` from PATH: it gets the runner's own (the bundled one has another name).
        tools = work_dir / "bin"
        tools.mkdir(exist_ok=True)
        (tools / "ffmpeg").symlink_to(limits.ffmpeg.resolve())
        path = os.pathsep.join([str(tools), os.environ.get("PATH", os.defpath)])
        env = {**os.environ, "PATH": path, "PYTHONUNBUFFERED": "1"}
        try:
            transport, protocol = await loop.subprocess_exec(
                lambda: _Output(on_line),
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                cwd=work_dir,
                env=env,
                preexec_fn=(lambda: os.nice(limits.nice)) if limits.nice else None,
            )
        except OSError as exc:
            raise TranscriptionError(f"cannot start {argv[0]}: {exc.strerror or exc}") from exc
        pid = transport.get_pid()
        try:
            while True:
                deadline = progressed_at + limits.stall_timeout_s
                if limits.max_duration_s is not None:
                    deadline = min(deadline, started + limits.max_duration_s)
                done, _ = await asyncio.wait({protocol.exited}, timeout=max(deadline - loop.time(), 0.0))
                if done:
                    break
                now = loop.time()
                if limits.max_duration_s is not None and now - started >= limits.max_duration_s:
                    raise TranscriptionTimedOut(
                        f"{self.settings.engine} took longer than {limits.max_duration_s:g} s and was killed"
                    )
                if now - progressed_at >= limits.stall_timeout_s:
                    raise TranscriptionStalled(
                        f"{self.settings.engine} printed nothing for {limits.stall_timeout_s:g} s "
                        "and was killed"
                    )
            code = transport.get_returncode()
        finally:
            await _kill_and_reap(transport, protocol, pid)
        if code != 0:
            tail = "\n".join(protocol.tail)
            raise TranscriptionError(
                f"{self.settings.engine} exited with code {code}\n--- output (end) ---\n{tail}"
            )
        return _read_outputs(output_dir, media, self.settings.engine)


async def _kill_and_reap(transport: asyncio.SubprocessTransport, protocol: _Output, pid: int) -> None:
    # Even when the leader has exited: a helper it left in its group must go too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(protocol.exited), _REAP_TIMEOUT_S)
    transport.close()


def _read_outputs(output_dir: Path, media: Path, engine: str) -> Transcript:
    base = media.stem
    vtt_path, json_path = output_dir / f"{base}.vtt", output_dir / f"{base}.json"
    try:
        text = vtt_path.read_text(encoding="utf-8")
        detected = json.loads(json_path.read_text(encoding="utf-8")).get("language")
    except (OSError, ValueError) as exc:
        raise TranscriptionError(f"{engine} ended without its outputs: {exc}") from exc
    try:
        cues = parse_vtt(text, strict=False)
    except VttError as exc:
        raise TranscriptionError(f"{engine} wrote an invalid WebVTT file: {exc}") from exc
    if not isinstance(detected, str) or not detected:
        raise TranscriptionError(f"{engine} did not say which language it heard")
    return Transcript(detected, cues)
