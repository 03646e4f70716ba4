"""The OpenAPI description: served without a token, valid, and covering exactly the routes the app has."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis.core.result import Ok
from starlette.routing import BaseRoute, Mount, Route

from tests.support.servers import ADMIN_TOKEN, RunningCoordinator, serve_coordinator
from tuberunner.coordinator import ingest_api
from tuberunner.coordinator.config import CoordinatorConfig
from tuberunner.coordinator.openapi import OPENAPI_PATH, openapi_document
from tuberunner.protocol.jobs import SUCCESS_FILE_FIELDS, UPDATE_FILE_FIELDS

_PARAM = re.compile(r"\{[^}]*\}")
# Starlette answers HEAD for every GET route by itself.
_IMPLIED = {"HEAD"}
_ADMIN_PATHS = {
    "/api/v1/runners/registration-tokens/generate",
    "/api/v1/runners/registration-tokens",
    "/api/v1/runners/registration-tokens/{id}",
    "/api/v1/runners",
    "/api/v1/runners/{runnerId}",
    "/api/v1/runners/jobs",
    "/api/v1/runners/jobs/unclaimed",
    "/api/v1/runners/jobs/{jobUUID}/cancel",
    "/api/v1/runners/jobs/{jobUUID}",
}


@pytest.fixture
async def coordinator(tmp_path: Path) -> AsyncIterator[RunningCoordinator]:
    """SQLite is enough: the routes and the document do not depend on the database."""
    config = CoordinatorConfig(data_dir=tmp_path / "coordinator", admin_token=ADMIN_TOKEN)
    async with serve_coordinator(config) as running:
        yield running


def _normalised(path: str) -> str:
    """`/jobs/{job_uuid}` and `/jobs/{jobUUID}` are the same route."""
    return _PARAM.sub("{}", path)


def _app_operations(routes: list[BaseRoute], prefix: str = "") -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for route in routes:
        if isinstance(route, Route):
            methods = route.methods or {"GET"}
            found |= {(m.upper(), _normalised(prefix + route.path)) for m in methods if m not in _IMPLIED}
        elif isinstance(route, Mount) and route.routes:
            found |= _app_operations(list(route.routes), prefix + route.path)
        elif isinstance(route, Mount):
            # An app mounted whole (static files): its index and any path below it.
            found |= {("GET", prefix + route.path + "/"), ("GET", prefix + route.path + "/{}")}
        else:
            raise AssertionError(f"a route of a kind the coverage check does not know: {route!r}")
    return found


def _documented_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), _normalised(path))
        for path, item in document["paths"].items()
        for method in item
        if method in {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
    }


def _starlette_routes(running: RunningCoordinator) -> list[BaseRoute]:
    routes: list[BaseRoute] = running.app.other_asgi_app.routes  # type: ignore[attr-defined]
    return routes


async def test_the_document_describes_every_route_of_the_app_and_no_other(
    coordinator: RunningCoordinator,
) -> None:
    registered = _app_operations(_starlette_routes(coordinator))
    documented = _documented_operations(openapi_document())
    assert len(registered) >= 30  # the runner, admin, ingest and static routes are all seen
    assert registered - documented == set(), "routes without an OpenAPI description"
    assert documented - registered == set(), "descriptions of routes the app does not have"


async def test_the_document_is_served_without_a_token_and_is_the_built_one(
    coordinator: RunningCoordinator,
) -> None:
    async with httpx.AsyncClient(base_url=coordinator.url) as http:
        r = await http.get(OPENAPI_PATH)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json() == openapi_document()


def test_the_document_loads_in_schemathesis_with_every_operation() -> None:
    schema = schemathesis.openapi.from_dict(openapi_document())
    results = list(schema.get_all_operations())
    errors = [r.err() for r in results if not isinstance(r, Ok)]
    assert errors == []
    assert len(results) == len(_documented_operations(openapi_document()))


def test_every_4xx_is_a_problem_document_and_every_operation_is_secured_explicitly() -> None:
    document = openapi_document()
    for path, item in document["paths"].items():
        for method, op in item.items():
            assert "security" in op, f"{method} {path}: say who may call it"
            for status, response in op["responses"].items():
                if 400 <= int(status) < 500:
                    content = response["content"]
                    assert list(content) == ["application/problem+json"], f"{method} {path} {status}"
            admin = op["security"] == [{"adminBearer": []}]
            assert admin == ("401" in op["responses"]), (method, path)
            assert admin == (path.startswith("/api/v1/videos") or path in _ADMIN_PATHS), (method, path)


def test_runner_bodies_are_described_in_every_encoding_the_coordinator_parses() -> None:
    paths = openapi_document()["paths"]
    for name in ("update", "success"):
        content = paths[f"/api/v1/runners/jobs/{{jobUUID}}/{name}"]["post"]["requestBody"]["content"]
        multipart = content["multipart/form-data"]["schema"]["properties"]
        assert {"runnerToken", "jobToken"} <= set(multipart)
        assert any(key.startswith("payload[") and key.endswith("]") for key in multipart)
    for name in ("register", "unregister", "jobs/request", "jobs/{jobUUID}/abort", "jobs/{jobUUID}/error"):
        content = paths[f"/api/v1/runners/{name}"]["post"]["requestBody"]["content"]
        assert {"application/json", "application/x-www-form-urlencoded"} <= set(content), name
    codes = openapi_document()["components"]["schemas"]["Problem"]["properties"]["code"]["enum"]
    assert set(codes) == {
        "runner_job_not_in_processing_state",
        "runner_job_not_in_pending_state",
        "unknown_runner_token",
    }


def _binary_fields(schema: dict[str, Any]) -> set[str]:
    return {name for name, prop in schema["properties"].items() if prop.get("format") == "binary"}


def test_the_file_parts_described_are_the_ones_the_coordinator_takes() -> None:
    paths = openapi_document()["paths"]

    def multipart_schema(path: str) -> dict[str, Any]:
        schema: dict[str, Any] = paths[path]["post"]["requestBody"]["content"]["multipart/form-data"][
            "schema"
        ]
        return schema

    assert _binary_fields(multipart_schema("/api/v1/runners/jobs/{jobUUID}/success")) == SUCCESS_FILE_FIELDS
    assert _binary_fields(multipart_schema("/api/v1/runners/jobs/{jobUUID}/update")) == UPDATE_FILE_FIELDS
    assert _binary_fields(multipart_schema("/api/v1/videos")) == set(ingest_api._FILE_FIELDS)
