"""The dashboard's files as the coordinator serves them (no browser): where they are, their types and
security headers, that a wheel ships them, and that the page's code inserts server text as text only."""

from __future__ import annotations

import re
import tomllib
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from tests.support.servers import RunningCoordinator, serve_coordinator
from tuberunner.coordinator.config import CoordinatorConfig
from tuberunner.coordinator.dashboard import STATIC_DIR, content_security_policy

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIR = ROOT / "src" / "tuberunner"
ASSETS = {
    "": "text/html",
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
    "vendor/hls.min.js": "text/javascript",
}


def glob_matches(path: str, pattern: str) -> bool:
    """setuptools' package-data glob: `*` stays within one folder."""
    return re.fullmatch(re.escape(pattern).replace(r"\*", "[^/]*"), path) is not None


def directives(policy: str) -> dict[str, list[str]]:
    parsed = {}
    for item in policy.split(";"):
        name, *sources = item.split()
        parsed[name] = sources
    return parsed


async def test_the_root_and_the_bare_path_lead_to_the_page(coordinator: RunningCoordinator) -> None:
    async with httpx.AsyncClient(base_url=coordinator.url) as http:
        root = await http.get("/")
        assert root.status_code == 307
        assert root.headers["location"] == coordinator.url + "/dashboard/"
        bare = await http.get("/dashboard")
        assert bare.status_code == 307
        assert bare.headers["location"].endswith("/dashboard/")
        page = await http.get("/", follow_redirects=True)
        assert page.status_code == 200
        assert page.url.path == "/dashboard/"
        assert '<script src="app.js" defer></script>' in page.text


async def test_every_asset_is_served_with_its_type_and_the_security_headers(
    coordinator: RunningCoordinator,
) -> None:
    async with httpx.AsyncClient(base_url=coordinator.url) as http:
        for name, media_type in ASSETS.items():
            response = await http.get(f"/dashboard/{name}")
            assert response.status_code == 200, name
            assert response.headers["content-type"].split(";")[0] == media_type, name
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["referrer-policy"] == "no-referrer"
            assert response.headers["cache-control"] == "no-cache"
            policy = directives(response.headers["content-security-policy"])
            assert policy["script-src"] == ["'self'"]
            assert policy["style-src"] == ["'self'"]
            assert policy["default-src"] == ["'none'"]
            assert policy["frame-ancestors"] == ["'none'"]
        # Only the static folder is published: not the package's Python code, nor anything above it.
        for name in ("__init__.py", "../__init__.py", "%2e%2e/__init__.py", "missing.js"):
            assert (await http.get(f"/dashboard/{name}")).status_code == 404, name


async def test_media_and_api_calls_may_go_to_the_public_url(coordinator_config: CoordinatorConfig) -> None:
    config = replace(coordinator_config, public_url="https://videos.example:8443/coordinator/")
    async with serve_coordinator(config) as running, httpx.AsyncClient(base_url=running.url) as http:
        policy = directives((await http.get("/dashboard/")).headers["content-security-policy"])
    assert policy["media-src"] == ["'self'", "blob:", "https://videos.example:8443"]
    assert policy["connect-src"] == ["'self'", "https://videos.example:8443"]
    assert policy["script-src"] == ["'self'"]


@pytest.mark.parametrize("public_url", [None, "", "javascript:alert(1)", "videos.example"])
def test_no_other_origin_is_allowed_without_a_usable_public_url(public_url: str | None) -> None:
    policy = directives(content_security_policy(public_url))
    assert policy["media-src"] == ["'self'", "blob:"]
    assert policy["connect-src"] == ["'self'"]


def test_a_wheel_ships_every_dashboard_file() -> None:
    """Every file under static/ matches a package-data pattern of pyproject.toml (a non-editable install
    copies only those), and the vendored hls.js comes with its license."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["tuberunner"]
    files = [p.relative_to(PACKAGE_DIR).as_posix() for p in STATIC_DIR.rglob("*") if p.is_file()]
    assert files
    unshipped = [f for f in files if not any(glob_matches(f, pattern) for pattern in patterns)]
    assert unshipped == []
    assert {"index.html", "app.js", "style.css", "vendor/hls.min.js", "vendor/hls.js-LICENSE"} <= {
        p.relative_to(STATIC_DIR).as_posix() for p in STATIC_DIR.rglob("*")
    }


def test_the_page_has_no_inline_code_and_its_script_never_parses_server_text_as_html() -> None:
    """The policy forbids inline scripts and styles (they would not run), and the script builds the page
    with text nodes: none of the APIs that parse a string as HTML appear in it."""
    html = (STATIC_DIR / "index.html").read_text()
    assert re.findall(r"<script(?![^>]*\ssrc=)[^>]*>", html) == []
    assert " style=" not in html
    assert "<style" not in html
    assert re.findall(r"\son[a-z]+=", html) == []
    script = (STATIC_DIR / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink
