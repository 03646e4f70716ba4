"""Each ops module exports exactly its public definitions."""

from __future__ import annotations

import importlib
import inspect

import pytest

OPS_MODULES = ("logs", "sd_notify", "health", "metrics", "http", "coordinator")


@pytest.mark.parametrize("name", OPS_MODULES)
def test_each_module_exports_exactly_its_public_definitions(name: str) -> None:
    module = importlib.import_module(f"tuberunner.ops.{name}")
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


def test_the_runner_does_not_load_the_coordinator() -> None:
    """The runner's ops modules stay free of the coordinator's dependencies (SQLAlchemy, Starlette)."""
    import subprocess
    import sys

    code = (
        "import sys, tuberunner.runner.daemon, tuberunner.cli;"
        "print(sorted(m for m in sys.modules if m.startswith(('sqlalchemy', 'starlette'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"
