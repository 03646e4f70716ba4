"""A real TCP proxy for fault tests: forward, delay, throttle, cut (RST/FIN) after N bytes, stall, black-hole.

Put it between a client and a real server on loopback; the client sees real sockets failing the way networks
fail (no mocks). Each accepted connection follows one `Plan`, taken from a queue of plans for the
next connections (`plan_next`), else the proxy's `default` plan:

    async with TcpProxy("127.0.0.1", coordinator_port) as proxy:
        client_url = proxy.url                                  # http://127.0.0.1:<proxy port>
        proxy.plan_next(Plan.reset_after(200_000))              # next connection: RST after 200 kB downstream
        proxy.plan_next(Plan.close_after(1_000), count=2)       # then two connections: FIN after 1 kB
        proxy.default = Plan.forward(rate_bytes_per_s=1e6)      # every other one: throttled to ~1 MB/s
        proxy.default = Plan.blackhole()                        # new connections: accepted, never answered
        TcpProxy(host, port, fallbacks=[(host, port2)])         # upstream refuses: the next one is tried
        proxy.reset_all()                                       # RST every open connection now
        proxy.stats.connections, proxy.stats.bytes_down         # what went through

A plan is taken when a connection is accepted: a client's kept-alive connection keeps the plan it had (give
the client `httpx.Limits(max_keepalive_connections=0)` when every request must meet the next plan).

Words: *down* is server → client (a download's body), *up* is client → server (a request or an upload).
`after_bytes` counts the bytes of one connection in the plan's direction; exactly that many are forwarded
before the action. `after_bytes=0` acts at once, before anything is forwarded (a RST at accept looks like
a server that dies on connect).

Actions:

* `FORWARD`  — pass bytes both ways (optionally delayed per chunk and/or throttled).
* `RESET`    — abort both sockets with RST (SO_LINGER 0): the client gets ECONNRESET.
* `CLOSE`    — close both sockets cleanly (FIN): the client sees an early end of stream.
* `STALL`    — stop forwarding both ways but keep both sockets open: the client's reads hang until its own
  timeout (or until `reset_all`/`close` of the proxy).
* `BLACKHOLE`— accept, read and discard what the client sends, never connect upstream, never answer.

Closing the proxy (leaving the `async with`) stops listening, aborts every open connection and waits until
every connection handler has finished, so a test never leaks sockets or tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import Any

__all__ = ["Action", "Direction", "Plan", "ProxyStats", "TcpProxy"]


class Action(StrEnum):
    FORWARD = "forward"
    RESET = "reset"
    CLOSE = "close"
    STALL = "stall"
    BLACKHOLE = "blackhole"


class Direction(StrEnum):
    DOWN = "down"  # server -> client
    UP = "up"  # client -> server


@dataclass(frozen=True)
class Plan:
    """What the proxy does to one connection."""

    action: Action = Action.FORWARD
    # Bytes forwarded in `direction` before the action (ignored for FORWARD and BLACKHOLE).
    after_bytes: int = 0
    direction: Direction = Direction.DOWN
    # Latency added before each forwarded chunk, both directions.
    delay_s: float = 0.0
    # Throughput cap per direction (None = as fast as loopback goes).
    rate_bytes_per_s: float | None = None
    # Largest chunk read and forwarded at once; smaller chunks make throttling smoother.
    chunk_bytes: int = 64 * 1024

    @classmethod
    def forward(cls, *, delay_s: float = 0.0, rate_bytes_per_s: float | None = None) -> Plan:
        return cls(Action.FORWARD, delay_s=delay_s, rate_bytes_per_s=rate_bytes_per_s)

    @classmethod
    def reset_after(
        cls, after_bytes: int, direction: Direction = Direction.DOWN, *, delay_s: float = 0.0
    ) -> Plan:
        return cls(Action.RESET, after_bytes, direction, delay_s=delay_s)

    @classmethod
    def close_after(
        cls, after_bytes: int, direction: Direction = Direction.DOWN, *, delay_s: float = 0.0
    ) -> Plan:
        return cls(Action.CLOSE, after_bytes, direction, delay_s=delay_s)

    @classmethod
    def stall_after(
        cls, after_bytes: int, direction: Direction = Direction.DOWN, *, delay_s: float = 0.0
    ) -> Plan:
        return cls(Action.STALL, after_bytes, direction, delay_s=delay_s)

    @classmethod
    def blackhole(cls) -> Plan:
        return cls(Action.BLACKHOLE)


@dataclass
class ProxyStats:
    connections: int = 0  # accepted so far
    open_connections: int = 0
    bytes_up: int = 0  # forwarded client -> server, all connections
    bytes_down: int = 0  # forwarded server -> client, all connections
    actions: list[Action] = field(default_factory=list)  # faults triggered, in order


class _Connection:
    """One client connection and, unless black-holed, its upstream connection."""

    def __init__(self, plan: Plan, client: asyncio.StreamWriter) -> None:
        self.plan = plan
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.counted = {Direction.DOWN: 0, Direction.UP: 0}
        self.stalled = False
        self.ended = asyncio.Event()

    def reset(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                _abort_with_rst(writer)
        self.ended.set()

    def close(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.close()
        self.ended.set()


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpProxy:
    """Listens on 127.0.0.1:<free port> and forwards to `upstream_host:upstream_port` (see module doc)."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        default: Plan | None = None,
        fallbacks: Sequence[tuple[str, int]] = (),
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        # Tried in order when the upstream refuses a connection (a load balancer's failover, crudely).
        self.fallbacks = tuple(fallbacks)
        self.default = default or Plan.forward()
        self.stats = ProxyStats()
        self._queued: deque[Plan] = deque()
        self._connections: set[_Connection] = set()
        self._handlers = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ control

    def plan_next(self, plan: Plan, count: int = 1) -> None:
        """The next `count` accepted connections follow `plan` (after any already queued)."""
        self._queued.extend([plan] * count)

    def clear_plans(self) -> None:
        self._queued.clear()

    def reset_all(self) -> None:
        """RST every open connection now (new connections are not affected)."""
        for conn in list(self._connections):
            conn.reset()

    # ------------------------------------------------------------------ lifetime

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.reset_all()
        await asyncio.wait_for(self._idle.wait(), 10)

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ per connection

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        plan = self._queued.popleft() if self._queued else self.default
        conn = _Connection(plan, client_writer)
        self._connections.add(conn)
        self._handlers += 1
        self._idle.clear()
        self.stats.connections += 1
        self.stats.open_connections += 1
        try:
            await self._serve(conn, client_reader)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            conn.close()
            self._connections.discard(conn)
            self.stats.open_connections -= 1
            self._handlers -= 1
            if self._handlers == 0:
                self._idle.set()

    async def _serve(self, conn: _Connection, client_reader: asyncio.StreamReader) -> None:
        plan = conn.plan
        if plan.action == Action.BLACKHOLE:
            self.stats.actions.append(Action.BLACKHOLE)
            while await client_reader.read(plan.chunk_bytes):
                pass
            await conn.ended.wait()
            return
        if plan.action != Action.FORWARD and plan.after_bytes <= 0:
            self._act(conn)
            await conn.ended.wait()
            return
        opened = None
        for host, port in ((self.upstream_host, self.upstream_port), *self.fallbacks):
            try:
                opened = await asyncio.open_connection(host, port)
                break
            except OSError:
                continue
        if opened is None:
            # Upstream down: the client sees what it would see from a dead server behind a proxy.
            conn.reset()
            return
        upstream_reader, conn.upstream = opened
        up = self._pump(conn, client_reader, conn.upstream, Direction.UP)
        down = self._pump(conn, upstream_reader, conn.client, Direction.DOWN)
        pumps = asyncio.gather(up, down, return_exceptions=True)
        ended = asyncio.ensure_future(conn.ended.wait())
        try:
            waiters: list[asyncio.Future[Any]] = [pumps, ended]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            conn.close()
            await asyncio.gather(pumps, return_exceptions=True)
            ended.cancel()
            await asyncio.gather(ended, return_exceptions=True)

    async def _pump(
        self,
        conn: _Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        direction: Direction,
    ) -> None:
        plan = conn.plan
        acts_here = plan.action != Action.FORWARD and plan.direction == direction
        while True:
            data = await reader.read(plan.chunk_bytes)
            if conn.stalled:
                await conn.ended.wait()
                return
            if not data:
                if writer.can_write_eof() and not writer.is_closing():
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                return
            trigger = False
            if acts_here:
                room = plan.after_bytes - conn.counted[direction]
                if room <= len(data):
                    data, trigger = data[:room], True
            if data:
                if plan.delay_s:
                    await asyncio.sleep(plan.delay_s)
                writer.write(data)
                await writer.drain()
                conn.counted[direction] += len(data)
                if direction == Direction.DOWN:
                    self.stats.bytes_down += len(data)
                else:
                    self.stats.bytes_up += len(data)
                if plan.rate_bytes_per_s:
                    await asyncio.sleep(len(data) / plan.rate_bytes_per_s)
            if trigger:
                self._act(conn)
                await conn.ended.wait()
                return

    def _act(self, conn: _Connection) -> None:
        action = conn.plan.action
        self.stats.actions.append(action)
        if action == Action.RESET:
            conn.reset()
        elif action == Action.CLOSE:
            conn.close()
        elif action == Action.STALL:
            # Both pumps stop forwarding; the sockets stay open until the proxy closes or resets them.
            conn.stalled = True
