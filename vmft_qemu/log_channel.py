"""The logging channel: framed replay log from primary to backup, ACKs back.

The paper's primary and backup talk over a logging channel (section 2.1): the
primary sends log entries, the backup acknowledges them, and the output rule
waits for those acknowledgements.  Here the channel is one TCP connection,
primary -> backup, carrying frames:

    magic "VMFT" | version u8 | type u8 | flags u16 | seq u64 | offset u64 |
    icount u64 | length u32 | crc32 u32 | payload[length]

all big-endian; crc32 covers the header (with the crc field zero) and the
payload.  Each direction numbers its frames 0, 1, 2, ... per connection.  A LOG frame's `offset` is where its payload starts in the replay
log stream and `icount` the instruction count at its end; an ACK's `offset` and
`icount` are the highest the backup has received, contiguous from the start.

A receiver refuses any frame that is corrupt, truncated, duplicated or out of
order with a `FrameError` saying what happened; nothing of it reaches the
backup QEMU.  The backup then closes the connection and the primary resends
everything after the last ACK on a new one.
"""

from __future__ import annotations

import asyncio
import enum
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

MAGIC = b"VMFT"
PROTOCOL_VERSION = 2  # 2: STATE frames carry only a file's data extents; JOIN names its snapshot
HEADER = struct.Struct(">4sBBHQQQII")
MAX_PAYLOAD = 4 << 20
# An ACK carries the backup's replay position (offset and icount it has fed to
# its QEMU: what the QEMU has consumed of the pipe, to within stdio read-ahead)
# and the icount up to which it could go live: the last safe point it has
# received (`ReplayLogReader.safe_point`).  The output gate releases against that.
ACK_PAYLOAD = struct.Struct(">QQQ")
# The flag of a backup's first ACK when it is a standby with no VM state yet:
# the primary must join it (`reprotect`) before it can ship log.
ACK_STANDBY = 1
# A DIGEST: which of the guest's outbound frames (1, 2, ...) and its SHA-256.
DIGEST_PAYLOAD = struct.Struct(">Q32s")


class FrameType(enum.IntEnum):
    HELLO = 1  # primary -> backup: who I am, the log version (JSON payload)
    LOG = 2  # primary -> backup: replay log bytes
    ACK = 3  # backup -> primary: log received up to offset/icount
    HEARTBEAT = 4  # both ways: I am alive (payload: JSON status, optional)
    REFUSE = 5  # backup -> primary: a frame was refused (JSON reason); closes
    DIGEST = 6  # primary -> backup: SHA-256 of the n-th frame its guest sent out
    # Re-protection (`reprotect`): a new backup joins a VM running alone.
    JOIN = 7  # primary -> backup: the join point (offset, icount), epoch and state files
    STATE = 8  # primary -> backup: bytes of state file `icount` at position `offset`
    PROTECT = 9  # primary -> backup: output waits for ACKs again; frames it released
    #              alone reach up to `icount`, so go live only with the log up to there


class FrameError(Exception):
    """A frame that must not be used."""


class CorruptFrame(FrameError):
    pass


class TruncatedFrame(FrameError):
    pass


class DuplicateFrame(FrameError):
    pass


class OutOfOrderFrame(FrameError):
    pass


class ProtocolMismatch(FrameError):
    pass


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    seq: int
    offset: int = 0
    icount: int = 0
    payload: bytes = b""
    flags: int = 0

    def encode(self) -> bytes:
        header = HEADER.pack(MAGIC, PROTOCOL_VERSION, self.type, self.flags, self.seq,
                             self.offset, self.icount, len(self.payload), 0)
        crc = zlib.crc32(self.payload, zlib.crc32(header))
        return header[:-4] + struct.pack(">I", crc) + self.payload

    @property
    def end(self) -> int:
        """Log offset just past this LOG frame's payload."""
        return self.offset + len(self.payload)

    def json(self) -> dict[str, Any]:
        return json.loads(self.payload) if self.payload else {}

    def describe(self) -> str:
        return (f"{self.type.name} seq {self.seq} offset {self.offset} "
                f"icount {self.icount} length {len(self.payload)}")


def json_payload(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


def decode_header(header: bytes) -> tuple[FrameType, int, int, int, int, int, int]:
    """Validate a frame header; returns (type, flags, seq, offset, icount, length, crc)."""
    magic, version, ftype, flags, seq, offset, icount, length, crc = HEADER.unpack(header)
    if magic != MAGIC:
        raise CorruptFrame(f"not a vmft frame: magic {magic!r}, expected {MAGIC!r}")
    if version != PROTOCOL_VERSION:
        raise ProtocolMismatch(
            f"log channel protocol version {version}, this vmft speaks {PROTOCOL_VERSION}")
    try:
        ftype = FrameType(ftype)
    except ValueError:
        raise CorruptFrame(f"unknown frame type {ftype} (seq {seq})") from None
    if length > MAX_PAYLOAD:
        raise CorruptFrame(f"frame seq {seq} claims {length} payload bytes, limit {MAX_PAYLOAD}")
    return ftype, flags, seq, offset, icount, length, crc


def decode(data: bytes) -> Frame:
    """Decode one whole frame from bytes (exactly one frame)."""
    if len(data) < HEADER.size:
        raise TruncatedFrame(f"frame of {len(data)} bytes is shorter than its header ({HEADER.size})")
    ftype, flags, seq, offset, icount, length, crc = decode_header(data[:HEADER.size])
    payload = data[HEADER.size:]
    if len(payload) != length:
        raise TruncatedFrame(
            f"{ftype.name} frame seq {seq} has {len(payload)} of its {length} payload bytes")
    return _checked(ftype, flags, seq, offset, icount, payload, crc, data[:HEADER.size])


def _checked(ftype: FrameType, flags: int, seq: int, offset: int, icount: int,
             payload: bytes, crc: int, header: bytes) -> Frame:
    zeroed = header[:-4] + b"\0\0\0\0"
    actual = zlib.crc32(payload, zlib.crc32(zeroed))
    if actual != crc:
        raise CorruptFrame(
            f"{ftype.name} frame seq {seq} at log offset {offset}: checksum "
            f"{actual:#010x} does not match {crc:#010x}")
    return Frame(ftype, seq, offset, icount, payload, flags)


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    """Read and check one frame; EOFError on a clean close between frames."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            raise EOFError("log channel closed") from None
        raise TruncatedFrame(
            f"connection closed inside a frame header ({len(e.partial)} of {HEADER.size} bytes)"
        ) from None
    ftype, flags, seq, offset, icount, length, crc = decode_header(header)
    try:
        payload = await reader.readexactly(length)
    except asyncio.IncompleteReadError as e:
        raise TruncatedFrame(
            f"{ftype.name} frame seq {seq}: connection closed after {len(e.partial)} "
            f"of {length} payload bytes") from None
    return _checked(ftype, flags, seq, offset, icount, payload, crc, header)


@dataclass
class FrameOrder:
    """What a receiver expects next: the frame number and, for LOG, the offset."""

    next_seq: int = 0
    next_offset: int = 0

    def check(self, frame: Frame) -> None:
        if frame.seq < self.next_seq:
            raise DuplicateFrame(
                f"duplicate {frame.type.name} frame seq {frame.seq}: frames up to "
                f"{self.next_seq - 1} were already received")
        if frame.seq > self.next_seq:
            raise OutOfOrderFrame(
                f"out-of-order {frame.type.name} frame: expected seq {self.next_seq}, "
                f"got {frame.seq}")
        if frame.type == FrameType.LOG and frame.offset != self.next_offset:
            what = DuplicateFrame if frame.offset < self.next_offset else OutOfOrderFrame
            raise what(
                f"LOG frame seq {frame.seq} starts at log offset {frame.offset}, "
                f"expected {self.next_offset}")
        self.next_seq += 1
        if frame.type == FrameType.LOG:
            self.next_offset = frame.end


@dataclass
class Sender:
    """Numbers and writes frames on one connection."""

    writer: asyncio.StreamWriter
    seq: int = 0

    def frame(self, ftype: FrameType, offset: int = 0, icount: int = 0,
              payload: bytes = b"", flags: int = 0) -> Frame:
        """Number the next frame; `write` it (with others) in numbering order."""
        frame = Frame(ftype, self.seq, offset, icount, payload, flags)
        self.seq += 1
        return frame

    async def write(self, *frames: Frame) -> None:
        """Write `frames` in one piece: one send on the socket, not one each
        (each send on a TCP socket costs the sender the receiver's network
        stack too when both ends are on one machine)."""
        self.writer.write(b"".join(frame.encode() for frame in frames))
        await self.writer.drain()

    async def send(self, ftype: FrameType, offset: int = 0, icount: int = 0,
                   payload: bytes = b"", flags: int = 0) -> Frame:
        frame = self.frame(ftype, offset, icount, payload, flags)
        await self.write(frame)
        return frame
