"""The replay log: QEMU's record of every non-deterministic input.

This is the paper's "log entries" (section 2.1): QEMU in `rr=record` writes one
event per non-deterministic input (interrupt, clock read, packet, disk
completion, ...) and an instruction-count event before each of them, so a
replaying QEMU can deliver every input at exactly the same instruction.

The reader splits a byte stream of that log into complete events and knows the
instruction count (icount) at every event boundary.  It never guesses: a
partial event stays pending until its last byte has arrived, and an unknown
event kind or log version is an error.  The format follows QEMU's
`replay/replay-internal.h` for log version 0xe0200c (QEMU 7.2 to 10.0):
big-endian integers, arrays as a 4-byte length followed by the bytes.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

# Log versions this reader understands, with the QEMU releases that write them.
SUPPORTED_VERSIONS: dict[int, str] = {0xE0200C: "QEMU 7.2 .. 10.0"}
REPLAY_VERSION = 0xE0200C
# On a regular file QEMU writes a 12-byte header (version + 8 bytes of zero).
# On a pipe its seek fails and only events arrive; a replaying QEMU must then be
# sent just the 4 version bytes before the events (see qemu-rr-facts.md).
FILE_HEADER_SIZE = 12

# Event kinds of log version 0xe0200c (enum ReplayEvents).
INSTRUCTION = 0
INTERRUPT = 1
EXCEPTION = 2
ASYNC_FIRST, ASYNC_LAST = 3, 9  # BH, BH_ONESHOT, INPUT, INPUT_SYNC, CHAR_READ, BLOCK, NET
SHUTDOWN_FIRST, SHUTDOWN_LAST = 10, 21  # EVENT_SHUTDOWN + ShutdownCause
CHAR_WRITE = 22
CHAR_READ_ALL = 23
CHAR_READ_ALL_ERROR = 24
AUDIO_OUT = 25
AUDIO_IN = 26
RANDOM = 27
CLOCK_FIRST, CLOCK_LAST = 28, 29  # HOST, VIRTUAL_RT
CLOCK_VIRTUAL_RT = 29  # the clock icount warps follow: the guest's time base
CHECKPOINT_FIRST, CHECKPOINT_LAST = 30, 38
# Written by the recorder right after it has logged (and run) every pending
# async event (icount_account_warp_timer): a point where no device work is
# queued between the log and the guest.  See `ReplayLogReader.safe_point`.
CHECKPOINT_CLOCK_WARP_ACCOUNT = 31
CHECKPOINT_INIT, CHECKPOINT_RESET = 37, 38  # a QEMU's start: the machine's creation
ASYNC_BLOCK = 8
# A bottom half run by the vCPU thread as it logs it; virtio-net sends the
# guest's frames from one, so a frame leaves QEMU after this event is logged.
ASYNC_BH = 3
END = 39

_ASYNC_NAMES = ("BH", "BH_ONESHOT", "INPUT", "INPUT_SYNC", "CHAR_READ", "BLOCK", "NET")
_SHUTDOWN_CAUSES = (
    "none", "host-error", "host-qmp-quit", "host-qmp-system-reset", "host-signal",
    "host-ui", "guest-shutdown", "guest-reset", "guest-panic", "subsystem-reset",
    "snapshot-load", "max",
)
_CLOCK_NAMES = ("HOST", "VIRTUAL_RT")
_CHECKPOINT_NAMES = (
    "CLOCK_WARP_START", "CLOCK_WARP_ACCOUNT", "RESET_REQUESTED", "SUSPEND_REQUESTED",
    "CLOCK_VIRTUAL", "CLOCK_HOST", "CLOCK_VIRTUAL_RT", "INIT", "RESET",
)


class LogFormatError(ValueError):
    """The bytes are not a replay log this reader can follow."""


class LogVersionError(LogFormatError):
    """The log was written by a QEMU whose log version we do not know."""

    def __init__(self, found: int, expected: int = REPLAY_VERSION) -> None:
        known = ", ".join(f"{v:#x} ({q})" for v, q in SUPPORTED_VERSIONS.items())
        super().__init__(
            f"replay log version {found:#x} is not supported: this vmft reads "
            f"{expected:#x}; known versions: {known}"
        )
        self.found = found
        self.expected = expected


def check_version(version: int) -> None:
    """Refuse a log version we cannot parse."""
    if version not in SUPPORTED_VERSIONS:
        raise LogVersionError(version)


def version_bytes(version: int = REPLAY_VERSION) -> bytes:
    """The 4 bytes a replaying QEMU reads first from a pipe."""
    return struct.pack(">I", version)


def event_name(kind: int) -> str:
    """QEMU's name for an event kind (as in replay_event_name())."""
    if kind == INSTRUCTION:
        return "INSTRUCTION"
    if ASYNC_FIRST <= kind <= ASYNC_LAST:
        return "ASYNC_" + _ASYNC_NAMES[kind - ASYNC_FIRST]
    if SHUTDOWN_FIRST <= kind <= SHUTDOWN_LAST:
        return "SHUTDOWN_" + _SHUTDOWN_CAUSES[kind - SHUTDOWN_FIRST]
    if CLOCK_FIRST <= kind <= CLOCK_LAST:
        return "CLOCK_" + _CLOCK_NAMES[kind - CLOCK_FIRST]
    if CHECKPOINT_FIRST <= kind <= CHECKPOINT_LAST:
        return "CHECKPOINT_" + _CHECKPOINT_NAMES[kind - CHECKPOINT_FIRST]
    simple = {
        INTERRUPT: "INTERRUPT", EXCEPTION: "EXCEPTION", CHAR_WRITE: "CHAR_WRITE",
        CHAR_READ_ALL: "CHAR_READ_ALL", CHAR_READ_ALL_ERROR: "CHAR_READ_ALL_ERROR",
        AUDIO_OUT: "AUDIO_OUT", AUDIO_IN: "AUDIO_IN", RANDOM: "RANDOM", END: "END",
    }
    if kind in simple:
        return simple[kind]
    raise LogFormatError(f"unknown replay event kind {kind}")


@dataclass(frozen=True, slots=True)
class Event:
    """One complete event: where it lies in the log and the icount after it."""

    kind: int
    offset: int  # stream offset of its first byte
    end: int  # stream offset just past its last byte
    icount: int  # guest instructions executed when this event is replayed
    value: int | None = None  # instruction count or clock value, if any

    @property
    def name(self) -> str:
        return event_name(self.kind)


@dataclass(frozen=True, slots=True)
class DiskCompletions:
    """Which disk requests a log has completed so far (ASYNC_BLOCK events carry
    blkreplay's request id; QEMU numbers requests from 0 as they are issued,
    anew in a recording that loads a snapshot, so each log counts from 0)."""

    below: int = 0  # every request id below this one has completed
    above: frozenset[int] = frozenset()  # and these ones above it

    def add(self, request: int) -> "DiskCompletions":
        done, below = self.above | {request}, self.below
        while below in done:
            done, below = done - {below}, below + 1
        return DiskCompletions(below, done)

    def outstanding(self, beyond: int) -> list[int]:
        """Ids of requests that may be in flight, in the order they were issued:
        those below the highest completed id that have not completed (all were
        issued), then `beyond` ids after it (some may never have been)."""
        top = max(self.above, default=self.below - 1)
        return [i for i in range(self.below, top) if i not in self.above] + \
            list(range(top + 1, top + 1 + beyond))


# --- payload sizes -------------------------------------------------------------
# A kind's payload size is an int when fixed, else a sizer: a function giving
# the size from the payload's first bytes (at `pos`), or None if more are needed.

_Sizer = Callable[[bytes, int], "int | None"]


def _u32(buf: bytes, pos: int) -> int | None:
    if pos + 4 > len(buf):
        return None
    return int.from_bytes(buf[pos:pos + 4], "big")


def _u64(buf: bytes, pos: int) -> int | None:
    if pos + 8 > len(buf):
        return None
    return int.from_bytes(buf[pos:pos + 8], "big")


def _array_after(prefix: int) -> _Sizer:
    """`prefix` fixed bytes, then a 4-byte length and that many bytes."""

    def size(buf: bytes, pos: int) -> int | None:
        length = _u32(buf, pos + prefix)
        return None if length is None else prefix + 4 + length

    return size


# Input event payloads (replay-input.c) by InputEventKind.
_INPUT_SIZES = {1: 5, 2: 12, 3: 12, 4: 32}  # btn, rel, abs, mtt
_KEY_SIZES = {0: 9, 1: 5}  # KeyValueKind number, qcode


def _input_size(buf: bytes, pos: int) -> int | None:
    kind = _u32(buf, pos)
    if kind is None:
        return None
    if kind == 0:  # key: key type, then its value and a down byte
        key_type = _u32(buf, pos + 4)
        if key_type is None:
            return None
        if key_type not in _KEY_SIZES:
            raise LogFormatError(f"unknown key value kind {key_type} in input event")
        return 8 + _KEY_SIZES[key_type]
    if kind not in _INPUT_SIZES:
        raise LogFormatError(f"unknown input event kind {kind}")
    return 4 + _INPUT_SIZES[kind]


def _audio_in_size(buf: bytes, pos: int) -> int | None:
    recorded = _u64(buf, pos)
    return None if recorded is None else 16 + 16 * recorded


_ASYNC_SIZES: tuple[int | _Sizer, ...] = (
    8,  # BH: id
    8,  # BH_ONESHOT: id
    _input_size,  # INPUT
    0,  # INPUT_SYNC
    _array_after(1),  # CHAR_READ: chardev id, data
    8,  # BLOCK: request id
    _array_after(5),  # NET: filter id, flags, packet
)


def _payload_size(kind: int) -> int | _Sizer:
    if kind == INSTRUCTION:
        return 4
    if ASYNC_FIRST <= kind <= ASYNC_LAST:
        return _ASYNC_SIZES[kind - ASYNC_FIRST]
    if CLOCK_FIRST <= kind <= CLOCK_LAST:
        return 8
    if (kind in (INTERRUPT, EXCEPTION, END)
            or SHUTDOWN_FIRST <= kind <= SHUTDOWN_LAST
            or CHECKPOINT_FIRST <= kind <= CHECKPOINT_LAST):
        return 0
    others: dict[int, int | _Sizer] = {
        CHAR_WRITE: 8,
        CHAR_READ_ALL: _array_after(0),
        CHAR_READ_ALL_ERROR: 4,
        AUDIO_OUT: 8,
        AUDIO_IN: _audio_in_size,
        RANDOM: _array_after(4),
    }
    return others[kind]


# For the scanning loop: each byte value's fixed payload size, or VARIABLE
# (ask _SIZERS) or UNKNOWN (no such event kind).
VARIABLE, UNKNOWN = -1, -2
_SIZES = [_payload_size(k) for k in range(END + 1)]
_FIXED: tuple[int, ...] = tuple(
    s if isinstance(s, int) else VARIABLE for s in _SIZES) + (UNKNOWN,) * (255 - END)
_SIZERS: dict[int, _Sizer] = {k: s for k, s in enumerate(_SIZES) if not isinstance(s, int)}


class ReplayLogReader:
    """Incremental splitter of a replay log stream into complete events.

    `split()` takes bytes as they arrive and returns the bytes of the events
    they complete.  `offset` is the stream offset just past the last complete
    event, `icount` the instruction count there, `pending` the bytes of an
    event still incomplete, `clock` the last guest clock (VIRTUAL_RT, ns) read
    and the offset just past it, `shutdown` the first shutdown event's
    cause, `disk` the disk requests completed (`disk_at_safe_point`: as
    of the safe point, the last CHECKPOINT_CLOCK_WARP_ACCOUNT), and
    `bh_icount` the icount of the last ASYNC_BH event (the output gate's
    stamp).  After the END event the stream is over (QEMU may append its 4
    version bytes there when it finishes writing to a pipe).
    """

    def __init__(self, offset: int = 0, icount: int = 0) -> None:
        self.offset = offset
        self.icount = icount
        self.ended = False
        self.events_seen = 0
        self.clock: tuple[int, int] | None = None  # (offset after it, ns)
        self.shutdown: str | None = None
        self.safe_point = (offset, icount)
        self.bh_icount = icount
        self.disk = DiskCompletions()  # up to `offset`
        self.disk_at_safe_point = self.disk
        self._pending = b""

    @property
    def pending(self) -> bytes:
        return self._pending

    def feed(self, data: bytes) -> list[Event]:
        """Take `data`; return the events it completes."""
        events: list[Event] = []
        self.split(data, events=events)
        return events

    def split(self, data: bytes, whole: bool = False, icount: int | None = None,
              events: list[Event] | None = None) -> bytes:
        """Take `data`; return the bytes of the events it completes.

        With `whole`, `data` must end on an event boundary; with `icount`, the
        instruction count there must be that; with `events`, every complete
        event is appended to it.  Nothing changes if it raises.
        """
        buf = self._pending + data if self._pending else bytes(data)
        fixed, base = _FIXED, self.offset
        pos, n, count, seen = 0, len(buf), self.icount, 0
        clock, shutdown, ended, safe = self.clock, self.shutdown, self.ended, self.safe_point
        disk, safe_disk, bh = self.disk, self.disk_at_safe_point, self.bh_icount
        while pos < n and not ended:
            kind = buf[pos]
            size = fixed[kind]
            if size < 0:
                if size == UNKNOWN:
                    raise LogFormatError(
                        f"unknown replay event kind {kind} at log offset {base + pos}")
                size = _SIZERS[kind](buf, pos + 1)
                if size is None:
                    break
            end = pos + 1 + size
            if end > n:
                break
            value = None
            if kind == INSTRUCTION:
                value = (buf[pos + 1] << 24) | (buf[pos + 2] << 16) | (buf[pos + 3] << 8) | buf[pos + 4]
                count += value
            elif kind == CLOCK_VIRTUAL_RT:
                value = int.from_bytes(buf[pos + 1:end], "big", signed=True)
                clock = (base + end, value)
            elif kind == CHECKPOINT_CLOCK_WARP_ACCOUNT:
                safe, safe_disk = (base + end, count), disk
            elif kind == ASYNC_BLOCK:
                disk = disk.add(int.from_bytes(buf[pos + 1:end], "big"))
            elif kind == ASYNC_BH:
                bh = count
            elif kind >= SHUTDOWN_FIRST:
                if kind <= SHUTDOWN_LAST and shutdown is None:
                    shutdown = _SHUTDOWN_CAUSES[kind - SHUTDOWN_FIRST]
                ended = kind == END
            if events is not None:
                if kind == CLOCK_FIRST:
                    value = int.from_bytes(buf[pos + 1:end], "big", signed=True)
                events.append(Event(kind, base + pos, base + end, count, value))
            seen += 1
            pos = end
        if whole and pos != n and not ended:
            raise LogFormatError(
                f"log data ends inside an event at offset {base + pos} ({n - pos} bytes left over)")
        if icount is not None and count != icount:
            raise LogFormatError(
                f"log data ends at icount {count}, but its frame says {icount}")
        self.offset, self.icount, self.ended = base + pos, count, ended
        self.clock, self.shutdown, self.safe_point = clock, shutdown, safe
        self.disk, self.disk_at_safe_point, self.bh_icount = disk, safe_disk, bh
        self._pending = b"" if ended else buf[pos:]
        self.events_seen += seen
        return buf[:pos]


def instruction_event(count: int) -> bytes:
    """An INSTRUCTION event: run `count` more instructions.  With count 0 a
    replaying QEMU never finishes it and never reads the log again: the guest
    stays frozen where it is while QMP keeps answering."""
    return struct.pack(">BI", INSTRUCTION, count)


def block_completion(request: int) -> bytes:
    """An ASYNC BLOCK event: disk request `request` completes.  A replaying QEMU
    waits until that request's own completion is queued; for a request it
    never issued, it waits for good."""
    return struct.pack(">BQ", ASYNC_BLOCK, request)


def read_file_header(header: bytes) -> int:
    """Check a log file's 12-byte header; returns its version."""
    if len(header) < FILE_HEADER_SIZE:
        raise LogFormatError(f"replay log file too short for its header ({len(header)} bytes)")
    version = int.from_bytes(header[:4], "big")
    check_version(version)
    return version


def iter_file_events(path: Path, chunk: int = 1 << 16) -> Iterator[Event]:
    """All complete events of a recorded log file (QEMU's on-disk format)."""
    with open(path, "rb") as f:
        read_file_header(f.read(FILE_HEADER_SIZE))
        reader = ReplayLogReader()
        while data := f.read(chunk):
            yield from reader.feed(data)


# --- QEMU's replay state inside a snapshot -------------------------------------------

# How savevm writes QEMU's "replay" vmstate section (replay/replay-snapshot.c,
# version 3): a full-section header (kind 4, section id, name, instance 0,
# version 3), the ReplayState fields, a footer (0x7e, the section id).
_STATE_NAME = b"\x06replay" + struct.pack(">II", 0, 3)
_STATE_SECTION, _STATE_FOOTER = 0x04, 0x7E
# cached_clock[2], current_icount, instruction_count, current_event, data_kind,
# has_unread_data, file_offset, block_request_id, read_event_id
_STATE_FIELDS = struct.Struct(">qqQiIIBQQq")
_NO_KIND = 0xFFFFFFFF  # data_kind when nothing was read ahead


def forget_read_ahead(snapshots: Path) -> int:
    """Rewrite every replay state in a snapshot drive file as a recording saves
    it: no log event read ahead, no clock value cached, no event counted.
    The icount and the counters a recording resets when it loads stay.

    A snapshot a replaying QEMU saved holds the event it had read ahead (at
    go-live: the stop tail's disk completion for a request it never issued)
    as its own.  A recording that loads such a snapshot carries that on
    into every snapshot it saves later, and a replay that loads one of those
    waits for that event forever (a join after a go-live: `reprotect`).
    No QEMU may have the file open.  Returns how many sections were rewritten."""
    rewritten = 0
    with open(snapshots, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        at = m.find(_STATE_NAME)
        while at >= 0:
            fields = at + len(_STATE_NAME)
            footer = fields + _STATE_FIELDS.size
            section_id = m[at - 4:at]
            if at >= 5 and footer + 5 <= len(m) and m[at - 5] == _STATE_SECTION \
                    and m[footer] == _STATE_FOOTER and m[footer + 1:footer + 5] == section_id:
                _, _, icount, count, _, _, _, offset, request, _ = _STATE_FIELDS.unpack_from(m, fields)
                _STATE_FIELDS.pack_into(m, fields, 0, 0, icount, count, 0, _NO_KIND, 0,
                                        offset, request, -1)
                rewritten += 1
            at = m.find(_STATE_NAME, at + 1)
    return rewritten
