"""The log channel's frames: every damaged frame is refused with a clear error."""

from __future__ import annotations

import asyncio

import pytest

from vmft_qemu import log_channel as lc


def _log(seq: int, offset: int, data: bytes = b"\x00\x00\x00\x00\x10") -> lc.Frame:
    return lc.Frame(lc.FrameType.LOG, seq, offset, 16, data)


def test_round_trip_keeps_every_field() -> None:
    frame = _log(7, 4096, b"abc" * 100)
    assert lc.decode(frame.encode()) == frame


def test_flipped_payload_byte_is_a_checksum_error() -> None:
    raw = bytearray(_log(3, 0).encode())
    raw[-1] ^= 0x40
    with pytest.raises(lc.CorruptFrame, match="LOG frame seq 3 at log offset 0: checksum"):
        lc.decode(bytes(raw))


def test_bad_magic_and_protocol_version_are_refused() -> None:
    raw = _log(1, 0).encode()
    with pytest.raises(lc.CorruptFrame, match="not a vmft frame"):
        lc.decode(b"XXXX" + raw[4:])
    with pytest.raises(lc.ProtocolMismatch, match="protocol version 9"):
        lc.decode(raw[:4] + b"\x09" + raw[5:])


def test_short_frame_is_truncated() -> None:
    raw = _log(1, 0, b"x" * 50).encode()
    with pytest.raises(lc.TruncatedFrame, match="has 10 of its 50 payload bytes"):
        lc.decode(raw[:-40])


def test_duplicate_and_out_of_order_frames_are_refused() -> None:
    order = lc.FrameOrder()
    order.check(lc.Frame(lc.FrameType.HELLO, 0))
    order.check(_log(1, 0))
    with pytest.raises(lc.DuplicateFrame, match="duplicate LOG frame seq 1"):
        order.check(_log(1, 0))
    with pytest.raises(lc.OutOfOrderFrame, match="expected seq 2, got 3"):
        order.check(_log(3, 5))
    with pytest.raises(lc.OutOfOrderFrame, match="starts at log offset 9, expected 5"):
        order.check(_log(2, 9))
    order.check(_log(2, 5))
    assert (order.next_seq, order.next_offset) == (3, 10)


def test_connection_closed_inside_a_frame_is_truncated() -> None:
    async def scenario() -> None:
        reader = asyncio.StreamReader()
        raw = _log(1, 0, b"y" * 100).encode()
        reader.feed_data(raw[:60])
        reader.feed_eof()
        with pytest.raises(lc.TruncatedFrame, match="closed after 20 of 100 payload bytes"):
            await lc.read_frame(reader)
        empty = asyncio.StreamReader()
        empty.feed_eof()
        with pytest.raises(EOFError):
            await lc.read_frame(empty)

    asyncio.run(scenario())
