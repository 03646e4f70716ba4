"""RTMP on the wire: the handshake, the chunk stream and AMF0 values (Adobe's RTMP 1.0 and AMF0 specs).

Only what a relay needs: the server side of the plain handshake, reading and writing messages of any size
over the chunk stream (all four header formats, extended timestamps, chunk size changes, aborts), and
AMF0 encoding and decoding of command and data messages. Nothing here knows about streams or policy
(`rtmp_relay` does).

The server answers with a plain handshake (S1's version field zero): clients such as ffmpeg and OBS then
skip the digest check they would make against a Flash Media Server.
"""

from __future__ import annotations

import asyncio
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Final

HANDSHAKE_BYTES: Final = 1536
RTMP_VERSION: Final = 3

SET_CHUNK_SIZE: Final = 1
ABORT: Final = 2
ACKNOWLEDGEMENT: Final = 3
USER_CONTROL: Final = 4
WINDOW_ACK_SIZE: Final = 5
SET_PEER_BANDWIDTH: Final = 6
AUDIO: Final = 8
VIDEO: Final = 9
DATA_AMF3: Final = 15
COMMAND_AMF3: Final = 17
DATA_AMF0: Final = 18
COMMAND_AMF0: Final = 20

# User control events.
STREAM_BEGIN: Final = 0
STREAM_EOF: Final = 1

DEFAULT_CHUNK_SIZE: Final = 128
# The largest message taken from a peer (a 4K keyframe is a few MB), and how many chunk streams one peer may
# have open: together they bound what a connection can make us hold.
MAX_MESSAGE_BYTES: Final = 8 * 1024 * 1024
MAX_CHUNK_STREAMS: Final = 64
_MAX_CHUNK_SIZE: Final = 0xFFFFFF
_EXTENDED: Final = 0xFFFFFF


class RtmpError(Exception):
    """The peer broke the protocol (or sent more than we take); the connection is closed."""


@dataclass(slots=True)
class Message:
    type_id: int
    stream_id: int
    timestamp: int
    payload: bytes


# ------------------------------------------------------------------------------------------ handshake


async def server_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """C0 C1 → S0 S1 S2 → C2. S2 echoes C1 (time, time2, random), as the plain handshake wants."""
    c0c1 = await reader.readexactly(1 + HANDSHAKE_BYTES)
    if c0c1[0] != RTMP_VERSION:
        raise RtmpError(f"unsupported RTMP version {c0c1[0]}")
    c1 = c0c1[1:]
    s1 = struct.pack(">II", 0, 0) + os.urandom(HANDSHAKE_BYTES - 8)
    writer.write(bytes([RTMP_VERSION]) + s1 + c1)
    await writer.drain()
    await reader.readexactly(HANDSHAKE_BYTES)


# ------------------------------------------------------------------------------------------ chunks


@dataclass(slots=True)
class _InStream:
    """What a chunk stream id remembers between chunks (headers of type 1-3 omit it)."""

    timestamp: int = 0
    delta: int = 0
    length: int = 0
    type_id: int = 0
    stream_id: int = 0
    extended: bool = False
    body: bytearray = field(default_factory=bytearray)


class ChunkReader:
    """Messages out of a peer's chunk stream. `SET_CHUNK_SIZE` and `ABORT` are applied here (and returned
    too); `bytes_read` counts what came in, for acknowledgements."""

    def __init__(self, reader: asyncio.StreamReader, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._reader = reader
        self._max = max_message_bytes
        self.chunk_size = DEFAULT_CHUNK_SIZE
        self.bytes_read = 0
        self._streams: dict[int, _InStream] = {}

    async def _read(self, n: int) -> bytes:
        data = await self._reader.readexactly(n)
        self.bytes_read += n
        return data

    async def read_message(self) -> Message:
        while True:
            message = await self._read_chunk()
            if message is None:
                continue
            if message.type_id == SET_CHUNK_SIZE and len(message.payload) >= 4:
                size = struct.unpack(">I", message.payload[:4])[0] & 0x7FFFFFFF
                if not 1 <= size <= _MAX_CHUNK_SIZE:
                    raise RtmpError(f"bad chunk size {size}")
                self.chunk_size = size
            elif message.type_id == ABORT and len(message.payload) >= 4:
                aborted = self._streams.get(struct.unpack(">I", message.payload[:4])[0])
                if aborted is not None:
                    aborted.body.clear()
            return message

    async def _read_chunk(self) -> Message | None:
        first = (await self._read(1))[0]
        fmt, csid = first >> 6, first & 0x3F
        if csid == 0:
            csid = 64 + (await self._read(1))[0]
        elif csid == 1:
            low, high = await self._read(2)
            csid = 64 + low + high * 256
        state = self._streams.get(csid)
        if state is None:
            if fmt != 0:
                raise RtmpError(f"chunk stream {csid} starts without a full header")
            if len(self._streams) >= MAX_CHUNK_STREAMS:
                raise RtmpError(f"more than {MAX_CHUNK_STREAMS} chunk streams")
            state = self._streams[csid] = _InStream()
        starts_message = not state.body
        if fmt == 3:
            stamp = struct.unpack(">I", await self._read(4))[0] if state.extended else state.delta
            if starts_message:
                state.timestamp = (state.timestamp + stamp) & 0xFFFFFFFF
        else:
            if not starts_message:
                state.body.clear()  # a new header in the middle of a message: that message is dropped
            header = await self._read((11, 7, 3)[fmt])
            stamp = int.from_bytes(header[0:3], "big")
            if fmt <= 1:
                state.length = int.from_bytes(header[3:6], "big")
                state.type_id = header[6]
                if state.length > self._max:
                    raise RtmpError(f"message of {state.length} bytes is too large")
            if fmt == 0:
                state.stream_id = struct.unpack("<I", header[7:11])[0]
            state.extended = stamp == _EXTENDED
            if state.extended:
                stamp = struct.unpack(">I", await self._read(4))[0]
            if fmt == 0:
                state.timestamp = stamp
            else:
                state.timestamp = (state.timestamp + stamp) & 0xFFFFFFFF
            # A type-3 chunk starting a message after a type-0 one repeats its timestamp as the delta.
            state.delta = stamp
        want = min(self.chunk_size, state.length - len(state.body))
        if want > 0:
            state.body += await self._read(want)
        if len(state.body) < state.length:
            return None
        message = Message(state.type_id, state.stream_id, state.timestamp, bytes(state.body))
        state.body.clear()
        return message


def encode_message(csid: int, message: Message, chunk_size: int) -> bytes:
    """One message as chunks: a type-0 header, then type-3 continuation headers."""
    if csid < 2 or csid > 63:
        raise ValueError("chunk stream ids 2-63 only")
    timestamp = message.timestamp & 0xFFFFFFFF
    extended = timestamp >= _EXTENDED
    stamp = _EXTENDED if extended else timestamp
    parts = [
        bytes([csid]),
        stamp.to_bytes(3, "big"),
        len(message.payload).to_bytes(3, "big"),
        bytes([message.type_id]),
        struct.pack("<I", message.stream_id),
    ]
    extra = struct.pack(">I", timestamp) if extended else b""
    parts.append(extra)
    payload = message.payload
    parts.append(payload[:chunk_size])
    for offset in range(chunk_size, len(payload), chunk_size):
        parts += [bytes([0xC0 | csid]), extra, payload[offset : offset + chunk_size]]
    return b"".join(parts)


def control_message(type_id: int, payload: bytes) -> Message:
    return Message(type_id, 0, 0, payload)


def set_chunk_size(size: int) -> Message:
    return control_message(SET_CHUNK_SIZE, struct.pack(">I", size))


def window_ack_size(size: int) -> Message:
    return control_message(WINDOW_ACK_SIZE, struct.pack(">I", size))


def set_peer_bandwidth(size: int) -> Message:
    return control_message(SET_PEER_BANDWIDTH, struct.pack(">IB", size, 2))


def acknowledgement(sequence: int) -> Message:
    return control_message(ACKNOWLEDGEMENT, struct.pack(">I", sequence & 0xFFFFFFFF))


def user_control(event: int, stream_id: int) -> Message:
    return control_message(USER_CONTROL, struct.pack(">HI", event, stream_id))


# ------------------------------------------------------------------------------------------ AMF0


class EcmaArray(dict[str, Any]):
    """An AMF0 ECMA array (what onMetaData carries), encoded as such rather than as an object."""


_NUMBER, _BOOLEAN, _STRING, _OBJECT, _NULL, _UNDEFINED = 0, 1, 2, 3, 5, 6
_REFERENCE, _ECMA_ARRAY, _OBJECT_END, _STRICT_ARRAY, _DATE, _LONG_STRING = 7, 8, 9, 10, 11, 12
_MAX_DEPTH: Final = 32


def amf0_encode(*values: Any) -> bytes:
    out = bytearray()
    for value in values:
        _encode(out, value)
    return bytes(out)


def _encode_key(out: bytearray, key: str) -> None:
    raw = key.encode()
    out += struct.pack(">H", len(raw)) + raw


def _encode(out: bytearray, value: Any) -> None:
    if value is None:
        out.append(_NULL)
    elif isinstance(value, bool):
        out += bytes([_BOOLEAN, int(value)])
    elif isinstance(value, int | float):
        out.append(_NUMBER)
        out += struct.pack(">d", float(value))
    elif isinstance(value, str):
        raw = value.encode()
        if len(raw) <= 0xFFFF:
            out.append(_STRING)
            out += struct.pack(">H", len(raw)) + raw
        else:
            out.append(_LONG_STRING)
            out += struct.pack(">I", len(raw)) + raw
    elif isinstance(value, dict):
        if isinstance(value, EcmaArray):
            out.append(_ECMA_ARRAY)
            out += struct.pack(">I", len(value))
        else:
            out.append(_OBJECT)
        for key, item in value.items():
            _encode_key(out, str(key))
            _encode(out, item)
        out += b"\x00\x00" + bytes([_OBJECT_END])
    elif isinstance(value, list | tuple):
        out.append(_STRICT_ARRAY)
        out += struct.pack(">I", len(value))
        for item in value:
            _encode(out, item)
    else:
        raise TypeError(f"cannot encode {type(value).__name__} as AMF0")


def amf0_decode(data: bytes) -> list[Any]:
    """Every value of a command or data message body; RtmpError when it is not AMF0."""
    values: list[Any] = []
    position = 0
    try:
        while position < len(data):
            value, position = _decode(data, position, 0)
            values.append(value)
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise RtmpError(f"malformed AMF0: {exc}") from exc
    return values


def _decode_key(data: bytes, position: int) -> tuple[str, int]:
    (length,) = struct.unpack_from(">H", data, position)
    start = position + 2
    if start + length > len(data):
        raise RtmpError("truncated AMF0 key")
    return data[start : start + length].decode("utf-8", "replace"), start + length


def _decode_properties(data: bytes, position: int, depth: int, into: dict[str, Any]) -> int:
    while True:
        if data[position : position + 3] == b"\x00\x00\x09":
            return position + 3
        if position + 3 > len(data):
            return len(data)  # some encoders leave out the end marker of the last object
        key, position = _decode_key(data, position)
        into[key], position = _decode(data, position, depth + 1)


def _decode(data: bytes, position: int, depth: int) -> tuple[Any, int]:
    if depth > _MAX_DEPTH:
        raise RtmpError("AMF0 nested too deep")
    marker = data[position]
    position += 1
    if marker == _NUMBER:
        return struct.unpack_from(">d", data, position)[0], position + 8
    if marker == _BOOLEAN:
        return data[position] != 0, position + 1
    if marker in (_STRING, _LONG_STRING):
        size_format, size_bytes = (">H", 2) if marker == _STRING else (">I", 4)
        (length,) = struct.unpack_from(size_format, data, position)
        start = position + size_bytes
        if start + length > len(data):
            raise RtmpError("truncated AMF0 string")
        return data[start : start + length].decode("utf-8", "replace"), start + length
    if marker in (_OBJECT, _ECMA_ARRAY):
        found: dict[str, Any] = {} if marker == _OBJECT else EcmaArray()
        if marker == _ECMA_ARRAY:
            position += 4  # the count is a hint; the end marker ends it
        return found, _decode_properties(data, position, depth, found)
    if marker in (_NULL, _UNDEFINED):
        return None, position
    if marker == _REFERENCE:
        return None, position + 2
    if marker == _STRICT_ARRAY:
        (count,) = struct.unpack_from(">I", data, position)
        position += 4
        items = []
        for _ in range(count):
            item, position = _decode(data, position, depth + 1)
            items.append(item)
        return items, position
    if marker == _DATE:
        return struct.unpack_from(">d", data, position)[0], position + 10
    raise RtmpError(f"unsupported AMF0 type {marker}")
