"""Marks shared by the security tests."""

from __future__ import annotations

import pytest

# Overrides the `database_url` fixture of tests/conftest.py: for checks the database cannot change.
SQLITE_ONLY = pytest.mark.parametrize("database_url", [None], ids=["sqlite"])
