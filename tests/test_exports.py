"""Each module with an `__all__` exports exactly its public definitions (and nothing it lacks)."""

from __future__ import annotations

import importlib
import inspect

import pytest

MODULES = (
    *(
        f"tuberunner.runner.{name}"
        for name in (
            *("paths", "config", "client", "notifier", "heartbeat"),
            *("state", "supervisor", "daemon", "cli"),
        )
    ),
    *(f"tuberunner.ops.{name}" for name in ("logs", "sd_notify", "health", "metrics", "http", "coordinator")),
    "tuberunner.transcription",
    *(
        f"tuberunner.transcription.{name}"
        for name in ("audio", "cli_engine", "engine", "faster", "settings", "vtt")
    ),
    "tuberunner.runner.processors.transcription",
)


@pytest.mark.parametrize("name", MODULES)
def test_each_module_exports_exactly_its_public_definitions(name: str) -> None:
    module = importlib.import_module(name)
    exported = set(module.__all__)
    assert all(hasattr(module, n) for n in exported)
    defined = {
        n
        for n, value in vars(module).items()
        if not n.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and value.__module__ == module.__name__
    }
    assert defined <= exported, defined - exported
