"""The `[transcription]` section (file, environment, errors), the engine check, the CLI engines' command
lines, and the WebVTT writer/reader."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tuberunner.runner.config import ConfigError, default_document_text, parse_config
from tuberunner.runner.processors.transcription import transcription_settings
from tuberunner.transcription import (
    Cue,
    TranscriptionSettings,
    VttError,
    engine_problem,
    parse_vtt,
    write_vtt,
)
from tuberunner.transcription.cli_engine import cli_command

SECTION = {
    "transcription": {
        "engine": "faster-whisper",
        "model": "large-v3",
        "modelPath": "/srv/models/large-v3",
        "device": "cuda",
        "compute_type": "int8_float16",
        "threads": 4,
        "concurrency": 2,
        "vad": False,
        "word_timestamps": False,
        "temperature_fallback": False,
    }
}


def test_the_transcription_section_becomes_the_engine_settings() -> None:
    settings = transcription_settings(parse_config(SECTION, "config.toml", env={}))
    assert settings == TranscriptionSettings(
        engine="faster-whisper",
        model="large-v3",
        model_path="/srv/models/large-v3",
        device="cuda",
        compute_type="int8_float16",
        threads=4,
        concurrency=2,
        vad=False,
        word_timestamps=False,
        temperature_fallback=False,
    )
    assert settings.model_ref == "/srv/models/large-v3"


def test_defaults_are_the_in_process_engine_one_job_at_a_time_as_the_official_runner_decodes() -> None:
    settings = transcription_settings(parse_config({}, "config.toml", env={}))
    assert (settings.engine, settings.model, settings.device, settings.concurrency) == (
        "faster-whisper",
        "small",
        "cpu",
        1,
    )
    assert (settings.vad, settings.word_timestamps, settings.temperature_fallback) == (True, True, True)
    assert "[transcription]" in default_document_text()
    assert "# compute_type = " in default_document_text()


def test_every_transcription_setting_has_an_environment_override() -> None:
    env = {
        "TUBERUNNER_TRANSCRIPTION_ENGINE": "whisper-ctranslate2",
        "TUBERUNNER_TRANSCRIPTION_ENGINE_PATH": "/opt/whisper-ctranslate2",
        "TUBERUNNER_TRANSCRIPTION_MODEL_PATH": "/srv/m",
        "TUBERUNNER_TRANSCRIPTION_DEVICE": "auto",
        "TUBERUNNER_TRANSCRIPTION_COMPUTE_TYPE": "int8",
        "TUBERUNNER_TRANSCRIPTION_THREADS": "3",
        "TUBERUNNER_TRANSCRIPTION_CONCURRENCY": "2",
        "TUBERUNNER_TRANSCRIPTION_VAD": "off",
        "TUBERUNNER_TRANSCRIPTION_TEMPERATURE_FALLBACK": "false",
    }
    settings = transcription_settings(parse_config({}, "config.toml", env=env))
    assert (settings.engine, settings.engine_path, settings.model_path) == (
        "whisper-ctranslate2",
        "/opt/whisper-ctranslate2",
        "/srv/m",
    )
    assert (settings.device, settings.compute_type, settings.threads, settings.concurrency) == (
        "auto",
        "int8",
        3,
        2,
    )
    assert (settings.vad, settings.temperature_fallback) == (False, False)


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("engine", "whisper.cpp", "must be one of faster-whisper, whisper-ctranslate2, openai-whisper"),
        ("device", "tpu", "must be one of cpu, cuda, auto"),
        ("concurrency", 0, "must be between 1 and 64"),
        ("threads", -1, "must be between 0 and 1024"),
        ("vad", "yes", "must be true or false"),
        ("speed", 2, "unknown key"),
    ],
)
def test_a_wrong_transcription_setting_names_the_key(key: str, value: object, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as caught:
        parse_config({"transcription": {key: value}}, "config.toml", env={})
    assert caught.value.key == f"transcription.{key}"


def test_an_engine_that_cannot_run_here_is_named_with_the_reason(tmp_path: Path) -> None:
    assert "not a folder" in (engine_problem(TranscriptionSettings(model_path=str(tmp_path / "x"))) or "")
    missing = TranscriptionSettings(engine="openai-whisper", engine_path=str(tmp_path / "whisper"))
    assert "is not an executable" in (engine_problem(missing) or "")
    binary = tmp_path / "whisper"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    assert engine_problem(missing) is None


def test_the_cli_engines_get_the_official_runner_command_lines(tmp_path: Path) -> None:
    media, out = Path("/w/input.mp4"), Path("/w/out")
    ct2 = cli_command(TranscriptionSettings(engine="whisper-ctranslate2", model="small"), media, out, None)
    assert ct2[:4] == ["whisper-ctranslate2", "/w/input.mp4", "--model", "small"]
    assert ct2[ct2.index("--word_timestamps") + 1] == "True"
    assert ct2[ct2.index("--vad_filter") :][:4] == [
        "--vad_filter",
        "true",
        "--vad_min_silence_duration_ms",
        "5000",
    ]
    assert ct2[-4:] == ["--output_format", "all", "--output_dir", "/w/out"]
    local = TranscriptionSettings(engine="whisper-ctranslate2", model_path="/srv/m", engine_path="/opt/w")
    assert cli_command(local, media, out, "fr")[:4] == [
        "/opt/w",
        "/w/input.mp4",
        "--model_directory",
        "/srv/m",
    ]
    assert cli_command(local, media, out, "fr")[-2:] == ["--language", "fr"]
    openai = cli_command(TranscriptionSettings(engine="openai-whisper", model="tiny"), media, out, None)
    assert openai[:4] == ["whisper", "/w/input.mp4", "--model", "tiny"]
    assert "--vad_filter" not in openai  # openai-whisper has no voice detector


def test_cues_are_written_ordered_inside_the_media_and_escaped() -> None:
    raw = [
        Cue(2.0, 3.0, " second "),
        Cue(1.0, 0.5, "goes back <b> & ends before it starts"),
        Cue(5.0, 5.0, "no length --> at all"),
        Cue(8.0, 50.0, "ends after the media\n\nwith a blank line"),
        Cue(9.0, 9.5, "   "),
    ]
    text = write_vtt(raw, duration_s=10.0)
    assert text.startswith("WEBVTT\n\n00:00:02.000 --> 00:00:03.000\nsecond\n\n")
    cues = parse_vtt(text)
    assert [(c.start_s, c.end_s) for c in cues] == [(2.0, 3.0), (2.0, 2.01), (5.0, 5.01), (8.0, 10.0)]
    assert cues[1].text == "goes back &lt;b&gt; &amp; ends before it starts"
    assert cues[2].text == "no length --&gt; at all"
    assert cues[3].text == "ends after the media\nwith a blank line"


@given(
    st.lists(
        st.tuples(
            st.floats(-5, 200, allow_nan=False), st.floats(-5, 200, allow_nan=False), st.text(max_size=20)
        ),
        max_size=30,
    ),
    st.floats(0.5, 150, allow_nan=False),
)
def test_whatever_an_engine_hands_out_the_written_document_parses_strictly(
    segments: list[tuple[float, float, str]], duration_s: float
) -> None:
    cues = parse_vtt(write_vtt([Cue(s, e, t) for s, e, t in segments], duration_s=duration_s))
    assert [c.start_s for c in cues] == sorted(c.start_s for c in cues)
    assert all(0 <= c.start_s < c.end_s <= duration_s + 0.0011 for c in cues)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("00:00:01.000 --> 00:00:02.000\nhi\n", "no WEBVTT header"),
        ("WEBVTT\n\n00:00:02.000 --> 00:00:01.000\nbackwards\n", "not after its start"),
        (
            "WEBVTT\n\n00:00:05.000 --> 00:00:06.000\na\n\n00:00:01.000 --> 00:00:02.000\nb\n",
            "before the previous",
        ),
        ("WEBVTT\n\n00:00:01 --> 00:00:02\nno millis\n", "bad cue timing"),
    ],
)
def test_a_malformed_document_is_refused(text: str, problem: str) -> None:
    with pytest.raises(VttError, match=problem):
        parse_vtt(text)


def test_a_runner_with_transcription_loads_no_engine_until_its_first_job() -> None:
    """faster-whisper, CTranslate2 and numpy are imported by the first transcription, not at start."""
    code = (
        "import sys; from tuberunner.runner.config import RunnerConfig;"
        "from tuberunner.runner.processors import runner_processors;"
        "assert runner_processors(RunnerConfig()).transcription is not None;"
        "print(sorted(m for m in sys.modules if m.startswith(('faster_whisper', 'ctranslate2', 'numpy'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"
