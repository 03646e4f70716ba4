"""Admin API (spec §4): registration tokens, runners, jobs."""

from __future__ import annotations

from starlette.routing import BaseRoute

routes: list[BaseRoute] = []
