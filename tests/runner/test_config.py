"""Runner configuration: defaults, validation that names the key, environment overrides, edits that keep
what a person wrote, and the import of an official runner's config."""

from __future__ import annotations

import threading
import tomllib
from pathlib import Path

import pytest

from tuberunner.protocol.jobs import JobType
from tuberunner.runner.config import (
    SETTINGS,
    ConfigError,
    ConfigFile,
    InstanceConfig,
    RunnerConfig,
    default_document_text,
    load_config,
    parse_config,
    with_enabled_job_types,
)
from tuberunner.runner.paths import InvalidRunnerId, official_config_file, runner_paths


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_missing_file_means_the_defaults(tmp_path: Path) -> None:
    assert load_config(tmp_path / "nothing.toml", env={}) == RunnerConfig()


def test_a_new_file_documents_every_setting_and_means_the_defaults() -> None:
    text = default_document_text()
    assert parse_config(tomllib.loads(text), "new", env={}) == RunnerConfig()
    for setting in SETTINGS:
        assert f"# {setting.key} = " in text, setting.key


@pytest.mark.parametrize(
    ("toml", "key", "problem"),
    [
        ("[jobs]\nconcurrency = 'two'", "jobs.concurrency", "must be an integer"),
        ("[jobs]\nconcurrency = 0", "jobs.concurrency", "between 1 and 256"),
        ("[jobs]\nconcurency = 2", "jobs.concurency", "unknown key"),
        ("[job]\nconcurrency = 2", "job", "unknown section"),
        (
            "[jobs]\nenabled = ['vod-hls-transcoding', 'vod-hsl']",
            "jobs.enabled",
            "unknown job type 'vod-hsl'",
        ),
        ("[network]\nsocket = 'yes'", "network.socket", "true or false"),
        ("[ffmpeg]\nnice = -5", "ffmpeg.nice", "between 0 and 20"),
        (
            "[[registeredInstances]]\nurl = 'https://a.example'\nrunnerName = 'r'",
            "registeredInstances[0].runnerToken",
            "is required",
        ),
        (
            "[[registeredInstances]]\nurl = 'ftp://a'\nrunnerToken = 't'\nrunnerName = 'r'",
            "registeredInstances[0].url",
            "http:// or https://",
        ),
        (
            "[[registeredInstances]]\nurl = 'https://a'\nrunnerToken = 't'\nrunnerName = 'r'\n"
            "[[registeredInstances]]\nurl = 'https://a/'\nrunnerToken = 'u'\nrunnerName = 'r'",
            "registeredInstances[1]",
            "registered twice",
        ),
    ],
)
def test_errors_name_the_file_the_key_and_the_problem(
    tmp_path: Path, toml: str, key: str, problem: str
) -> None:
    path = write(tmp_path / "config.toml", toml)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert caught.value.key == key
    assert problem in caught.value.problem
    assert str(caught.value).startswith(f"{path}: {key}: ")


def test_invalid_toml_is_reported_with_its_position(tmp_path: Path) -> None:
    path = write(tmp_path / "config.toml", "[jobs]\nconcurrency = = 2\n")
    with pytest.raises(ConfigError, match=r"not valid TOML.*line 2"):
        load_config(path, env={})


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "config.toml", "[jobs]\nconcurrency = 2\n[network]\npoll_interval_s = 30\n")
    env = {
        "TUBERUNNER_JOBS_CONCURRENCY": "6",
        "TUBERUNNER_JOBS_ENABLED": "vod-hls-transcoding, video-transcription",
        "TUBERUNNER_NETWORK_POLL_INTERVAL_S": "12.5",
        "TUBERUNNER_NETWORK_SOCKET": "false",
        "TUBERUNNER_TRANSCRIPTION_MODEL_PATH": "/models/large",
        "TUBERUNNER_ADMIN_TOKEN": "not a runner setting",
    }
    config = load_config(path, env=env)
    assert config.concurrency == 6
    assert config.enabled_job_types == {JobType.VOD_HLS, JobType.TRANSCRIPTION}
    assert config.poll_interval_s == 12.5
    assert config.socket_enabled is False
    assert config.transcription_model_path == "/models/large"


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("TUBERUNNER_JOBS_CONCURRENCY", "lots", "must be an integer"),
        ("TUBERUNNER_JOBS_CONCURENCY", "3", "unknown setting"),
        ("TUBERUNNER_FFMPEG_THREADS", "-1", "between 0 and 1024"),
    ],
)
def test_a_wrong_environment_variable_is_named(name: str, value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({}, "file", env={name: value})
    assert (caught.value.source, caught.value.key) == ("environment", name)
    assert problem in caught.value.problem


def test_enable_job_replaces_the_configured_types() -> None:
    config = RunnerConfig(enabled_job_types=frozenset({JobType.VOD_HLS}))
    assert with_enabled_job_types(config, ["video-transcription"]).enabled_job_types == {
        JobType.TRANSCRIPTION
    }
    assert with_enabled_job_types(config, []) is config
    with pytest.raises(ValueError, match="unknown job type 'transcoding'"):
        with_enabled_job_types(config, ["transcoding"])


def test_paths_follow_xdg_and_the_runner_id(tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path / "c"), "XDG_CACHE_HOME": str(tmp_path / "k"), "HOME": "/nowhere"}
    paths = runner_paths("gpu-1", env=env)
    assert paths.config_file == tmp_path / "c" / "tuberunner" / "gpu-1" / "config.toml"
    assert paths.work_dir == tmp_path / "k" / "tuberunner" / "gpu-1" / "jobs"
    assert (
        official_config_file("gpu-1", env)
        == tmp_path / "c" / "peertube-runner-nodejs" / "gpu-1" / "config.toml"
    )
    relative = runner_paths("default", env={"XDG_CONFIG_HOME": "relative", "HOME": "/home/u"})
    assert relative.config_file == Path("/home/u/.config/tuberunner/default/config.toml")
    with pytest.raises(InvalidRunnerId):
        runner_paths("../escape", env=env)


# ------------------------------------------------------------------------------------------ editing


MANUAL = """# my runner, set up by hand
[jobs]
concurrency = 3  # two GPUs and a spare

[[registeredInstances]]
# the big one
url = "https://videos.example"
runnerToken = "ptrt-1"
runnerName = "box"
"""


def test_edits_keep_comments_and_reread_the_file_right_before_changing_it(tmp_path: Path) -> None:
    config_file = ConfigFile(write(tmp_path / "config.toml", MANUAL))
    config_file.path.chmod(0o640)
    loaded = config_file.load(env={})
    # Someone edits the file after we loaded it...
    config_file.path.write_text(config_file.path.read_text().replace("concurrency = 3", "concurrency = 4"))
    # ...and our change does not undo theirs.
    config_file.save_instance(InstanceConfig("https://second.example", "ptrt-2", "box", "spare"))
    text = config_file.path.read_text()
    for kept in ("# my runner, set up by hand", "concurrency = 4  # two GPUs and a spare", "# the big one"):
        assert kept in text
    config = config_file.load(env={})
    assert loaded.concurrency == 3
    assert config.concurrency == 4
    assert [i.url for i in config.instances] == ["https://videos.example", "https://second.example"]
    assert config_file.path.stat().st_mode & 0o777 == 0o640  # the owner's choice is kept


def test_a_new_config_file_holding_tokens_is_private(tmp_path: Path) -> None:
    config_file = ConfigFile(tmp_path / "sub" / "config.toml")
    assert config_file.ensure_exists() is True
    assert config_file.ensure_exists() is False
    config_file.save_instance(InstanceConfig("https://a.example", "ptrt-secret", "r"))
    assert config_file.path.stat().st_mode & 0o077 == 0


def test_flagging_and_re_registering_an_instance(tmp_path: Path) -> None:
    config_file = ConfigFile(write(tmp_path / "config.toml", MANUAL))
    assert config_file.set_needs_registration("https://videos.example", "box", "ptrt-other") is False
    assert config_file.set_needs_registration("https://videos.example", "box", "ptrt-1") is True
    (flagged,) = config_file.load(env={}).instances
    assert flagged.needs_registration
    config_file.save_instance(InstanceConfig("https://videos.example", "ptrt-new", "box"))
    (fresh,) = config_file.load(env={}).instances
    assert (fresh.runner_token, fresh.needs_registration) == ("ptrt-new", False)
    assert "# the big one" in config_file.path.read_text()
    assert config_file.remove_instance("https://videos.example", "box") is True
    assert config_file.remove_instance("https://videos.example", "box") is False
    assert config_file.load(env={}).instances == ()


def test_a_file_broken_by_hand_is_reported_never_rewritten(tmp_path: Path) -> None:
    broken = MANUAL.replace("concurrency = 3", "concurrency = 'three'")
    config_file = ConfigFile(write(tmp_path / "config.toml", broken))
    with pytest.raises(ConfigError, match=r"jobs\.concurrency"):
        config_file.save_instance(InstanceConfig("https://x.example", "t", "n"))
    assert config_file.path.read_text() == broken


def test_concurrent_edits_from_two_processes_both_land(tmp_path: Path) -> None:
    config_file = ConfigFile(tmp_path / "config.toml")
    config_file.ensure_exists()
    errors: list[BaseException] = []

    def add(index: int) -> None:
        try:
            ConfigFile(config_file.path).save_instance(InstanceConfig(f"https://i{index}.example", "t", "r"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(config_file.load(env={}).instances) == 8


OFFICIAL = """
[jobs]
concurrency = 4

[ffmpeg]
threads = 0
nice = 25

[transcription]
engine = "openai-whisper"
model = "large-v3"

[[registeredInstances]]
url = "https://peertube.example/"
runnerToken = "ptrt-official"
runnerName = "official-box"
runnerDescription = "imported"

[[registeredInstances]]
url = "https://videos.example"
runnerToken = "ptrt-other"
runnerName = "box"
"""


def test_an_official_config_is_imported_without_overriding_ours(tmp_path: Path) -> None:
    source = write(tmp_path / "official.toml", OFFICIAL)
    config_file = ConfigFile(write(tmp_path / "config.toml", MANUAL))
    result = config_file.import_official(source)
    assert [i.runner_name for i in result.added] == ["official-box"]
    assert [i.runner_name for i in result.already_present] == ["box"]
    config = config_file.load(env={})
    assert config.concurrency == 3  # ours was set: kept
    assert (config.ffmpeg_threads, config.ffmpeg_nice) == (0, 20)  # 25 clamped like the OS does
    assert (config.transcription_engine, config.transcription_model) == ("openai-whisper", "large-v3")
    imported = config.instance("https://peertube.example", "official-box")
    assert imported == InstanceConfig("https://peertube.example", "ptrt-official", "official-box", "imported")
    assert config.instance("https://videos.example", "box").runner_token == "ptrt-1"  # type: ignore[union-attr]
    assert "# the big one" in config_file.path.read_text()
    again = config_file.import_official(source)
    assert again.added == []
    assert again.settings == []


def test_a_broken_official_config_names_its_key(tmp_path: Path) -> None:
    source = write(tmp_path / "official.toml", "[jobs]\nconcurrency = 'many'\n")
    with pytest.raises(ConfigError) as caught:
        ConfigFile(tmp_path / "config.toml").import_official(source)
    assert (caught.value.source, caught.value.key) == (str(source), "jobs.concurrency")
