"""The runner's local HTTP endpoint: `/healthz`, `/readyz`, `/metrics` (GET or HEAD), nothing else.

It runs on the daemon's own event loop, so `/healthz` answering at all proves the loop turns. It is a
small asyncio server rather than uvicorn, which would take over SIGTERM/SIGINT from the supervisor. Every
request is bounded (5 s to arrive, 8 KiB of head) and answered with `Connection: close`.

    async with RunnerEndpoint(supervisor, "127.0.0.1", 9101) as endpoint:
        print(endpoint.url)
        await supervisor.run()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING

from tuberunner.ops.health import HealthReport, runner_liveness, runner_readiness
from tuberunner.ops.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from tuberunner.runner.supervisor import Supervisor

__all__ = ["HttpAnswer", "OpsServer", "RunnerEndpoint"]

log = logging.getLogger(__name__)

_REQUEST_TIMEOUT_S = 5.0
_MAX_HEAD_BYTES = 8192


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    content_type: str
    body: bytes

    @classmethod
    def of_report(cls, report: HealthReport) -> HttpAnswer:
        body = json.dumps(report.as_json(), indent=1).encode() + b"\n"
        return cls(report.status_code, "application/json", body)


Handler = Callable[[], Awaitable[HttpAnswer]]


class OpsServer:
    """A minimal HTTP/1.1 server for a few GET routes."""

    def __init__(self, routes: Mapping[str, Handler], host: str, port: int) -> None:
        self.routes = dict(routes)
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def __aenter__(self) -> OpsServer:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=_MAX_HEAD_BYTES)
        if self.port == 0:
            self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT_S):
                method, path = await _read_head(reader)
                answer = await self._answer(method, path)
                head = (
                    f"HTTP/1.1 {answer.status} {HTTPStatus(answer.status).phrase}\r\n"
                    f"Content-Type: {answer.content_type}\r\n"
                    f"Content-Length: {len(answer.body)}\r\n"
                    "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
                )
                writer.write(head.encode() + (b"" if method == "HEAD" else answer.body))
                await writer.drain()
        except (TimeoutError, ConnectionError, _BadRequest):
            pass
        except Exception:
            log.exception("the health/metrics endpoint failed to answer")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, method: str, path: str) -> HttpAnswer:
        handler = self.routes.get(path)
        if handler is None:
            return _plain(404, f"not found; try {', '.join(sorted(self.routes))}")
        if method not in ("GET", "HEAD"):
            return _plain(405, "only GET and HEAD")
        return await handler()


class _BadRequest(Exception):
    pass


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str]:
    """(method, path) of a request; the headers are read and ignored."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise _BadRequest from exc
    request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = request_line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise _BadRequest
    return parts[0], parts[1].split("?", 1)[0]


def _plain(status: int, text: str) -> HttpAnswer:
    return HttpAnswer(status, "text/plain; charset=utf-8", text.encode() + b"\n")


class RunnerEndpoint(OpsServer):
    """The runner's routes on `host:port`."""

    def __init__(self, supervisor: Supervisor, host: str, port: int) -> None:
        async def healthz() -> HttpAnswer:
            return HttpAnswer.of_report(runner_liveness(supervisor))

        async def readyz() -> HttpAnswer:
            return HttpAnswer.of_report(runner_readiness(supervisor))

        async def metrics() -> HttpAnswer:
            return HttpAnswer(200, CONTENT_TYPE, supervisor.metrics.exposition())

        super().__init__({"/healthz": healthz, "/readyz": readyz, "/metrics": metrics}, host, port)
