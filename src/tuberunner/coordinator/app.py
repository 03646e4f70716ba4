"""The ASGI application: Starlette routes wrapped by socket.io, one lifespan owning every part."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import socketio
from sqlalchemy.exc import DBAPIError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp

from tuberunner.coordinator import admin_api, dashboard, ingest_api, live_api, openapi, runner_api
from tuberunner.coordinator.config import CoordinatorConfig
from tuberunner.coordinator.context import Coordinator
from tuberunner.coordinator.problems import Problem, database_problem, problem_response, storage_problem
from tuberunner.coordinator.storage import StorageError
from tuberunner.ops import coordinator as ops_api
from tuberunner.ops.sd_notify import SystemdNotifier

log = logging.getLogger(__name__)


def _routes() -> list[BaseRoute]:
    return [
        *runner_api.routes,
        *admin_api.routes,
        # Before the ingest routes: `/api/v1/videos/live` is not a video id.
        *live_api.routes,
        *ingest_api.routes,
        *openapi.routes,
        *dashboard.routes,
        *ops_api.routes,
    ]


async def _on_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return problem_response(request, exc)


async def _on_storage_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StorageError)
    return problem_response(request, storage_problem(request, exc))


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    problem = Problem(exc.detail, headers=dict(exc.headers) if exc.headers else None)
    problem.status = exc.status_code
    return problem_response(request, problem)


async def _on_database_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DBAPIError)
    unavailable = database_problem(request, exc)
    if unavailable is None:
        return await _on_bug(request, exc)
    return problem_response(request, unavailable)


async def _on_bug(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(request, Problem("Internal error; the coordinator keeps running"))


def create_app(config: CoordinatorConfig, *, systemd: SystemdNotifier | None = None) -> ASGIApp:
    """`systemd` gets WATCHDOG=1 from the loop monitor (READY=1 is the server's to send, once it listens)."""
    coordinator = Coordinator(config)
    ops = ops_api.CoordinatorOps(coordinator, systemd)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        ops.before_start()
        await coordinator.start()
        await ops.start()
        try:
            yield
        finally:
            await ops.stop()
            await coordinator.stop()

    app = Starlette(
        routes=_routes(),
        lifespan=lifespan,
        exception_handlers={
            Problem: _on_problem,
            StorageError: _on_storage_error,
            DBAPIError: _on_database_error,
            HTTPException: _on_http_exception,
            Exception: _on_bug,
        },
        middleware=[Middleware(ops_api.JobLogContext)],
    )
    app.state.coordinator = coordinator
    app.state.ops = ops
    asgi: ASGIApp = socketio.ASGIApp(coordinator.notifier.sio, other_asgi_app=app)
    return asgi
