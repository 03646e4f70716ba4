"""`tuberunner transcode`: an embedded coordinator and N runners in one process, on embedded defaults.

Everything lives in `<OUT>/.tuberunner/` (SQLite database, coordinator files, runner work folders), so the
same command run again finds the video it submitted and only does the jobs that are not completed yet.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

from tuberunner.coordinator.bodies import local_body
from tuberunner.coordinator.config import CoordinatorConfig
from tuberunner.coordinator.context import Coordinator
from tuberunner.coordinator.embedded import Embedded, embedded_coordinator
from tuberunner.coordinator.ingest_api import ingest, published_file
from tuberunner.coordinator.problems import Problem
from tuberunner.coordinator.schema import runners as runners_table
from tuberunner.coordinator.storage import StorageError
from tuberunner.coordinator.storage.local import LocalStorage
from tuberunner.media.errors import FfmpegUnavailable
from tuberunner.oneshot.disk import EmbeddedDisk
from tuberunner.oneshot.export import ExportResult, LocalFiles, export_outputs
from tuberunner.runner.config import InstanceConfig, RunnerConfig
from tuberunner.runner.daemon import build_supervisor, encode_cache, processing_settings
from tuberunner.runner.supervisor import Supervisor

log = logging.getLogger(__name__)

STATE_DIR = ".tuberunner"
# The video is read again once job transitions pause for `_QUIET_S` (they come in bursts: a completion, the
# jobs it frees, their accepts; the last one of all ends the run), and every `_PROGRESS_POLL_S` for the
# progress of running jobs. A detailed read takes tens of ms of the event loop the runners and the
# coordinator share: it is not made while they are busy passing jobs along.
_PROGRESS_POLL_S = 1.0
_QUIET_S = 0.05
_FINAL_STATES = frozenset({"published", "failed", "cancelled"})


class TranscodeError(Exception):
    """A reason to stop with a clear message and a non-zero exit (bad input, failed jobs...)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class TranscodeOptions:
    input: Path
    output: Path
    resolutions: tuple[int, ...] | None = None
    hls: bool = True
    web_video: bool = True
    storyboard: bool = False
    runners: int = 1
    # ffmpeg threads per job (0: ffmpeg decides).
    threads: int = 0
    # Studio edits, applied before transcoding: keep (start, end) seconds (None: from the start / to the
    # end), put a video before / after, overlay an image in the top right corner.
    cut: tuple[float | None, float | None] | None = None
    intro: Path | None = None
    outro: Path | None = None
    watermark: Path | None = None
    # Speech to a WebVTT caption: "auto" (the language is detected) or a language code; None: no caption.
    transcribe: str | None = None
    # The transcription model: a name (tiny, small, large-v3, ...) or a local CTranslate2 model folder.
    transcription_model: str | None = None

    def studio_files(self) -> dict[str, Path]:
        """The studio files by upload field."""
        files = {"introfile": self.intro, "outrofile": self.outro, "watermarkfile": self.watermark}
        return {name: path for name, path in files.items() if path is not None}

    def submission_key(self) -> str:
        """Identifies "the same command on the same file": resuming is only done for that."""
        stat = self.input.stat()
        key: list[object] = [
            str(self.input.resolve()),
            stat.st_size,
            stat.st_mtime_ns,
            self.resolutions,
            self.hls,
            self.web_video,
            self.storyboard,
        ]
        edits: list[object] = []
        if self.cut is not None:
            edits.append(list(self.cut))
        for upload_field, path in self.studio_files().items():
            edit_stat = path.stat()
            edits.append([upload_field, str(path.resolve()), edit_stat.st_size, edit_stat.st_mtime_ns])
        if edits:  # keys of commands without edits stay what they were
            key.append(edits)
        if self.transcribe is not None:
            key.append(["transcribe", self.transcribe])
        raw = json.dumps(key)
        return hashlib.sha256(raw.encode()).hexdigest()[:32]


@dataclass
class TranscodeResult:
    video: dict[str, Any]
    export: ExportResult
    resumed: bool
    elapsed_s: float
    jobs_done_before: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


Observer = Callable[[dict[str, Any]], None]


def check_paths(options: TranscodeOptions) -> None:
    if not options.input.exists():
        raise TranscodeError(f"input not found: {options.input}", exit_code=2)
    if not options.input.is_file():
        raise TranscodeError(f"input is not a file: {options.input}", exit_code=2)
    for upload_field, path in options.studio_files().items():
        if not path.is_file():
            option = upload_field.removesuffix("file")
            raise TranscodeError(f"--{option} file not found: {path}", exit_code=2)
    try:
        options.output.mkdir(parents=True, exist_ok=True)
        probe = options.output / f".write-test-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise TranscodeError(f"cannot write to {options.output}: {exc.strerror or exc}", exit_code=2) from exc


async def transcode(options: TranscodeOptions, observe: Observer, stop: asyncio.Event) -> TranscodeResult:
    """Run the whole job graph of one file; `observe` gets the video status on every poll."""
    check_paths(options)
    started = time.monotonic()
    state_dir = options.output / STATE_DIR
    admin_token = "tra-" + secrets.token_urlsafe(24)
    config = CoordinatorConfig(
        data_dir=state_dir / "coordinator",
        admin_token=admin_token,
        resolutions=options.resolutions or CoordinatorConfig.resolutions,
        ping_debounce_s=0.01,
    )
    runner_config = RunnerConfig(
        concurrency=1,
        update_interval_s=1.0,
        poll_interval_s=5.0,
        shutdown_grace_s=0.0,
        ffmpeg_threads=options.threads,
        ffmpeg_nice=0,
        min_free_disk_bytes=64 * 1024**2,
    )
    if options.transcribe is not None:
        runner_config = _with_transcription(runner_config, options.transcription_model)
    try:
        settings = await processing_settings(runner_config)
    except FfmpegUnavailable as exc:
        raise TranscodeError(str(exc), exit_code=2) from exc
    async with AsyncExitStack() as stack:
        embedded = await stack.enter_async_context(embedded_coordinator(config))
        http = await stack.enter_async_context(
            httpx.AsyncClient(
                base_url=embedded.url,
                headers={"Authorization": f"Bearer {admin_token}"},
                timeout=httpx.Timeout(60.0, connect=5.0),
            )
        )
        supervisors = await _start_runners(embedded, runner_config, settings, state_dir, options.runners)
        changed = _job_changes(embedded)
        if not gc.isenabled():
            # The CLI started us without collections: what start-up made lives until the end, and is
            # kept out of every later collection.
            gc.freeze()
            gc.enable()
        async with _running(supervisors):
            video_uuid, resumed = await _submit_or_resume(http, embedded.coordinator, options, state_dir)
            video, done_before = await _follow(http, video_uuid, observe, stop, changed)
        if video["state"] != "published" or _attachments(video, "failed", "cancelled"):
            raise TranscodeError(_failure_message(video))
        export = await export_outputs(http, video, options.output, _stored_output(embedded.coordinator))
    return TranscodeResult(
        video=video,
        export=export,
        resumed=resumed,
        elapsed_s=time.monotonic() - started,
        jobs_done_before=done_before,
    )


def _stored_output(coordinator: Coordinator) -> LocalFiles:
    """The embedded coordinator's own copy of the output a URL serves, when its storage is this disk."""

    @asynccontextmanager
    async def local(url: str) -> AsyncIterator[Path | None]:
        file = await published_file(coordinator, url)
        if file is None or not isinstance(coordinator.storage, LocalStorage):
            yield None
            return
        async with coordinator.storage.local_file(file.path) as path:
            yield path

    return local


def _with_transcription(config: RunnerConfig, model: str | None) -> RunnerConfig:
    """The runners' `[transcription]` settings for --transcribe; TranscodeError when it cannot run here."""
    from tuberunner.runner.processors.transcription import transcription_settings
    from tuberunner.transcription import engine_problem

    if model is not None:
        is_path = Path(model).expanduser().exists() or "/" in model
        config = replace(
            config,
            transcription_model_path=str(Path(model).expanduser()) if is_path else None,
            transcription_model=config.transcription_model if is_path else model,
        )
    problem = engine_problem(transcription_settings(config))
    if problem is not None:
        raise TranscodeError(f"--transcribe: {problem}", exit_code=2)
    return config


async def _start_runners(
    embedded: Embedded, base: RunnerConfig, settings: Any, state_dir: Path, count: int
) -> list[Supervisor]:
    c = embedded.coordinator
    # Runners of an interrupted earlier run hold jobs until their lease expires; removing them gives
    # their jobs back at once.
    async with c.db.read() as conn:
        leftovers = set((await conn.execute(select(runners_table.c.id))).scalars())
    if leftovers:
        await c.runners.remove(leftovers)
    registration = await c.runners.create_registration_token()
    # One set of kept encodes for all: a rung one runner encoded in a ladder serves the others' jobs.
    encodes = encode_cache(base, state_dir / "runners" / "encodes")
    supervisors = []
    for index in range(count):
        name = f"one-shot-{index + 1}"
        _, token = await c.runners.register(registration, name, "tuberunner transcode", None, "127.0.0.1")
        config = replace(
            base, instances=(InstanceConfig(url=embedded.url, runner_token=token, runner_name=name),)
        )
        folder = state_dir / "runners" / name
        supervisors.append(
            build_supervisor(
                config,
                settings,
                runner_id=name,
                work_dir=folder / "jobs",
                inputs_dir=folder / "inputs",
                encodes=encodes,
                shared_disk=EmbeddedDisk(c, token),
            )
        )
    return supervisors


@asynccontextmanager
async def _running(supervisors: list[Supervisor]) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(s.run(), name=f"runner-{i}") for i, s in enumerate(supervisors)]
    try:
        yield
    finally:
        # Stop taking work, abort what runs (its ffmpeg is killed), wait for every runner to be done.
        for supervisor in supervisors:
            supervisor.request_stop()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                log.error("a runner stopped with an error: %r", result)


async def _submit_or_resume(
    http: httpx.AsyncClient, coordinator: Coordinator, options: TranscodeOptions, state_dir: Path
) -> tuple[str, bool]:
    record = state_dir / "submissions.json"
    known: dict[str, str] = json.loads(record.read_text()) if record.exists() else {}
    key = options.submission_key()
    if key in known:
        answer = await http.get(f"/api/v1/videos/{known[key]}")
        if answer.status_code == 200:
            return known[key], True
    fields: dict[str, str] = {
        "name": options.input.stem,
        "hls": str(options.hls).lower(),
        "webVideo": str(options.web_video).lower(),
        "storyboard": str(options.storyboard).lower(),
    }
    if options.resolutions:
        fields["resolutions"] = ",".join(str(r) for r in options.resolutions)
    if options.transcribe is not None:
        fields["transcription"] = "true" if options.transcribe == "auto" else options.transcribe
    if options.cut is not None:
        start, end = options.cut
        if start is not None:
            fields["cutStart"] = f"{start:g}"
        if end is not None:
            fields["cutEnd"] = f"{end:g}"
    files = {"videofile": options.input, **options.studio_files()}
    # The coordinator shares this disk: the files are linked into its uploads, not sent over HTTP.
    try:
        async with local_body(
            coordinator.uploads_dir, fields, files, max_upload_bytes=coordinator.config.max_upload_bytes
        ) as body:
            _, video_uuid = await ingest(coordinator, body)
    except Problem as exc:
        raise TranscodeError(f"cannot take {options.input}: {exc.detail}") from exc
    except (StorageError, OSError) as exc:
        raise TranscodeError(f"cannot take {options.input}: {exc}") from exc
    known[key] = video_uuid
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(known, indent=2))
    os.replace(tmp, record)
    return video_uuid, False


def _job_changes(embedded: Embedded) -> asyncio.Event:
    """An event set on every committed job transition of the embedded coordinator."""
    event = asyncio.Event()
    jobs = embedded.coordinator.jobs
    chained = jobs.on_change

    def changed() -> None:
        event.set()
        if chained is not None:
            chained()

    jobs.on_change = changed
    return event


async def _follow(
    http: httpx.AsyncClient,
    video_uuid: str,
    observe: Observer,
    stop: asyncio.Event,
    changed: asyncio.Event,
) -> tuple[dict[str, Any], int]:
    done_before: int | None = None
    loop = asyncio.get_running_loop()
    while True:
        read_at = loop.time()
        changed.clear()
        answer = await http.get(f"/api/v1/videos/{video_uuid}", params={"details": "true"})
        if answer.status_code != 200:
            raise TranscodeError(_problem(answer, "the coordinator lost the video"))
        video: dict[str, Any] = answer.json()
        if done_before is None:
            done_before = int(video["jobs"]["byState"].get("completed", 0))
        observe(video)
        # Published comes first; the storyboard and captions asked for are waited for too.
        if video["state"] in _FINAL_STATES and not _attachments(video, "pending"):
            return video, done_before
        _check_runnable(video)
        if await _stopped_before_next_read(stop, changed, read_at):
            raise TranscodeError("interrupted; run the same command again to resume", exit_code=130)


async def _stopped_before_next_read(stop: asyncio.Event, changed: asyncio.Event, read_at: float) -> bool:
    """Wait until the video is worth reading again (see `_QUIET_S`); True when `stop` is set meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = read_at + _PROGRESS_POLL_S
    quiet_until: float | None = None
    while not stop.is_set():
        now = loop.time()
        if changed.is_set():
            changed.clear()
            quiet_until = now + _QUIET_S
        until = deadline if quiet_until is None else min(deadline, quiet_until)
        if now >= until:
            return False
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(changed.wait())]
        try:
            await asyncio.wait(waiters, timeout=until - now, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
    return True


def _attachments(video: dict[str, Any], *states: str) -> list[dict[str, Any]]:
    return [a for a in video.get("attachments", []) if a.get("state") in states]


def _check_runnable(video: dict[str, Any]) -> None:
    """A job no embedded runner can take would wait forever: say so instead."""
    from tuberunner.runner.processors import PROCESSORS

    for job in video["jobs"].get("list", []):
        # Transcription jobs exist only with --transcribe, whose engine was checked before starting.
        runnable = job["type"] in PROCESSORS or job["type"] == "video-transcription"
        if job["state"]["label"] == "Pending" and not runnable:
            raise TranscodeError(f"no runner of this version can run {job['type']} jobs")


def _problem(answer: httpx.Response, context: str) -> str:
    try:
        detail = answer.json().get("detail")
    except ValueError:
        detail = None
    return f"{context}: {detail or answer.reason_phrase} (HTTP {answer.status_code})"


def _failure_message(video: dict[str, Any]) -> str:
    if video["state"] == "cancelled" or (not video.get("errors") and _attachments(video, "cancelled")):
        return "the transcoding was cancelled"
    errors = video.get("errors") or []
    if not errors:
        return f"the transcoding ended in state {video['state']}"
    first = errors[0]
    more = f" (and {len(errors) - 1} more failed job(s))" if len(errors) > 1 else ""
    return f"{first['type']} failed: {first['message']}{more}"
