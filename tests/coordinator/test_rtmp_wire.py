"""The RTMP chunk stream and AMF0 without a network: what ffmpeg and OBS send, byte for byte."""

from __future__ import annotations

import asyncio
import struct

import pytest

from tuberunner.coordinator import rtmp_wire as wire


def _reader(data: bytes) -> wire.ChunkReader:
    stream = asyncio.StreamReader()
    stream.feed_data(data)
    stream.feed_eof()
    return wire.ChunkReader(stream)


def test_amf0_round_trip_of_a_connect_command_and_metadata() -> None:
    metadata = wire.EcmaArray(width=854.0, height=480.0, framerate=25.0, encoder="Lavf")
    values = ["connect", 1.0, {"app": "live", "tcUrl": "rtmp://h/live", "fpad": False}, None, metadata]
    decoded = wire.amf0_decode(wire.amf0_encode(*values))
    assert decoded == values
    assert isinstance(decoded[4], wire.EcmaArray)
    long = "x" * 70_000
    assert wire.amf0_decode(wire.amf0_encode(long, [1.0, "a"])) == [long, [1.0, "a"]]


@pytest.mark.parametrize("garbage", [b"\x02\x00\x05ab", b"\x0d", b"\x03\x00\x01a", b"\x0a\x00\x00\x00\x05"])
def test_malformed_amf0_is_a_protocol_error(garbage: bytes) -> None:
    with pytest.raises(wire.RtmpError):
        wire.amf0_decode(garbage)


async def test_interleaved_messages_extended_timestamps_and_chunk_size_changes() -> None:
    video = wire.Message(wire.VIDEO, 1, 0x01000000, bytes(range(256)) * 3)  # extended timestamp, 6 chunks
    audio = wire.Message(wire.AUDIO, 1, 40, b"a" * 100)
    encoded_video = wire.encode_message(6, video, 128)
    chunks = [encoded_video[: 12 + 4 + 128], encoded_video[12 + 4 + 128 :]]
    data = chunks[0] + wire.encode_message(4, audio, 128) + chunks[1]
    data += wire.encode_message(2, wire.set_chunk_size(4096), 128)
    big = wire.Message(wire.VIDEO, 1, 0x01000010, b"v" * 5000)
    data += wire.encode_message(6, big, 4096)
    reader = _reader(data)
    got = [await reader.read_message() for _ in range(4)]
    assert got[0] == audio
    assert got[1] == video
    assert got[2].type_id == wire.SET_CHUNK_SIZE
    assert reader.chunk_size == 4096
    assert got[3] == big
    assert reader.bytes_read == len(data)


async def test_type_1_2_3_headers_add_deltas_as_ffmpeg_writes_them() -> None:
    # fmt 0 at t=1000, then fmt 1 (+40, new length), fmt 2 (+40), fmt 3 (+40 again) on csid 4.
    first = wire.encode_message(4, wire.Message(wire.AUDIO, 1, 1000, b"aa"), 128)
    fmt1 = bytes([0x40 | 4]) + (40).to_bytes(3, "big") + (3).to_bytes(3, "big") + bytes([wire.AUDIO]) + b"bbb"
    fmt2 = bytes([0x80 | 4]) + (40).to_bytes(3, "big") + b"ccc"
    fmt3 = bytes([0xC0 | 4]) + b"ddd"
    reader = _reader(first + fmt1 + fmt2 + fmt3)
    stamps = [(m.timestamp, m.payload) for m in [await reader.read_message() for _ in range(4)]]
    assert stamps == [(1000, b"aa"), (1040, b"bbb"), (1080, b"ccc"), (1120, b"ddd")]


async def test_a_chunk_stream_starting_without_a_full_header_or_a_huge_message_is_refused() -> None:
    with pytest.raises(wire.RtmpError):
        await _reader(bytes([0x40 | 5]) + b"\x00" * 7).read_message()
    huge = (
        bytes([3]) + b"\x00\x00\x00" + (wire.MAX_MESSAGE_BYTES + 1).to_bytes(3, "big") + b"\x09" + b"\x00" * 4
    )
    with pytest.raises(wire.RtmpError):
        await _reader(huge).read_message()
    many = b"".join(
        bytes([0, i]) + b"\x00\x00\x00" + (200).to_bytes(3, "big") + b"\x09" + b"\x00" * 4 + b"x" * 128
        for i in range(wire.MAX_CHUNK_STREAMS + 1)
    )
    reader = _reader(many)
    with pytest.raises(wire.RtmpError, match="chunk streams"):
        await reader.read_message()
    with pytest.raises(asyncio.IncompleteReadError):
        await _reader(
            wire.encode_message(3, wire.Message(wire.VIDEO, 1, 0, b"x" * 300), 128)[:200]
        ).read_message()


async def test_the_server_handshake_echoes_c1_and_waits_for_c2() -> None:
    c1 = struct.pack(">II", 7, 0) + bytes(range(256)) * 6
    c1 = c1[: wire.HANDSHAKE_BYTES]
    server_in = asyncio.StreamReader()
    server_in.feed_data(bytes([3]) + c1 + b"\x00" * wire.HANDSHAKE_BYTES)
    written = bytearray()

    class Writer:
        def write(self, data: bytes) -> None:
            written.extend(data)

        async def drain(self) -> None:
            return None

    await wire.server_handshake(server_in, Writer())  # type: ignore[arg-type]
    assert written[0] == 3
    s1 = written[1 : 1 + wire.HANDSHAKE_BYTES]
    assert s1[4:8] == b"\x00\x00\x00\x00"  # plain handshake: clients skip the digest check
    assert bytes(written[1 + wire.HANDSHAKE_BYTES :]) == c1
    bad = asyncio.StreamReader()
    bad.feed_data(bytes([6]) + c1)
    with pytest.raises(wire.RtmpError):
        await wire.server_handshake(bad, Writer())  # type: ignore[arg-type]
