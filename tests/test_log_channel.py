"""The log channel: every damaged frame is refused with a clear error, and so is
a returning backup whose log the primary never sent."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from vmft_qemu import config as cfg
from vmft_qemu import log_channel as lc
from vmft_qemu.images import GuestImage
from vmft_qemu.primary import ChannelRefused, PrimaryController, Segment


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


def test_a_backup_claiming_log_the_primary_never_sent_is_refused(tmp_path: Path) -> None:
    """A returning backup says how much log it has; an offset that is not a
    point of the primary's log (mid-event, or past what was recorded) means the
    two logs differ, so it is refused before its ACK releases any output."""
    config = cfg.from_dict({"primary": {"run_dir": str(tmp_path / "p")},
                            "backup": {"run_dir": str(tmp_path / "b")}})
    primary = PrimaryController(config, GuestImage(Path("/k"), Path("/i"), Path("/r")))
    primary.retained.append(Segment(0, bytes(10), 5))
    primary.retained.append(Segment(10, bytes(23), 9))
    primary.reader.offset = 33

    async def backup_says(offset: int) -> None:
        async def backup(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            assert (await lc.read_frame(reader)).type == lc.FrameType.HELLO
            await lc.Sender(writer).send(lc.FrameType.ACK, offset, 0,
                                         lc.ACK_PAYLOAD.pack(offset, 0, 7))
        server = await asyncio.start_server(backup, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                await primary._session(reader, writer, ("127.0.0.1", port))
            finally:
                writer.close()
        finally:
            server.close()

    for claimed in (20, 40):
        with pytest.raises(ChannelRefused, match=f"offset {claimed}, which is no event boundary"):
            asyncio.run(backup_says(claimed))
        assert primary.acked.offset == 0 and primary.retained.nbytes == 33
        assert primary.state != "protected"
    # A boundary is fine: the session starts (and ends when that backup hangs up).
    with pytest.raises((EOFError, lc.FrameError, OSError)):
        asyncio.run(backup_says(10))
    assert primary.acked.offset == 10 and primary.retained.nbytes == 23
