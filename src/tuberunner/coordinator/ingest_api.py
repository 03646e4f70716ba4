"""Ingest API: submit a video, follow its jobs, fetch its outputs."""

from __future__ import annotations

from starlette.routing import BaseRoute

routes: list[BaseRoute] = []
