"""Where a runner keeps its files, per `--id`: XDG config and cache folders, like the official runner.

    $XDG_CONFIG_HOME/tuberunner/<id>/config.toml     settings and registered instances (secret: 0600)
    $XDG_CACHE_HOME/tuberunner/<id>/                 everything the daemon may lose (deleting outbox/
                                                     loses results not delivered yet: their servers give
                                                     the jobs to a runner again)
        jobs/<job uuid>/                             one private folder per running job
        outbox/                                      finished results waiting for their server (kept
                                                     across restarts; next to jobs/ so that a result
                                                     moves there by a rename)
        inputs/                                      downloaded inputs shared by jobs of one video
        state.json                                   what `status` and `list-jobs` read
        daemon.pid                                   pid of the running daemon, locked while it runs

The official runner's files live under `peertube-runner-nodejs/<id>/` in the same XDG folders.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "APP_DIR",
    "DEFAULT_RUNNER_ID",
    "OFFICIAL_APP_DIR",
    "InvalidRunnerId",
    "RunnerPaths",
    "check_runner_id",
    "official_config_file",
    "runner_paths",
]

APP_DIR = "tuberunner"
OFFICIAL_APP_DIR = "peertube-runner-nodejs"
DEFAULT_RUNNER_ID = "default"
_RUNNER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class InvalidRunnerId(ValueError):
    pass


@dataclass(frozen=True)
class RunnerPaths:
    runner_id: str
    config_file: Path
    cache_dir: Path

    @property
    def work_dir(self) -> Path:
        """Parent of the per-job folders; emptied at start-up (leftovers of a crash)."""
        return self.cache_dir / "jobs"

    @property
    def outbox_dir(self) -> Path:
        return self.cache_dir / "outbox"

    @property
    def inputs_dir(self) -> Path:
        return self.cache_dir / "inputs"

    @property
    def state_file(self) -> Path:
        return self.cache_dir / "state.json"

    @property
    def pid_file(self) -> Path:
        return self.cache_dir / "daemon.pid"


def _xdg_dir(env: Mapping[str, str], variable: str, fallback: str) -> Path:
    value = env.get(variable, "")
    # The XDG spec says relative values are invalid and must be ignored.
    if value and Path(value).is_absolute():
        return Path(value)
    return Path(env.get("HOME") or Path.home()) / fallback


def check_runner_id(runner_id: str) -> str:
    if not _RUNNER_ID.match(runner_id):
        raise InvalidRunnerId(
            f"invalid runner id {runner_id!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return runner_id


def runner_paths(
    runner_id: str = DEFAULT_RUNNER_ID,
    *,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> RunnerPaths:
    """The files of runner `runner_id`; `config_file` (from `--config`) replaces the default location."""
    env = os.environ if env is None else env
    check_runner_id(runner_id)
    config = config_file or _xdg_dir(env, "XDG_CONFIG_HOME", ".config") / APP_DIR / runner_id / "config.toml"
    cache = _xdg_dir(env, "XDG_CACHE_HOME", ".cache") / APP_DIR / runner_id
    return RunnerPaths(runner_id=runner_id, config_file=config, cache_dir=cache)


def official_config_file(runner_id: str = DEFAULT_RUNNER_ID, env: Mapping[str, str] | None = None) -> Path:
    """Where the official `peertube-runner` keeps the config of `--id runner_id` (Linux layout)."""
    env = os.environ if env is None else env
    check_runner_id(runner_id)
    return _xdg_dir(env, "XDG_CONFIG_HOME", ".config") / OFFICIAL_APP_DIR / runner_id / "config.toml"
