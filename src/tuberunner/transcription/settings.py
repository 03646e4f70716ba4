"""What a runner's `[transcription]` section decides, as one frozen value, and whether it can work here.

Engines:

* `faster-whisper` (default): in this process, through the `faster-whisper` package (CTranslate2). The model
  is named (`tiny`, `small`, `large-v3`, ... fetched once into the Hugging Face cache) or a local folder of
  a CTranslate2 Whisper model (`model_path`); it is loaded once per process and kept.
* `whisper-ctranslate2` and `openai-whisper`: the official runner's command-line engines, run as a child
  process (`engine_path`, else looked up on PATH), killed with its process group when the job ends.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CLI_ENGINES",
    "DEFAULT_ENGINE",
    "ENGINES",
    "IN_PROCESS_ENGINE",
    "TranscriptionSettings",
    "engine_problem",
]

IN_PROCESS_ENGINE = "faster-whisper"
# The official runner's engines and the command each one runs when no `engine_path` is set.
CLI_ENGINES = {"whisper-ctranslate2": "whisper-ctranslate2", "openai-whisper": "whisper"}
ENGINES = (IN_PROCESS_ENGINE, *CLI_ENGINES)
DEFAULT_ENGINE = IN_PROCESS_ENGINE


@dataclass(frozen=True)
class TranscriptionSettings:
    engine: str = DEFAULT_ENGINE
    # CLI engines only: the binary (default: looked up on PATH).
    engine_path: str | None = None
    # A model name; `model_path` (a folder for CTranslate2 engines, a .pt file or name for openai-whisper)
    # wins when set.
    model: str = "small"
    model_path: str | None = None
    # "cpu", "cuda" or "auto".
    device: str = "cpu"
    # CTranslate2 compute type ("default", "int8", "int8_float16", "float16", "float32", ...).
    compute_type: str = "default"
    # CPU threads of one transcription (0: the engine chooses).
    threads: int = 0
    # Transcription jobs of one runner at once: each one holds the model's working memory (the model
    # itself is loaded once per process). The runner does not accept more than this many.
    concurrency: int = 1
    # Skip silences with the Silero VAD (the official runner's `--vad_filter true`, 5 s of silence).
    vad: bool = True
    # Word-level timestamps sharpen cue boundaries (the official runner asks for them).
    word_timestamps: bool = True
    # Decode again at higher temperatures when a window looks wrong (whisper's default); false: greedy
    # temperature 0 only, deterministic.
    temperature_fallback: bool = True
    beam_size: int = 5

    @property
    def model_ref(self) -> str:
        """What the engine is asked to load: the path when one is configured, else the name."""
        return self.model_path or self.model


def engine_problem(settings: TranscriptionSettings) -> str | None:
    """None when the configured engine can run here; otherwise why not (for the log and `status`)."""
    if settings.engine == IN_PROCESS_ENGINE:
        if importlib.util.find_spec("faster_whisper") is None:
            return "the faster-whisper engine is not installed (pip install 'tuberunner[transcription]')"
        if settings.model_path is not None and not Path(settings.model_path).is_dir():
            return f"transcription.modelPath {settings.model_path} is not a folder (a CTranslate2 model)"
        return None
    command = CLI_ENGINES.get(settings.engine)
    if command is None:
        return f"unknown transcription engine {settings.engine!r} (known: {', '.join(ENGINES)})"
    binary = settings.engine_path or command
    if shutil.which(binary) is None:
        return f"the {settings.engine} engine's command {binary!r} is not an executable (nor on PATH)"
    if settings.model_path is not None and not Path(settings.model_path).exists():
        return f"transcription.modelPath {settings.model_path} does not exist"
    return None
