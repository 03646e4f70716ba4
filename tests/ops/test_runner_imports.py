"""The runner's ops modules stay free of the coordinator's dependencies."""

from __future__ import annotations


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
