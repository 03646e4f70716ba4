"""A small load generator: an asyncio HTTP/1.1 keep-alive client, latency records, CPU meters.

httpx costs more CPU per call than the coordinator's hot path, so a benchmark driving thousands of calls per
second from one core would measure httpx. `HttpConnection` does only what the runner API needs: one
request at a time on one kept-alive connection, a JSON (or empty) body out, status and body back, with
`Content-Length`, chunked or until-close framing. Nothing is retried: a POST that failed is counted, never
sent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

_HEAD_LIMIT = 64 * 1024
_NO_BODY_STATUSES = frozenset({204, 304})


class ProtocolError(Exception):
    """The server sent something this client does not understand (or closed mid-answer)."""


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class HttpConnection:
    """One kept-alive HTTP/1.1 connection; calls must not overlap (one simulated runner = one connection)."""

    def __init__(self, host: str, port: int, *, timeout_s: float = 30.0, idle_reconnect_s: float = 2.0):
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        # uvicorn closes idle connections after 5 s: reconnect before reusing an older one, so that a POST
        # never meets a connection the server is closing.
        self.idle_reconnect_s = idle_reconnect_s
        self._host_header = f"{host}:{port}".encode()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._last_used = 0.0
        self.connects = 0

    async def post(self, path: str, body: bytes) -> Reply:
        return await self.request(b"POST", path, body)

    async def post_json(self, path: str, value: Any) -> Reply:
        return await self.request(b"POST", path, json.dumps(value, separators=(",", ":")).encode())

    async def get(self, path: str, headers: Iterable[tuple[str, str]] = ()) -> Reply:
        return await self.request(b"GET", path, None, headers)

    async def request(
        self, method: bytes, path: str, body: bytes | None, headers: Iterable[tuple[str, str]] = ()
    ) -> Reply:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._exchange(method, path, body, headers)
        except BaseException:
            # Whatever happened mid-exchange, the connection is in an unknown state.
            await self.close()
            raise

    async def _exchange(
        self, method: bytes, path: str, body: bytes | None, headers: Iterable[tuple[str, str]]
    ) -> Reply:
        now = time.monotonic()
        if self._writer is not None and now - self._last_used > self.idle_reconnect_s:
            await self.close()
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            self.connects += 1
        reader, writer = self._reader, self._writer
        assert reader is not None
        head = [method, b" ", path.encode(), b" HTTP/1.1\r\nHost: ", self._host_header, b"\r\n"]
        for name, value in headers:
            head += [name.encode(), b": ", value.encode(), b"\r\n"]
        if body is not None:
            head += [b"Content-Type: application/json\r\nContent-Length: ", str(len(body)).encode(), b"\r\n"]
        head.append(b"\r\n")
        if body:
            head.append(body)
        writer.write(b"".join(head))
        status, response_headers = await self._read_head(reader)
        keep_alive = response_headers.get(b"connection", b"").lower() != b"close"
        if status in _NO_BODY_STATUSES or 100 <= status < 200 or method == b"HEAD":
            data = b""
        elif b"chunked" in response_headers.get(b"transfer-encoding", b"").lower():
            data = await self._read_chunked(reader)
        elif b"content-length" in response_headers:
            data = await reader.readexactly(int(response_headers[b"content-length"]))
        else:
            data = await reader.read()
            keep_alive = False
        if keep_alive:
            self._last_used = time.monotonic()
        else:
            await self.close()
        return Reply(status, data)

    @staticmethod
    async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes]]:
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            raise ProtocolError("connection closed before an answer") from exc
        except asyncio.LimitOverrunError as exc:
            raise ProtocolError("answer head too long") from exc
        if len(raw) > _HEAD_LIMIT:
            raise ProtocolError("answer head too long")
        lines = raw[:-4].split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"bad status line {lines[0]!r}")
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise ProtocolError(f"bad header line {line!r}")
            headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
        chunks: list[bytes] = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                # Trailers, if any, end with an empty line.
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                return b"".join(chunks)
            chunk = await reader.readexactly(size + 2)
            if chunk[-2:] != b"\r\n":
                raise ProtocolError("chunk without its CRLF")
            chunks.append(chunk[:-2])

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


# ---------------------------------------------------------------------------------------------- records


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, math.ceil(fraction * len(sorted_values)) - 1))
    return sorted_values[rank]


@dataclass
class EndpointStats:
    latencies_s: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    transport_errors: int = 0

    def summary(self, duration_s: float) -> dict[str, Any]:
        values = sorted(self.latencies_s)
        return {
            "calls": len(values),
            "calls_per_s": len(values) / duration_s if duration_s > 0 else 0.0,
            "p50_ms": percentile(values, 0.50) * 1000,
            "p99_ms": percentile(values, 0.99) * 1000,
            "max_ms": (values[-1] if values else 0.0) * 1000,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "transport_errors": self.transport_errors,
        }


class Recorder:
    """Latency and status of every call, by endpoint; calls started after `stop_at` are not recorded."""

    def __init__(self, stop_at: float) -> None:
        self.stop_at = stop_at
        self.endpoints: dict[str, EndpointStats] = {}

    def stats(self, endpoint: str) -> EndpointStats:
        found = self.endpoints.get(endpoint)
        if found is None:
            found = self.endpoints[endpoint] = EndpointStats()
        return found

    async def call(self, endpoint: str, conn: HttpConnection, path: str, body: bytes) -> Reply | None:
        """POST and record; None when the call failed below HTTP (counted as a transport error)."""
        started = time.perf_counter()
        record = started < self.stop_at
        try:
            reply = await conn.post(path, body)
        except (OSError, ProtocolError, TimeoutError, asyncio.IncompleteReadError):
            if record:
                self.stats(endpoint).transport_errors += 1
            return None
        if record:
            stats = self.stats(endpoint)
            stats.latencies_s.append(time.perf_counter() - started)
            stats.statuses[reply.status] += 1
        return reply

    def all_latencies(self) -> EndpointStats:
        merged = EndpointStats()
        for stats in self.endpoints.values():
            merged.latencies_s += stats.latencies_s
            merged.statuses.update(stats.statuses)
            merged.transport_errors += stats.transport_errors
        return merged


# ---------------------------------------------------------------------------------------------- meters


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds_by_pid(pids: Iterable[int]) -> dict[int, float]:
    """User + system CPU time of each of these processes (all their threads), from /proc."""
    found: dict[int, float] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces: fields are counted after its closing parenthesis.
        fields = stat[stat.rindex(b")") + 2 :].split()
        found[pid] = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return found


def pids_named(name: str) -> list[int]:
    """Processes whose command name is `name` (e.g. the PostgreSQL server and its backends)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm", "rb") as f:
                if f.read().strip() == name.encode():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def machine_busy_seconds() -> float:
    """CPU time every process of the machine used since boot (all CPUs), from /proc/stat."""
    with open("/proc/stat", "rb") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


class CpuMeter:
    """CPU used by this process and by other processes over a span of wall time, in cores (1.0 = one
    core busy); `background` is what the rest of the machine used meanwhile (other work skews results).

    `others` maps a name to a function listing its processes, asked at both ends: a process started
    meanwhile (a new PostgreSQL backend) counts from zero."""

    def __init__(self, others: dict[str, Callable[[], list[int]]]) -> None:
        self.others = others
        self._wall = self._own = self._machine = 0.0
        self._start: dict[str, dict[int, float]] = {}
        self.result: dict[str, float] = {}

    def __enter__(self) -> CpuMeter:
        self._wall = time.perf_counter()
        self._own = time.process_time()
        self._start = {name: cpu_seconds_by_pid(pids()) for name, pids in self.others.items()}
        self._machine = machine_busy_seconds()
        return self

    def __exit__(self, *_: object) -> None:
        wall = time.perf_counter() - self._wall
        self.result = {"wall_s": wall, "generator": (time.process_time() - self._own) / wall}
        for name, pids in self.others.items():
            before = self._start[name]
            now = cpu_seconds_by_pid(pids())
            self.result[name] = sum(t - before.get(pid, 0.0) for pid, t in now.items()) / wall
        machine = (machine_busy_seconds() - self._machine) / wall
        self.result["background"] = max(
            0.0, machine - sum(self.result[k] for k in ("generator", *self.others))
        )


class LoopLag:
    """How late this event loop wakes up a sleeping task: a saturated generator shows it first."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.lags_s: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _probe(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(self.interval_s)
            self.lags_s.append(time.perf_counter() - started - self.interval_s)

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._probe())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def p99_ms(self) -> float:
        return percentile(sorted(self.lags_s), 0.99) * 1000
