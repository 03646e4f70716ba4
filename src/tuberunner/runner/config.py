"""Runner settings: a TOML file per `--id`, environment overrides, one frozen `RunnerConfig`.

The file is a superset of the official runner's `config.toml` (same `[jobs] concurrency`, `[ffmpeg]`,
`[transcription]` and `[[registeredInstances]]` keys), so its users find their way; our additions use
snake_case with units in the names. Every setting can be overridden by an environment variable
`TUBERUNNER_<SECTION>_<KEY>` (e.g. `TUBERUNNER_JOBS_CONCURRENCY=4`,
`TUBERUNNER_JOBS_ENABLED=vod-hls-transcoding,video-transcription`), which is what containers use.

Errors name the file (or variable), the key and what is wrong. Edits (`register`, `unregister`, the
daemon flagging an instance) go through `ConfigFile`: under a lock, the file is read again right before
the change, changed with tomlkit (comments and layout kept), validated, and replaced atomically — a manual
edit is never overwritten, and a broken manual edit is reported instead of being "repaired".
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.items import AoT, Table

from tuberunner.protocol.jobs import JobType
from tuberunner.runner.retry import Deadlines

__all__ = [
    "ENV_PREFIX",
    "INSTANCES_KEY",
    "SETTINGS",
    "ConfigError",
    "ConfigFile",
    "Converter",
    "ImportResult",
    "InstanceConfig",
    "RunnerConfig",
    "atomic_write",
    "default_document_text",
    "fsync_dir",
    "load_config",
    "normalize_url",
    "parse_config",
    "parse_job_types",
    "with_enabled_job_types",
]

INSTANCES_KEY = "registeredInstances"
ENV_PREFIX = "TUBERUNNER_"
_URL = re.compile(r"^https?://[^\s/?#]+(/[^\s?#]*)?$")


class ConfigError(Exception):
    """A setting is missing or wrong; `str()` names the source, the key and the problem."""

    def __init__(self, source: str, key: str | None, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        super().__init__(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")


@dataclass(frozen=True)
class InstanceConfig:
    """One registered PeerTube instance (or coordinator)."""

    url: str
    runner_token: str
    runner_name: str
    runner_description: str | None = None
    # Set by the daemon when the instance no longer knows our token; cleared by `register`.
    needs_registration: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.url, self.runner_name)


@dataclass(frozen=True)
class RunnerConfig:
    instances: tuple[InstanceConfig, ...] = ()
    # [jobs]
    # Measured on a 2-core machine (shared with other work): four web-video encodes of a 30 s 720p clip to
    # 480p took 76 s one at a time, 71 s two at a time, 67 s four at a time (ffmpeg threads chosen by
    # ffmpeg each time). Two at a time gets most of the gain (the other job's download, probe and upload
    # overlap an encode) without the memory of four encoders; a ladder job encodes all rungs in one
    # ffmpeg anyway. Larger machines: about one job per 2 cores.
    concurrency: int = 2
    # Lives at once, on slots of their own: a live never waits behind VOD work (nor VOD behind lives). One
    # live to 3 renditions takes about one core of this 2-core machine at 720p; 0: no lives.
    live_concurrency: int = 1
    # None: every job type this runner supports.
    enabled_job_types: frozenset[JobType] | None = None
    min_free_disk_bytes: int = 1024**3
    update_interval_s: float = 15.0
    check_interval_s: float = 2.0
    lease_s: float = 120.0
    outage_limit_s: float = 6 * 3600.0
    shutdown_grace_s: float = 60.0
    report_deadline_s: float = 120.0
    # [ffmpeg]
    ffmpeg_path: str | None = None
    # 0: ffmpeg chooses (x264: 1.5 threads per core). The same four encodes two at a time took 71 s so,
    # 99 s with 2 threads each and 102 s with 1: x264's lookahead and frame threads need more threads than
    # cores to keep them busy, and a pinned count only loses.
    ffmpeg_threads: int = 0
    ffmpeg_nice: int = 20
    stall_timeout_s: float = 120.0
    max_job_duration_s: float | None = None
    # [transcription] (official keys, then ours; see tuberunner.transcription.settings)
    transcription_engine: str = "faster-whisper"
    transcription_engine_path: str | None = None
    transcription_model: str = "small"
    transcription_model_path: str | None = None
    transcription_device: str = "cpu"
    transcription_compute_type: str = "default"
    transcription_threads: int = 0
    transcription_concurrency: int = 1
    transcription_vad: bool = True
    transcription_word_timestamps: bool = True
    transcription_temperature_fallback: bool = True
    # [inputs]
    # Inputs shared by the jobs of one video are kept up to this size (0: no cache, one download per job).
    input_cache_max_bytes: int = 20 * 1024**3
    input_cache_max_idle_s: float = 3600.0
    # [network]
    poll_interval_s: float = 30.0
    poll_jitter: float = 0.2
    socket_enabled: bool = True
    socket_retry_max_s: float = 60.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    write_timeout_s: float = 30.0
    call_timeout_s: float = 60.0
    success_timeout_s: float = 300.0
    # [daemon]
    state_interval_s: float = 2.0
    config_check_interval_s: float = 2.0
    # The local /healthz, /readyz and /metrics endpoint (port 0: off).
    http_host: str = "127.0.0.1"
    http_port: int = 0

    def instance(self, url: str, runner_name: str) -> InstanceConfig | None:
        return next((i for i in self.instances if i.key == (url, runner_name)), None)

    def deadlines(self) -> Deadlines:
        """The phases of every network call (pool waits are bounded like connects)."""
        return Deadlines(
            connect_s=self.connect_timeout_s,
            read_s=self.read_timeout_s,
            write_s=self.write_timeout_s,
            pool_s=self.connect_timeout_s,
        )


# ------------------------------------------------------------------------------------------ validation

Converter = Callable[[Any, bool], Any]


def _integer(low: int, high: int) -> Converter:
    def convert(value: Any, from_env: bool) -> int:
        if from_env and isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {value!r}")
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return convert


def _number(low: float, high: float, *, zero_is_none: bool = False) -> Converter:
    def convert(value: Any, from_env: bool) -> float | None:
        if from_env and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"must be a number, got {value!r}")
        if zero_is_none and value == 0:
            return None
        if not low <= value <= high:
            raise ValueError(f"must be between {low:g} and {high:g}, got {value:g}")
        return float(value)

    return convert


def _text(*, optional: bool) -> Converter:
    def convert(value: Any, from_env: bool) -> str | None:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {value!r}")
        if not value.strip():
            if optional:
                return None
            raise ValueError("must not be empty")
        return value

    return convert


def _choice(*choices: str) -> Converter:
    def convert(value: Any, from_env: bool) -> str:
        if not isinstance(value, str) or value.strip() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return value.strip()

    return convert


def _boolean(value: Any, from_env: bool) -> bool:
    if from_env and isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def parse_job_types(values: list[Any] | tuple[Any, ...]) -> frozenset[JobType] | None:
    """Job type names → set (None when empty: every supported type); ValueError names a wrong one."""
    types: set[JobType] = set()
    for value in values:
        try:
            types.add(JobType(value))
        except ValueError:
            known = ", ".join(t.value for t in JobType)
            raise ValueError(f"unknown job type {value!r} (known: {known})") from None
    return frozenset(types) or None


def _job_types(value: Any, from_env: bool) -> frozenset[JobType] | None:
    if from_env and isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        raise ValueError(f"must be a list of job types, got {value!r}")
    return parse_job_types(value)


@dataclass(frozen=True)
class _Setting:
    section: str
    key: str
    attr: str
    convert: Converter
    doc: str
    # Shown commented out in a new file; None: the key is only documented.
    example: Any = None

    @property
    def env_name(self) -> str:
        snake = re.sub(r"(?<!^)([A-Z])", r"_\1", self.key)
        return f"{ENV_PREFIX}{self.section}_{snake}".upper()


_DAY_S = 86400.0
SETTINGS: tuple[_Setting, ...] = (
    _Setting(
        "jobs",
        "concurrency",
        "concurrency",
        _integer(1, 256),
        "Jobs processed at once, all instances together (lives apart: `live_concurrency`).",
    ),
    _Setting(
        "jobs",
        "live_concurrency",
        "live_concurrency",
        _integer(0, 64),
        "Live streams transcoded at once, on slots of their own beside `concurrency` (0: no lives).",
    ),
    _Setting(
        "jobs",
        "enabled",
        "enabled_job_types",
        _job_types,
        "Job types to take (empty or absent: every supported type).",
        ["vod-web-video-transcoding", "vod-hls-transcoding"],
    ),
    _Setting(
        "jobs",
        "min_free_disk_bytes",
        "min_free_disk_bytes",
        _integer(0, 2**62),
        "No job is accepted while the work folder's disk has less free space than this.",
    ),
    _Setting(
        "jobs",
        "update_interval_s",
        "update_interval_s",
        _number(0.05, 3600),
        "Seconds between progress updates (heartbeats) of a job whose server tells us at once when it takes "
        "a job back (a Tuberunner coordinator, while our socket to it is connected); the first update is "
        "sent at once.",
    ),
    _Setting(
        "jobs",
        "check_interval_s",
        "check_interval_s",
        _number(0.05, 3600),
        "Seconds between updates of a job whose server does not tell (PeerTube sends nothing when a job is "
        "deleted or cancelled, so the next update is how we learn it: a deleted job's ffmpeg stops within "
        "this plus one call). Cost: one call per held job per interval; at ~2.4 ms of PeerTube CPU per "
        "call, 2 s is 1.2 ms of PeerTube CPU per second per held job, and 100 runners holding 2 jobs each "
        "ask 100 calls/s (about a quarter of one core). These calls carry the runner token, so PeerTube's "
        "API rate limit lets them through.",
    ),
    _Setting(
        "jobs",
        "lease_s",
        "lease_s",
        _number(0.1, _DAY_S),
        "A job whose server answers but refuses its updates (a 500, say) for this long is given up: the "
        "server is up, so its stale-job watchdog has taken the job back by then (PeerTube: 2 minutes).",
    ),
    _Setting(
        "jobs",
        "outage_limit_s",
        "outage_limit_s",
        _number(0.1, 30 * _DAY_S),
        "While a server cannot be reached at all (down, restarting, or the network cut), its running jobs "
        "go on and their results wait in the outbox, for up to this long. A server that is down re-queues "
        "nothing, so the work is delivered as soon as it answers again; its answer (job deleted or taken "
        "back) ends a job sooner.",
    ),
    _Setting(
        "jobs",
        "shutdown_grace_s",
        "shutdown_grace_s",
        _number(0, _DAY_S),
        "On SIGTERM, running jobs get this long to finish before they are aborted on their server.",
    ),
    _Setting(
        "jobs",
        "report_deadline_s",
        "report_deadline_s",
        _number(0.1, _DAY_S),
        "How long reporting an error or an abort may keep trying (results are kept in the outbox instead, "
        "see outage_limit_s).",
    ),
    _Setting(
        "ffmpeg",
        "path",
        "ffmpeg_path",
        _text(optional=True),
        "ffmpeg binary (default: FFMPEG_PATH, PATH, bundled).",
        "/usr/bin/ffmpeg",
    ),
    _Setting(
        "ffmpeg", "threads", "ffmpeg_threads", _integer(0, 1024), "ffmpeg -threads (0: ffmpeg chooses)."
    ),
    _Setting(
        "ffmpeg", "nice", "ffmpeg_nice", _integer(0, 20), "Niceness of ffmpeg processes (0-19; 20 means 19)."
    ),
    _Setting(
        "ffmpeg",
        "stall_timeout_s",
        "stall_timeout_s",
        _number(1, _DAY_S),
        "ffmpeg making no progress for this long is killed and its job reported as errored.",
    ),
    _Setting(
        "ffmpeg",
        "max_duration_s",
        "max_job_duration_s",
        _number(1, 30 * _DAY_S, zero_is_none=True),
        "Hard limit of one ffmpeg run (0: none).",
        7200,
    ),
    _Setting(
        "transcription",
        "engine",
        "transcription_engine",
        _choice("faster-whisper", "whisper-ctranslate2", "openai-whisper"),
        "Transcription engine: faster-whisper (in this process; pip install 'tuberunner[transcription]'), "
        "or the official runner's whisper-ctranslate2 / openai-whisper commands.",
    ),
    _Setting(
        "transcription",
        "enginePath",
        "transcription_engine_path",
        _text(optional=True),
        "The command of a whisper-ctranslate2 / openai-whisper engine (default: looked up on PATH).",
        "/usr/local/bin/whisper-ctranslate2",
    ),
    _Setting(
        "transcription",
        "model",
        "transcription_model",
        _text(optional=False),
        "Whisper model name (tiny, base, small, medium, large-v3, ...; fetched once into the cache).",
    ),
    _Setting(
        "transcription",
        "modelPath",
        "transcription_model_path",
        _text(optional=True),
        "A local model instead (a CTranslate2 model folder; a .pt file for openai-whisper).",
        "/srv/models/small",
    ),
    _Setting(
        "transcription",
        "device",
        "transcription_device",
        _choice("cpu", "cuda", "auto"),
        "Where the model runs.",
    ),
    _Setting(
        "transcription",
        "compute_type",
        "transcription_compute_type",
        _text(optional=False),
        "CTranslate2 compute type (default, int8, int8_float16, float16, float32, ...).",
    ),
    _Setting(
        "transcription",
        "threads",
        "transcription_threads",
        _integer(0, 1024),
        "CPU threads of one transcription (0: the engine chooses).",
    ),
    _Setting(
        "transcription",
        "concurrency",
        "transcription_concurrency",
        _integer(1, 64),
        "Transcription jobs at once (each holds the model's working memory; the model is loaded once).",
    ),
    _Setting(
        "transcription",
        "vad",
        "transcription_vad",
        _boolean,
        "Skip silences (5 s or more) with the Silero voice detector, as the official runner does.",
    ),
    _Setting(
        "transcription",
        "word_timestamps",
        "transcription_word_timestamps",
        _boolean,
        "Word-level timestamps for sharper cue boundaries, as the official runner asks.",
    ),
    _Setting(
        "transcription",
        "temperature_fallback",
        "transcription_temperature_fallback",
        _boolean,
        "Decode a doubtful window again at higher temperatures (false: greedy temperature 0 only).",
    ),
    _Setting(
        "inputs",
        "cache_max_bytes",
        "input_cache_max_bytes",
        _integer(0, 2**62),
        "Downloaded inputs are shared by the jobs of a video, up to this many bytes (0: no sharing).",
    ),
    _Setting(
        "inputs",
        "cache_max_idle_s",
        "input_cache_max_idle_s",
        _number(0, 30 * _DAY_S),
        "An input no job used for this long is deleted.",
    ),
    _Setting(
        "network",
        "poll_interval_s",
        "poll_interval_s",
        _number(0.01, _DAY_S),
        "Each instance is asked for jobs this often (jittered) besides socket pings.",
    ),
    _Setting(
        "network", "poll_jitter", "poll_jitter", _number(0, 0.9), "Relative jitter of the poll interval."
    ),
    _Setting(
        "network", "socket", "socket_enabled", _boolean, "Listen to socket.io pings (false: polling only)."
    ),
    _Setting(
        "network",
        "socket_retry_max_s",
        "socket_retry_max_s",
        _number(0.01, _DAY_S),
        "Longest wait between two socket connection attempts.",
    ),
    _Setting(
        "network", "connect_timeout_s", "connect_timeout_s", _number(0.01, 3600), "TCP/TLS connect deadline."
    ),
    _Setting("network", "read_timeout_s", "read_timeout_s", _number(0.01, 3600), "Deadline for each read."),
    _Setting(
        "network", "write_timeout_s", "write_timeout_s", _number(0.01, 3600), "Deadline for each write."
    ),
    _Setting(
        "network",
        "call_timeout_s",
        "call_timeout_s",
        _number(0.01, 3600),
        "Deadline of a whole API call (not uploads/downloads).",
    ),
    _Setting(
        "network",
        "success_timeout_s",
        "success_timeout_s",
        _number(0.01, _DAY_S),
        "How long the server may take to answer a success once the upload is sent.",
    ),
    _Setting(
        "daemon", "state_interval_s", "state_interval_s", _number(0.01, 3600), "Status file refresh period."
    ),
    _Setting(
        "daemon",
        "config_check_interval_s",
        "config_check_interval_s",
        _number(0.01, 3600),
        "How often the daemon looks for changes of this file (register/unregister/manual edits).",
    ),
    _Setting(
        "daemon",
        "http_port",
        "http_port",
        _integer(0, 65535),
        "Port of the local /healthz, /readyz and /metrics endpoint (0: off; one per --id; read at start).",
    ),
    _Setting(
        "daemon",
        "http_host",
        "http_host",
        _text(optional=False),
        "Address of that endpoint (loopback by default; the metrics say what this runner does).",
    ),
)
_SECTIONS = tuple(dict.fromkeys(s.section for s in SETTINGS))
_INSTANCE_KEYS = ("url", "runnerToken", "runnerName", "runnerDescription", "needsRegistration")


def normalize_url(url: str) -> str:
    """`https://host/` → `https://host`; ValueError when it is not an http(s) URL."""
    cleaned = url.strip().rstrip("/")
    if not _URL.match(cleaned):
        raise ValueError(f"must be an http:// or https:// URL, got {url!r}")
    return cleaned


def _parse_instances(raw: Any, source: str) -> tuple[InstanceConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(source, INSTANCES_KEY, "must be an array of tables ([[registeredInstances]])")
    instances: list[InstanceConfig] = []
    for index, entry in enumerate(raw):
        where = f"{INSTANCES_KEY}[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(source, where, "must be a table")
        unknown = sorted(set(entry) - set(_INSTANCE_KEYS))
        if unknown:
            raise ConfigError(
                source, f"{where}.{unknown[0]}", f"unknown key (known: {', '.join(_INSTANCE_KEYS)})"
            )
        for key in ("url", "runnerToken", "runnerName"):
            value = entry.get(key)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(source, f"{where}.{key}", "is required and must be a non-empty string")
        try:
            url = normalize_url(entry["url"])
        except ValueError as exc:
            raise ConfigError(source, f"{where}.url", str(exc)) from None
        if len(entry["runnerName"]) > 100:
            raise ConfigError(source, f"{where}.runnerName", "must be at most 100 characters")
        description = entry.get("runnerDescription")
        if description is not None and not isinstance(description, str):
            raise ConfigError(source, f"{where}.runnerDescription", "must be a string")
        flag = entry.get("needsRegistration", False)
        if not isinstance(flag, bool):
            raise ConfigError(source, f"{where}.needsRegistration", "must be true or false")
        instance = InstanceConfig(url, entry["runnerToken"], entry["runnerName"], description or None, flag)
        if any(i.key == instance.key for i in instances):
            raise ConfigError(
                source, where, f"{url} is registered twice with the name {instance.runner_name!r}"
            )
        instances.append(instance)
    return tuple(instances)


def parse_config(data: Mapping[str, Any], source: str, env: Mapping[str, str] | None = None) -> RunnerConfig:
    """Validate a parsed TOML document, apply `TUBERUNNER_*` overrides from `env`."""
    values: dict[str, Any] = {}
    for section in data:
        if section != INSTANCES_KEY and section not in _SECTIONS:
            known = ", ".join([*_SECTIONS, INSTANCES_KEY])
            raise ConfigError(source, section, f"unknown section (known: {known})")
    for section in _SECTIONS:
        table = data.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(source, section, "must be a table")
        keys = {s.key: s for s in SETTINGS if s.section == section}
        for key, value in table.items():
            setting = keys.get(key)
            if setting is None:
                raise ConfigError(source, f"{section}.{key}", f"unknown key (known: {', '.join(keys)})")
            try:
                values[setting.attr] = setting.convert(value, False)
            except ValueError as exc:
                raise ConfigError(source, f"{section}.{key}", str(exc)) from None
    values["instances"] = _parse_instances(data.get(INSTANCES_KEY), source)
    values.update(_env_overrides(os.environ if env is None else env))
    return RunnerConfig(**values)


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    by_name = {s.env_name: s for s in SETTINGS}
    prefixes = tuple(f"{ENV_PREFIX}{section.upper()}_" for section in _SECTIONS)
    values: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith(prefixes):
            continue  # other TUBERUNNER_* variables belong to other parts
        setting = by_name.get(name)
        if setting is None:
            section_settings = [
                s.env_name for s in SETTINGS if name.startswith(f"{ENV_PREFIX}{s.section.upper()}_")
            ]
            raise ConfigError(
                "environment", name, f"unknown setting (known in this section: {', '.join(section_settings)})"
            )
        try:
            values[setting.attr] = setting.convert(value, True)
        except ValueError as exc:
            raise ConfigError("environment", name, str(exc)) from None
    return values


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), None, f"cannot read: {exc.strerror or exc}") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), None, f"not valid TOML: {exc}") from exc


def load_config(path: Path, env: Mapping[str, str] | None = None) -> RunnerConfig:
    """The settings in `path` (defaults when it does not exist) with environment overrides."""
    data = _read_toml(path) if path.exists() else {}
    return parse_config(data, str(path), env)


def with_enabled_job_types(config: RunnerConfig, names: list[str]) -> RunnerConfig:
    """`server --enable-job ...`: replaces the configured set (ValueError names an unknown type)."""
    return replace(config, enabled_job_types=parse_job_types(names)) if names else config


# ------------------------------------------------------------------------------------------ the file


def _toml_value(value: Any) -> str:
    if isinstance(value, frozenset):
        value = sorted(v.value for v in value)
    return str(tomlkit.item(value).as_string())


def default_document_text() -> str:
    """A new config file: every setting documented and commented out, so defaults can evolve."""
    defaults = RunnerConfig()
    lines = [
        "# Tuberunner runner configuration. Commented-out values are the defaults.",
        "# Each setting can be overridden by the environment variable TUBERUNNER_<SECTION>_<KEY>.",
        "# `tuberunner register` / `unregister` edit [[registeredInstances]] and keep your comments.",
    ]
    for section in _SECTIONS:
        lines += ["", f"[{section}]"]
        for setting in (s for s in SETTINGS if s.section == section):
            default = getattr(defaults, setting.attr)
            lines.append(f"# {setting.doc}")
            if default is not None:
                lines.append(f"# {setting.key} = {_toml_value(default)}")
            elif setting.example is not None:
                lines.append(
                    f"# {setting.key} = {_toml_value(setting.example)}  (an example; unset by default)"
                )
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock shared by every process editing the same config file (CLI and daemon)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def atomic_write(path: Path, text: str, mode: int = 0o600, *, durable: bool = True) -> None:
    """Write through a temporary file in the same folder and rename it over `path` (readers see the old
    or the new content, never a part); `durable` also waits for the disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        mode = path.stat().st_mode & 0o777
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make the entries of `folder` (a rename, a new file) survive a power cut."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class ImportResult:
    added: list[InstanceConfig] = field(default_factory=list)
    already_present: list[InstanceConfig] = field(default_factory=list)
    settings: list[str] = field(default_factory=list)


class ConfigFile:
    """The config file of one runner id, and the only code that changes it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self, env: Mapping[str, str] | None = None) -> RunnerConfig:
        return load_config(self.path, env)

    def signature(self) -> tuple[int, int] | None:
        """(mtime, size) — what the daemon watches to pick up edits; None when the file is missing."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        return (stat.st_mtime_ns, stat.st_size)

    def ensure_exists(self) -> bool:
        """Create a documented default file if there is none; True when created."""
        existed = self.path.exists()
        with self._editing():
            pass
        return not existed

    @contextlib.contextmanager
    def _editing(self) -> Iterator[tomlkit.TOMLDocument]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.path.with_name(self.path.name + ".lock")):
            created = not self.path.exists()
            text = default_document_text() if created else self.path.read_text(encoding="utf-8")
            try:
                doc = tomlkit.parse(text)
            except tomlkit.exceptions.ParseError as exc:
                raise ConfigError(str(self.path), None, f"not valid TOML: {exc}") from exc
            # A file a person broke is reported, never rewritten.
            parse_config(doc.unwrap(), str(self.path), env={})
            yield doc
            new_text = tomlkit.dumps(doc)
            if new_text == text and not created:
                return
            parse_config(tomlkit.parse(new_text).unwrap(), str(self.path), env={})
            atomic_write(self.path, new_text)

    @staticmethod
    def _instances(doc: tomlkit.TOMLDocument) -> AoT | None:
        entries = doc.get(INSTANCES_KEY)
        return entries if isinstance(entries, AoT) else None

    @staticmethod
    def _index(entries: AoT | None, url: str, runner_name: str) -> int | None:
        if entries is None:
            return None
        for index, table in enumerate(entries):
            if normalize_url(str(table.get("url", ""))) == url and table.get("runnerName") == runner_name:
                return index
        return None

    def save_instance(self, instance: InstanceConfig) -> None:
        """Add `instance`, or replace the entry with the same URL and name (a re-registration)."""
        with self._editing() as doc:
            self._put_instance(doc, instance)

    @classmethod
    def _put_instance(cls, doc: tomlkit.TOMLDocument, instance: InstanceConfig) -> None:
        entries = cls._instances(doc)
        table = tomlkit.table()
        table.add("url", instance.url)
        table.add("runnerToken", instance.runner_token)
        table.add("runnerName", instance.runner_name)
        if instance.runner_description:
            table.add("runnerDescription", instance.runner_description)
        index = cls._index(entries, instance.url, instance.runner_name)
        if entries is None:
            doc.append(INSTANCES_KEY, tomlkit.aot())
            entries = cls._instances(doc)
            assert entries is not None
        if index is None:
            entries.append(table)
            return
        # Same entry, new registration: keep the table (and the comments around it), replace values.
        old: Table = entries[index]
        for key in ("runnerToken", "runnerDescription", "needsRegistration"):
            if key in old:
                del old[key]
        for key, value in table.items():
            old[key] = value

    def remove_instance(self, url: str, runner_name: str) -> bool:
        with self._editing() as doc:
            entries = self._instances(doc)
            index = self._index(entries, url, runner_name)
            if entries is None or index is None:
                return False
            del entries[index]
            if len(entries) == 0:
                del doc[INSTANCES_KEY]
            return True

    def set_needs_registration(self, url: str, runner_name: str, runner_token: str) -> bool:
        """Flag the entry that still holds `runner_token` (a newer registration is left alone)."""
        with self._editing() as doc:
            entries = self._instances(doc)
            index = self._index(entries, url, runner_name)
            if entries is None or index is None or entries[index].get("runnerToken") != runner_token:
                return False
            entries[index]["needsRegistration"] = True
            return True

    def import_official(self, source: Path) -> ImportResult:
        """Take registered instances and settings from an official `peertube-runner` config.

        Instances already present (same URL and name) are kept; a setting is taken only when this file
        does not set it already."""
        data = _read_toml(source)
        official = _official_settings(data, str(source))
        instances = _parse_instances(data.get(INSTANCES_KEY), str(source))
        result = ImportResult()
        with self._editing() as doc:
            current = parse_config(doc.unwrap(), str(self.path), env={})
            for instance in instances:
                if current.instance(instance.url, instance.runner_name) is None:
                    self._put_instance(doc, instance)
                    result.added.append(instance)
                else:
                    result.already_present.append(instance)
            for (section, key), value in official.items():
                table = doc.get(section)
                if table is None:
                    table = tomlkit.table()
                    doc.add(section, table)
                if key not in table:
                    table[key] = value
                    result.settings.append(f"{section}.{key} = {_toml_value(value)}")
        return result


_OFFICIAL_KEYS = {
    ("jobs", "concurrency"),
    ("ffmpeg", "threads"),
    ("ffmpeg", "nice"),
    ("transcription", "engine"),
    ("transcription", "enginePath"),
    ("transcription", "model"),
    ("transcription", "modelPath"),
}


def _official_settings(data: Mapping[str, Any], source: str) -> dict[tuple[str, str], Any]:
    by_key = {(s.section, s.key): s for s in SETTINGS}
    taken: dict[tuple[str, str], Any] = {}
    for section, key in sorted(_OFFICIAL_KEYS):
        table = data.get(section)
        if not isinstance(table, dict) or key not in table:
            continue
        value = table[key]
        if section == "ffmpeg" and key == "nice" and isinstance(value, int):
            value = min(max(value, 0), 20)
        try:
            by_key[(section, key)].convert(value, False)
        except ValueError as exc:
            raise ConfigError(source, f"{section}.{key}", str(exc)) from None
        taken[(section, key)] = value
    return taken
