"""The output rule: the guest's packets wait for the backup's acknowledgement.

Paper section 2.2: "the primary VM may not send an output to the external
world until the backup VM has received and acknowledged the log entry
associated with the operation producing the output."  Then a backup that takes
over has everything it needs to reach the same output, so the outside world
never sees an output the backup could contradict.

Every frame the primary's guest sends is stamped with an instruction count at
least as late as the instruction that produced it and held here.  The stamp
is the icount of the log event QEMU writes before it sends the frame, found
in the log after a flush on request (`PrimaryController._sent_by_now`,
`log_flush.py`).  When an ACK says the backup has the log up to icount N (and
could go live there), every held frame stamped <= N is released, in order.  The
backup's gate stays shut: its guest's output is never released (QEMU's
filter-replay drops it already).

A primary whose backup failed, and that won the test-and-set, opens the gate
for good (`open()`): everything held leaves, and from then on every frame
leaves at once.

Each release is written to an audit trail (JSON lines) with the stamp and the
acknowledged icount that released it, so the rule can be checked afterwards.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .events import CappedJsonLines
from .status import Histogram

HOLD_BOUNDS_MS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
AUDIT_MAX_BYTES = 64 << 20  # ~150 bytes a frame: the newest ~400k frames, in two files


@dataclass
class HeldFrame:
    seq: int
    data: bytes
    stamp: int  # icount at or after the instruction that produced the frame
    held_at: float  # time.monotonic() when the guest's frame reached the gate
    stamped_at: float  # time.monotonic() when it got its stamp


class OutputGate:
    def __init__(self, release: Callable[[bytes], None], audit: Path | None = None,
                 audit_max_bytes: int = AUDIT_MAX_BYTES) -> None:
        self._release = release
        self._held: collections.deque[HeldFrame] = collections.deque()
        self._seq = 0
        self.acked = 0  # highest icount the backup has acknowledged
        self.is_open = False  # no backup to wait for: frames pass at once
        self.released = 0
        self.last_hold_ms = 0.0
        self.max_hold_ms = 0.0
        self.hold_ms = Histogram(HOLD_BOUNDS_MS)
        self._audit = CappedJsonLines(audit, audit_max_bytes) if audit else None

    @property
    def held(self) -> int:
        return len(self._held)

    def hold(self, data: bytes, stamp: int, held_at: float) -> None:
        """A frame from the guest, stamped; it leaves once the backup has `stamp`."""
        if self._held and stamp < self._held[-1].stamp and not self.is_open:
            raise ValueError(f"stamp {stamp} is older than the last held frame's")
        self._seq += 1
        self._held.append(HeldFrame(self._seq, data, stamp, held_at, time.monotonic()))
        self._drain()

    def acknowledged(self, icount: int) -> None:
        """The backup has the log up to `icount`: release what that covers."""
        if icount > self.acked:
            self.acked = icount
            self._drain()

    def open(self) -> None:
        """The primary runs alone: release everything, and hold nothing from now on."""
        self.is_open = True
        self._drain()

    def shut(self) -> None:
        """A new backup joined (`reprotect`): hold frames for its ACKs again."""
        self.is_open = False

    def _drain(self) -> None:
        while self._held and (self.is_open or self._held[0].stamp <= self.acked):
            frame = self._held.popleft()
            self._release(frame.data)
            now = time.monotonic()
            self.released += 1
            self.last_hold_ms = (now - frame.held_at) * 1000
            self.max_hold_ms = max(self.max_hold_ms, self.last_hold_ms)
            self.hold_ms.add(self.last_hold_ms)
            if self._audit:
                self._audit.write({
                    "time": round(time.time(), 6),
                    "seq": frame.seq, "stamp": frame.stamp, "acked": self.acked,
                    "open": self.is_open,
                    "bytes": len(frame.data), "hold_ms": round(self.last_hold_ms, 3),
                    "stamp_ms": round((frame.stamped_at - frame.held_at) * 1000, 3)})

    def close(self) -> None:
        if self._audit:
            self._audit.close()
            self._audit = None
