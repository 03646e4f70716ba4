"""The dashboard: one static page that shows runners, jobs and videos, and cancels jobs.

    GET /                   307 → /dashboard/
    GET /dashboard/         index.html, app.js, style.css; vendor/hls.min.js (hls.js, loaded on first play)

No build step: plain HTML, vanilla JavaScript and CSS shipped as package data. The page asks for the admin
token (kept in the tab's sessionStorage), polls the admin and ingest APIs with it every 2 s, and inserts
everything it shows as text, never as markup. Every file is sent with a Content-Security-Policy that
allows only our own scripts and styles (no inline code, no eval), so that a job error or a video name that
tries to be markup cannot run even if a rendering bug let it through; media and API calls may also go to
the origin of `--public-url`, which is where output URLs point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tuberunner.coordinator.context import coordinator_of

STATIC_DIR: Final = Path(__file__).parent / "static"
MOUNT_NAME: Final = "dashboard"

_BASE_POLICY: Final = {
    "default-src": "'none'",
    "script-src": "'self'",
    "style-src": "'self'",
    "img-src": "'self' data:",
    "connect-src": "'self'",
    "media-src": "'self' blob:",
    "base-uri": "'none'",
    "form-action": "'none'",
    "frame-ancestors": "'none'",
}
# Sources that may also be the public URL's origin: output URLs (playlists, segments, MP4s) are built on it.
_PUBLIC_ORIGIN_DIRECTIVES: Final = ("connect-src", "media-src")


def content_security_policy(public_url: str | None) -> str:
    policy = dict(_BASE_POLICY)
    if public_url:
        parts = urlsplit(public_url)
        if parts.scheme in ("http", "https") and parts.netloc:
            for directive in _PUBLIC_ORIGIN_DIRECTIVES:
                policy[directive] += f" {parts.scheme}://{parts.netloc}"
    return "; ".join(f"{name} {value}" for name, value in policy.items())


class _PageHeaders:
    """Adds the page's security and caching headers to every response of the wrapped app (pure ASGI).

    `no-cache` makes browsers revalidate (ETag, 304) so that an upgraded coordinator serves its new page."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._policies: dict[str | None, bytes] = {}

    def _policy(self, scope: Scope) -> bytes:
        public_url = coordinator_of(Request(scope)).config.public_url
        policy = self._policies.get(public_url)
        if policy is None:
            policy = self._policies[public_url] = content_security_policy(public_url).encode()
        return policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        added = [
            (b"content-security-policy", self._policy(scope)),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
            (b"cache-control", b"no-cache"),
        ]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *added]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def to_dashboard(request: Request) -> Response:
    return RedirectResponse(request.url_for(MOUNT_NAME, path="/"), status_code=307)


routes: list[BaseRoute] = [
    Route("/", to_dashboard, methods=["GET", "HEAD"]),
    Mount("/dashboard", app=_PageHeaders(StaticFiles(directory=STATIC_DIR, html=True)), name=MOUNT_NAME),
]
