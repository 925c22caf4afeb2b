"""The divergence check: the backup's replay must send what the primary sent.

Beyond VMware FT, which trusts deterministic replay: the primary sends the
SHA-256 of every frame its guest put on the LAN, numbered in order, over the
log channel; the backup hashes every frame its own replaying guest produces
(they are dropped, never sent) and compares the n-th with the n-th.  A
mismatch means the two executions differ: the backup could not take over
faithfully.  It is reported loudly, in the status and the event log.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Callable

from .events import emit

log = logging.getLogger(__name__)


class DivergenceCheck:
    def __init__(self, icount: Callable[[], int] = lambda: 0) -> None:
        """`icount()`: where the backup's replay stands, for the event log."""
        self._icount = icount
        self._primary: dict[int, bytes] = {}
        self._backup: dict[int, bytes] = {}
        self.backup_frames = 0
        self.compared = 0
        self.divergences = 0
        self.last: str | None = None

    def primary_sent(self, seq: int, digest: bytes) -> None:
        self._primary[seq] = digest
        self._compare(seq)

    def backup_produced(self, frame: bytes) -> None:
        self.backup_frames += 1
        self._backup[self.backup_frames] = hashlib.sha256(frame).digest()
        self._compare(self.backup_frames)

    def _compare(self, seq: int) -> None:
        if seq not in self._primary or seq not in self._backup:
            return
        ours, theirs = self._backup.pop(seq), self._primary.pop(seq)
        self.compared += 1
        if ours != theirs:
            self.divergences += 1
            self.last = (f"outbound frame {seq}: primary sent {theirs.hex()[:16]}, "
                         f"backup's replay produced {ours.hex()[:16]}")
            emit(log, "divergence", logging.ERROR, seq=seq, primary=theirs.hex(),
                 backup=ours.hex(), icount=self._icount(), reason=self.last)

    def snapshot(self) -> dict[str, object]:
        return {"compared": self.compared, "divergences": self.divergences,
                "last": self.last, "backup_frames": self.backup_frames}
