"""The in-process engine: faster-whisper (CTranslate2), the model loaded once per process and kept.

The audio is decoded by ffmpeg (killable, watched) into a raw file; the decoding of speech runs on a thread
of its own so that the event loop stays free. faster-whisper yields segments one at a time: the thread
checks a stop flag before each one (and before starting), posts each segment's end to the loop (progress,
and proof of life for the stall watchdog), and stops as soon as the flag is set. A cancelled, stalled or
timed-out transcription sets the flag and waits for the thread to return (at most one segment's work)
before the call ends, so a freed job slot never hides a decoder still using the CPU and memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuberunner.transcription.audio import extract_audio
from tuberunner.transcription.engine import (
    Limits,
    Transcript,
    TranscriptionError,
    TranscriptionStalled,
    TranscriptionTimedOut,
)
from tuberunner.transcription.settings import TranscriptionSettings
from tuberunner.transcription.vtt import Cue

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

__all__ = ["THREAD_NAME", "FasterWhisperEngine", "loaded_models"]

log = logging.getLogger(__name__)

THREAD_NAME = "tuberunner-transcribe"
# How long a stopped decoder may take to notice its flag (it finishes the window it is in).
_STOP_GRACE_S = 60.0
# The official runner's `--vad_min_silence_duration_ms 5000`.
_VAD_MIN_SILENCE_MS = 5000
# ffmpeg reports progress twice a second: a shorter stall timeout would kill a healthy audio decode.
_AUDIO_STALL_FLOOR_S = 5.0
_FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)

_ModelKey = tuple[str, str, str, int, int]
_models: dict[_ModelKey, WhisperModel] = {}
_models_lock = threading.Lock()


def _model_key(settings: TranscriptionSettings) -> _ModelKey:
    return (
        settings.model_ref,
        settings.device,
        settings.compute_type,
        settings.threads,
        settings.concurrency,
    )


def loaded_models() -> int:
    """How many models this process holds (each one once)."""
    with _models_lock:
        return len(_models)


def _load_model(settings: TranscriptionSettings) -> WhisperModel:
    """The process's model for `settings`, loaded at the first call (on a worker thread) and kept."""
    key = _model_key(settings)
    with _models_lock:
        model = _models.get(key)
        if model is not None:
            return model
        from faster_whisper import WhisperModel

        log.info(
            "loading the transcription model %s (device %s, compute type %s)",
            settings.model_ref,
            settings.device,
            settings.compute_type,
        )
        try:
            model = WhisperModel(
                settings.model_ref,
                device=settings.device,
                compute_type=settings.compute_type,
                cpu_threads=settings.threads,
                num_workers=settings.concurrency,
            )
        except Exception as exc:  # CTranslate2, the hub and the file system each raise their own
            raise TranscriptionError(
                f"cannot load the transcription model {settings.model_ref}: {type(exc).__name__}: {exc}"
            ) from exc
        _models[key] = model
        return model


class _Decode:
    """One transcription on its thread; `finished` (a future of the loop) gets its Transcript, or None
    when it stopped on its flag."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        model: WhisperModel,
        audio: Path,
        options: dict[str, Any],
        on_segment: Callable[[float], None],
    ) -> None:
        self.loop = loop
        self.model = model
        self.audio = audio
        self.options = options
        self.on_segment = on_segment
        self.stop = threading.Event()
        self.finished: asyncio.Future[Transcript | None] = loop.create_future()
        # Retrieve an exception nobody waits for any more (a stopped decoder's), so it is never logged
        # as "never retrieved".
        self.finished.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _post(self, callback: Callable[..., object], *args: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self.loop.call_soon_threadsafe(callback, *args)

    def _settle(self, result: Transcript | None, error: BaseException | None) -> None:
        if self.finished.done():
            return
        if error is not None:
            self.finished.set_exception(error)
        else:
            self.finished.set_result(result)

    def _run(self) -> None:
        try:
            result = self._work()
        except BaseException as exc:
            self._post(self._settle, None, exc)
        else:
            self._post(self._settle, result, None)

    def _work(self) -> Transcript | None:
        import numpy as np

        if self.stop.is_set():
            return None
        samples = np.fromfile(self.audio, dtype=np.float32)
        self.audio.unlink(missing_ok=True)
        if self.stop.is_set():
            return None
        if samples.size == 0:
            raise TranscriptionError("the input's audio stream decodes to no sound at all")
        segments, info = self.model.transcribe(samples, **self.options)
        cues: list[Cue] = []
        try:
            for segment in segments:
                if self.stop.is_set():
                    return None
                cues.append(Cue(float(segment.start), float(segment.end), str(segment.text)))
                self._post(self.on_segment, float(segment.end))
        finally:
            segments.close()  # abandons faster-whisper's generator now, with what it holds
        return Transcript(str(info.language), cues)


class FasterWhisperEngine:
    def __init__(self, settings: TranscriptionSettings) -> None:
        self.settings = settings

    def _options(self, language: str | None, model: WhisperModel) -> dict[str, Any]:
        settings = self.settings
        if language is not None and language not in model.supported_languages:
            log.warning("language %r is not one the model knows: detecting it instead", language)
            language = None
        options: dict[str, Any] = {
            "language": language,
            "task": "transcribe",
            "beam_size": settings.beam_size,
            "temperature": list(_FALLBACK_TEMPERATURES) if settings.temperature_fallback else 0.0,
            "word_timestamps": settings.word_timestamps,
            "vad_filter": settings.vad,
        }
        if settings.vad:
            options["vad_parameters"] = {"min_silence_duration_ms": _VAD_MIN_SILENCE_MS}
        return options

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
        started = loop.time()
        audio = await extract_audio(
            limits.ffmpeg,
            media,
            work_dir / "audio-16k.f32",
            duration_s=duration_s,
            stall_timeout_s=max(limits.stall_timeout_s, _AUDIO_STALL_FLOOR_S),
            max_duration_s=limits.max_duration_s,
            nice=limits.nice,
        )
        # Loading reads the model from disk once per process; it is not a stall.
        model = await asyncio.to_thread(_load_model, self.settings)
        progressed_at = loop.time()

        def on_segment(end_s: float) -> None:
            nonlocal progressed_at
            progressed_at = loop.time()
            if duration_s > 0:
                on_progress(min(max(end_s / duration_s, 0.0), 1.0))

        decode = _Decode(loop, model, audio, self._options(language, model), on_segment)
        decode.start()
        try:
            while True:
                deadline = progressed_at + limits.stall_timeout_s
                if limits.max_duration_s is not None:
                    deadline = min(deadline, started + limits.max_duration_s)
                done, _ = await asyncio.wait({decode.finished}, timeout=max(deadline - loop.time(), 0.0))
                if done:
                    result = decode.finished.result()
                    if result is None:  # stopped without being asked: cannot happen, but never silent
                        raise TranscriptionError("the transcription stopped before its end")
                    return result
                now = loop.time()
                if limits.max_duration_s is not None and now - started >= limits.max_duration_s:
                    raise TranscriptionTimedOut(
                        f"the transcription took longer than {limits.max_duration_s:g} s and was stopped"
                    )
                if now - progressed_at >= limits.stall_timeout_s:
                    raise TranscriptionStalled(
                        f"the transcription decoded nothing for {limits.stall_timeout_s:g} s and was stopped"
                    )
        except Exception as exc:
            if isinstance(exc, TranscriptionError):
                raise
            raise TranscriptionError(f"the transcription failed: {type(exc).__name__}: {exc}") from exc
        finally:
            if not decode.finished.done():
                decode.stop.set()
                await _stopped(decode)


async def _stopped(decode: _Decode) -> None:
    """Wait (bounded) for a stopped decoder's thread to return; a second cancellation ends the wait."""
    await asyncio.wait({decode.finished}, timeout=_STOP_GRACE_S)
    if not decode.finished.done():
        log.warning("the transcription thread did not stop within %g s; it is left to finish", _STOP_GRACE_S)
