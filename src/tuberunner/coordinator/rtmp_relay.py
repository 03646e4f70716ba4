"""The coordinator's RTMP server: publishers push a live in, the runner holding its job pulls it out.

Why our own relay (a few hundred lines over `rtmp_wire`) rather than a library or ffmpeg:

* `pyrtmp` (PyPI, pure-Python asyncio) takes publishers only: it has no `play`, so a runner could not pull;
  it parses the chunk stream bit by bit through `bitstring` (costly at several Mbit/s) and configures the
  root logger at DEBUG when imported.
* ffmpeg's listen mode (`-listen 1`) serves one connection per process and takes any stream name: the key
  could only be checked after the stream is accepted, and a second process would be needed to serve the
  runner, with no way to give a joining player the stream from a keyframe.

The relay runs inside the coordinator's event loop (started and stopped by its lifespan). Policy is not
its business: a `RelayPolicy` says which publish names (stream keys) and play names (per-acceptance pull
names) are accepted and is told when a publisher comes and goes.

A stream keeps what a player joining late needs to start decoding at once: the metadata, the audio and
video sequence headers, and every message since the last video keyframe (one GOP). A runner whose ffmpeg
connects seconds after the publisher (or a second runner after the first was lost) starts from that
keyframe. The publisher is never slowed down by a player: messages are queued per player, and a player
whose queue grows past `max_player_queue_bytes` is disconnected.

When the publisher leaves, every player gets what was queued, then `NetStream.Play.UnpublishNotify` and
the end of the connection, so the runner's ffmpeg sees a clean end of stream and finishes its segments.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from tuberunner.coordinator import rtmp_wire as wire

log = logging.getLogger(__name__)

_WINDOW_BYTES: Final = 2_500_000
_OUT_CHUNK_SIZE: Final = 4096
# Message stream id given by `createStream` (one stream per connection).
_STREAM_ID: Final = 1
_CONTROL_CSID, _COMMAND_CSID, _DATA_CSID, _AUDIO_CSID, _VIDEO_CSID = 2, 3, 5, 4, 6
_MAX_GOP_BYTES: Final = 64 * 1024 * 1024


class Recorder(Protocol):
    """Gets every metadata, audio and video message a publisher sends (the replay recording)."""

    def write(self, message: wire.Message) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class PublishGrant:
    """A publisher accepted for `stream` (the name players are matched to), optionally recorded."""

    stream: str
    recorder: Recorder | None = None


@dataclass(frozen=True)
class PlayGrant:
    """A player accepted for `stream`; `holder` names who it is for (kicked when that changes)."""

    stream: str
    holder: str


class RelayPolicy(Protocol):
    async def authorize_publish(self, app: str, name: str, peer: str) -> PublishGrant | str:
        """The grant, or the reason of a refusal (logged by the caller's policy, told to the peer)."""
        ...

    async def authorize_play(self, app: str, name: str, peer: str) -> PlayGrant | str: ...

    async def publish_started(self, stream: str) -> None: ...

    async def publish_ended(self, stream: str, cleanly: bool) -> None:
        """`cleanly`: the publisher closed its stream (deleteStream); else its connection dropped."""
        ...


@dataclass
class RelayCounters:
    publishers_accepted: int = 0
    publishers_refused: int = 0
    players_accepted: int = 0
    players_refused: int = 0
    players_dropped: int = 0


class _Player:
    def __init__(self, writer: asyncio.StreamWriter, holder: str, max_bytes: int) -> None:
        self.writer = writer
        self.holder = holder
        self.max_bytes = max_bytes
        self.queue: deque[bytes | None] = deque()
        self.queued_bytes = 0
        self.wakeup = asyncio.Event()
        self.overflowed = False

    def put(self, data: bytes | None) -> None:
        if self.overflowed:
            return
        if data is not None:
            self.queued_bytes += len(data)
            if self.queued_bytes > self.max_bytes:
                self.overflowed = True
                self.queue.clear()
                self.queue.append(None)
                self.wakeup.set()
                return
        self.queue.append(data)
        self.wakeup.set()

    async def pump(self) -> None:
        """Write what is queued until the end marker (None)."""
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.queue:
                data = self.queue.popleft()
                if data is None:
                    return
                self.queued_bytes -= len(data)
                self.writer.write(data)
            await self.writer.drain()


@dataclass
class _Stream:
    name: str
    publisher: asyncio.StreamWriter | None = None
    recorder: Recorder | None = None
    metadata: bytes | None = None
    video_header: wire.Message | None = None
    audio_header: wire.Message | None = None
    gop: list[wire.Message] = field(default_factory=list)
    gop_bytes: int = 0
    players: set[_Player] = field(default_factory=set)
    started_at: float = field(default_factory=time.time)
    # Wall-clock time (epoch s) of the newest media message and its RTMP timestamp (ms).
    last_media_at: float | None = None
    last_timestamp_ms: int = 0

    def encoded(self, message: wire.Message) -> bytes:
        csid = {wire.AUDIO: _AUDIO_CSID, wire.VIDEO: _VIDEO_CSID}.get(message.type_id, _DATA_CSID)
        return wire.encode_message(
            csid,
            wire.Message(message.type_id, _STREAM_ID, message.timestamp, message.payload),
            _OUT_CHUNK_SIZE,
        )

    def catch_up(self) -> list[bytes]:
        """What a joining player gets before the live messages."""
        stamp = self.gop[0].timestamp if self.gop else self.last_timestamp_ms
        found = []
        if self.metadata is not None:
            found.append(self.encoded(wire.Message(wire.DATA_AMF0, _STREAM_ID, stamp, self.metadata)))
        for header in (self.video_header, self.audio_header):
            if header is not None:
                found.append(self.encoded(wire.Message(header.type_id, _STREAM_ID, stamp, header.payload)))
        found += [self.encoded(m) for m in self.gop]
        return found

    def push(self, message: wire.Message) -> None:
        if message.type_id in (wire.AUDIO, wire.VIDEO) and not message.payload:
            return
        if message.type_id == wire.VIDEO:
            if _is_sequence_header(message):
                self.video_header = message
            elif _is_keyframe(message):
                self.gop = []
                self.gop_bytes = 0
        elif message.type_id == wire.AUDIO and _is_aac_header(message):
            self.audio_header = message
        if message.type_id in (wire.AUDIO, wire.VIDEO):
            self.last_media_at = time.time()
            self.last_timestamp_ms = message.timestamp
            if self.gop or (message.type_id == wire.VIDEO and _is_keyframe(message)):
                self.gop.append(message)
                self.gop_bytes += len(message.payload)
                if self.gop_bytes > _MAX_GOP_BYTES:
                    self.gop, self.gop_bytes = [], 0
        if self.recorder is not None:
            self.recorder.write(message)
        if self.players:
            data = self.encoded(message)
            for player in self.players:
                player.put(data)


def _is_keyframe(message: wire.Message) -> bool:
    return (message.payload[0] >> 4) & 0x7 == 1


def _is_sequence_header(message: wire.Message) -> bool:
    first = message.payload[0]
    if first & 0x80:  # enhanced RTMP: packet type in the low bits, 0 = sequence start
        return first & 0x0F == 0
    return first & 0x0F == 7 and len(message.payload) > 1 and message.payload[1] == 0


def _is_aac_header(message: wire.Message) -> bool:
    return len(message.payload) > 1 and message.payload[0] >> 4 == 10 and message.payload[1] == 0


def _metadata_of(payload: bytes) -> bytes | None:
    """`@setDataFrame "onMetaData" {...}` → `"onMetaData" {...}` (what players get); None for other data."""
    try:
        values = wire.amf0_decode(payload)
    except wire.RtmpError:
        return None
    if values and values[0] == "@setDataFrame":
        values = values[1:]
    if len(values) >= 2 and values[0] == "onMetaData":
        return wire.amf0_encode(*values)
    return None


class RtmpRelay:
    """An RTMP server on `host:port` (port 0: one chosen by the system, see `port` once started)."""

    def __init__(
        self,
        policy: RelayPolicy,
        host: str,
        port: int,
        *,
        handshake_timeout_s: float = 10.0,
        idle_timeout_s: float = 30.0,
        max_connections: int = 256,
        max_player_queue_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.policy = policy
        self.host = host
        self.port = port
        self.handshake_timeout_s = handshake_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_connections = max_connections
        self.max_player_queue_bytes = max_player_queue_bytes
        self.counters = RelayCounters()
        self.streams: dict[str, _Stream] = {}
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("RTMP server listening on %s:%d", self.host, self.port)

    @property
    def listening(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for stream in list(self.streams.values()):
            self._close_stream(stream)
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    # ------------------------------------------------------------------ control from the coordinator

    def is_publishing(self, stream: str) -> bool:
        found = self.streams.get(stream)
        return found is not None and found.publisher is not None

    def end_stream(self, stream: str) -> None:
        """Disconnect the publisher and the players of `stream` (live ended, cancelled or deleted)."""
        found = self.streams.get(stream)
        if found is not None:
            self._close_stream(found)

    def drop_players(self, stream: str, keep_holder: str | None) -> int:
        """Disconnect the players of `stream` not pulling for `keep_holder` (a new acceptance took over)."""
        found = self.streams.get(stream)
        if found is None:
            return 0
        dropped = [p for p in found.players if p.holder != keep_holder]
        for player in dropped:
            found.players.discard(player)
            player.put(None)
            player.writer.close()
        return len(dropped)

    def players_of(self, stream: str) -> int:
        found = self.streams.get(stream)
        return len(found.players) if found is not None else 0

    def last_media_at(self, stream: str) -> float | None:
        found = self.streams.get(stream)
        return found.last_media_at if found is not None else None

    def _close_stream(self, stream: _Stream) -> None:
        if stream.publisher is not None:
            stream.publisher.close()
        for player in stream.players:
            player.put(None)
        stream.players.clear()

    # ------------------------------------------------------------------ connections

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= self.max_connections:
            log.warning("RTMP connection refused: %d connections already", len(self._connections))
            writer.close()
            return
        self._connections.add(task)
        try:
            await _Connection(self, reader, writer).run()
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)


class _Connection:
    def __init__(self, relay: RtmpRelay, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.relay = relay
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.app = ""
        self.chunks = wire.ChunkReader(reader)
        self.acknowledged = 0
        self.stream: _Stream | None = None
        self.player: _Player | None = None
        self.chunk_size = wire.DEFAULT_CHUNK_SIZE
        self.unpublished = False

    def send(self, csid: int, message: wire.Message) -> None:
        self.writer.write(wire.encode_message(csid, message, self.chunk_size))

    def send_command(self, *values: Any, stream_id: int = 0) -> None:
        self.send(_COMMAND_CSID, wire.Message(wire.COMMAND_AMF0, stream_id, 0, wire.amf0_encode(*values)))

    def send_status(self, level: str, code: str, description: str) -> None:
        info = {"level": level, "code": code, "description": description}
        self.send_command("onStatus", 0, None, info, stream_id=_STREAM_ID)

    async def run(self) -> None:
        try:
            async with asyncio.timeout(self.relay.handshake_timeout_s):
                await wire.server_handshake(self.reader, self.writer)
                # Until it publishes or plays, a connection has the handshake's deadline.
                while self.stream is None:
                    if not await self.handle(await self.chunks.read_message()):
                        return
            if self.player is not None:
                await self.serve_player()
            else:
                await self.serve_publisher()
        except (wire.RtmpError, asyncio.IncompleteReadError, ConnectionError, TimeoutError) as exc:
            log.debug("RTMP connection from %s ended: %s", self.peer, exc or type(exc).__name__)
        finally:
            await self.leave()

    async def serve_publisher(self) -> None:
        while True:
            async with asyncio.timeout(self.relay.idle_timeout_s):
                message = await self.chunks.read_message()
            if not await self.handle(message):
                return
            if self.chunks.bytes_read - self.acknowledged >= _WINDOW_BYTES:
                self.acknowledged = self.chunks.bytes_read
                self.send(_CONTROL_CSID, wire.acknowledgement(self.acknowledged))

    async def serve_player(self) -> None:
        """Pump the queue; read (and ignore) what the player says, so its acks do not fill the socket."""
        assert self.player is not None
        reading = asyncio.create_task(self._read_until_closed())
        pumping = asyncio.create_task(self.player.pump())
        try:
            await asyncio.wait({reading, pumping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reading, pumping):
                task.cancel()
            await asyncio.gather(reading, pumping, return_exceptions=True)
        if self.player.overflowed:
            self.relay.counters.players_dropped += 1
            log.warning("RTMP player %s fell too far behind; disconnected", self.peer)
            return
        with contextlib.suppress(Exception):
            self.send_status("status", "NetStream.Play.UnpublishNotify", "The stream ended")
            self.send(_CONTROL_CSID, wire.user_control(wire.STREAM_EOF, _STREAM_ID))
            await asyncio.wait_for(self.writer.drain(), 5)

    async def _read_until_closed(self) -> None:
        while True:
            message = await self.chunks.read_message()
            if message.type_id in (wire.COMMAND_AMF0, wire.COMMAND_AMF3):
                name = _command_name(message)
                if name in ("deleteStream", "closeStream"):
                    return

    async def handle(self, message: wire.Message) -> bool:
        """False ends the connection."""
        if message.type_id in (wire.COMMAND_AMF0, wire.COMMAND_AMF3):
            return await self.on_command(message)
        if message.type_id in (wire.AUDIO, wire.VIDEO) and self.stream is not None and self.player is None:
            self.stream.push(message)
        elif message.type_id in (wire.DATA_AMF0, wire.DATA_AMF3) and self.stream is not None:
            payload = message.payload[1:] if message.type_id == wire.DATA_AMF3 else message.payload
            metadata = _metadata_of(payload)
            if metadata is not None and self.player is None:
                self.stream.metadata = metadata
                self.stream.push(wire.Message(wire.DATA_AMF0, _STREAM_ID, message.timestamp, metadata))
        return True

    async def on_command(self, message: wire.Message) -> bool:
        payload = message.payload[1:] if message.type_id == wire.COMMAND_AMF3 else message.payload
        values = wire.amf0_decode(payload)
        if len(values) < 2 or not isinstance(values[0], str):
            return True
        name, transaction = values[0], values[1]
        args = values[3:]
        if name == "connect":
            options = values[2] if len(values) > 2 and isinstance(values[2], dict) else {}
            self.app = str(options.get("app") or "").strip("/")
            self.send(_CONTROL_CSID, wire.window_ack_size(_WINDOW_BYTES))
            self.send(_CONTROL_CSID, wire.set_peer_bandwidth(_WINDOW_BYTES))
            self.send(_CONTROL_CSID, wire.set_chunk_size(_OUT_CHUNK_SIZE))
            self.chunk_size = _OUT_CHUNK_SIZE
            self.send_command(
                "_result",
                transaction,
                {"fmsVer": "FMS/3,0,1,123", "capabilities": 31},
                {
                    "level": "status",
                    "code": "NetConnection.Connect.Success",
                    "description": "Connection succeeded.",
                    "objectEncoding": 0,
                },
            )
        elif name == "createStream":
            self.send_command("_result", transaction, None, _STREAM_ID)
        elif name == "publish" and self.stream is None:
            return await self.on_publish(str(args[0]) if args else "")
        elif name == "play" and self.stream is None:
            return await self.on_play(str(args[0]) if args else "")
        elif name in ("deleteStream", "closeStream", "FCUnpublish") and self.stream is not None:
            self.unpublished = True
            return False
        await self.writer.drain()
        return True

    async def on_publish(self, name: str) -> bool:
        relay = self.relay
        grant = await relay.policy.authorize_publish(self.app, name, self.peer)
        if isinstance(grant, PublishGrant):
            current = relay.streams.get(grant.stream)
            if current is not None and current.publisher is not None:
                grant = "this live already has a publisher"
        if not isinstance(grant, PublishGrant):
            relay.counters.publishers_refused += 1
            self.send_status("error", "NetStream.Publish.BadName", grant)
            await self.writer.drain()
            return False
        stream = relay.streams.get(grant.stream)
        if stream is None:
            stream = relay.streams[grant.stream] = _Stream(grant.stream)
        stream.publisher = self.writer
        stream.recorder = grant.recorder
        self.stream = stream
        relay.counters.publishers_accepted += 1
        self.send(_CONTROL_CSID, wire.user_control(wire.STREAM_BEGIN, _STREAM_ID))
        self.send_status("status", "NetStream.Publish.Start", f"{name} is now published")
        await self.writer.drain()
        await relay.policy.publish_started(grant.stream)
        return True

    async def on_play(self, name: str) -> bool:
        relay = self.relay
        grant = await relay.policy.authorize_play(self.app, name.partition("?")[0], self.peer)
        stream = relay.streams.get(grant.stream) if isinstance(grant, PlayGrant) else None
        if isinstance(grant, PlayGrant) and (stream is None or stream.publisher is None):
            grant = "the live has no publisher"
        if not isinstance(grant, PlayGrant) or stream is None:
            relay.counters.players_refused += 1
            log.warning("RTMP play of %r from %s refused: %s", name[:80], self.peer, grant)
            self.send_status("error", "NetStream.Play.StreamNotFound", str(grant))
            await self.writer.drain()
            return False
        relay.counters.players_accepted += 1
        self.player = _Player(self.writer, grant.holder, relay.max_player_queue_bytes)
        self.stream = stream
        self.send(_CONTROL_CSID, wire.user_control(wire.STREAM_BEGIN, _STREAM_ID))
        self.send_status("status", "NetStream.Play.Reset", "Playing and resetting")
        self.send_status("status", "NetStream.Play.Start", "Started playing")
        # Our chunk size was announced on connect; the player's queue uses the same one.
        for data in stream.catch_up():
            self.player.put(data)
        stream.players.add(self.player)
        await self.writer.drain()
        return True

    async def leave(self) -> None:
        stream = self.stream
        if stream is None:
            return
        if self.player is not None:
            stream.players.discard(self.player)
            return
        if stream.publisher is not self.writer:
            return
        stream.publisher = None
        if stream.recorder is not None:
            stream.recorder.close()
            stream.recorder = None
        for player in stream.players:
            player.put(None)
        stream.players.clear()
        # Nothing of this publish must reach the next one's players.
        self.relay.streams.pop(stream.name, None)
        try:
            await self.relay.policy.publish_ended(stream.name, self.unpublished)
        except Exception:
            log.exception("handling the end of the publication of %s failed", stream.name)


def _command_name(message: wire.Message) -> str | None:
    payload = message.payload[1:] if message.type_id == wire.COMMAND_AMF3 else message.payload
    try:
        values = wire.amf0_decode(payload)
    except wire.RtmpError:
        return None
    return values[0] if values and isinstance(values[0], str) else None
