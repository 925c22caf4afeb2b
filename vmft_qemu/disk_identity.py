"""Disks that stay identical: checking the paper's non-shared-disk mode.

Paper section 4.1, non-shared disks: each host keeps its own copy of the
VM's disk, and the backup VM executes every disk write to its own copy, so
the two stay in sync by replay alone.
Here each side's QEMU runs on its own qcow2 copy over the same base image,
through blkreplay, so disk completions are in the replay log.

The two copies never hold the same *file* bytes: cluster allocation, qcow2
metadata and internal snapshots (go-live's `savevm`) differ.  What must be the
same is what the guest sees: the bytes it would read from /dev/vda.  This
module reads those (`qemu-img convert -O raw`, read-only with `-U`, so a copy
a QEMU still has open can be read, optionally as of an internal snapshot),
digests them per MiB, and says where two copies differ.  On two real hosts,
each computes its digest and only the digests travel.

When to compare: a replica is behind its primary, so two live copies differ
by the writes in between.  Compare after both QEMUs have stopped (a clean
shutdown replays to the same end), or compare the snapshot a replay was
frozen at (go-live's) with the primary's copy as of the same point.  A copy
a running QEMU has open shows the guest's writes up to its last flush: qcow2
keeps the metadata of newly allocated clusters in memory until then, so the
file reads as a power cut would leave it.
"""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .machine import qemu_img

CHUNK = 1 << 20  # one digest per MiB locates a difference


class DiskReadError(RuntimeError):
    """A disk copy could not be read (missing file, not an image, no such snapshot)."""


@dataclass(frozen=True)
class DiskDigest:
    """The guest-visible content of one disk copy."""

    path: Path
    snapshot: str | None
    size: int
    sha256: str  # of all guest-visible bytes
    chunks: tuple[str, ...]  # sha256 of each CHUNK, in order

    def differing(self, other: "DiskDigest") -> list[tuple[int, int]]:
        """Byte ranges [start, end) whose content differs (a size difference counts)."""
        ranges: list[tuple[int, int]] = []
        longest = max(len(self.chunks), len(other.chunks))
        for i in range(longest):
            mine = self.chunks[i] if i < len(self.chunks) else None
            theirs = other.chunks[i] if i < len(other.chunks) else None
            if mine == theirs:
                continue
            start, end = i * CHUNK, min((i + 1) * CHUNK, max(self.size, other.size))
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((start, end))
        return ranges

    def to_json(self) -> dict[str, object]:
        return {"path": str(self.path), "snapshot": self.snapshot, "size": self.size,
                "sha256": self.sha256}


def _as_raw(disk: Path, snapshot: str | None, raw: Path) -> None:
    """Write the guest-visible bytes of `disk` (as of `snapshot`) to the file `raw`.

    convert needs a seekable target (it writes out of order and skips zeros),
    so the bytes go through a sparse temporary file, never a pipe."""
    if not disk.is_file():
        raise DiskReadError(f"no disk copy at {disk}")
    at = ["-l", f"snapshot.name={snapshot}"] if snapshot else []
    qemu_img("convert", "-U", "-O", "raw", *at, str(disk), str(raw), error=DiskReadError)


def digest(disk: Path, snapshot: str | None = None) -> DiskDigest:
    """Digest of what the guest sees on `disk` now, or as of internal `snapshot`."""
    whole = hashlib.sha256()
    chunks: list[str] = []
    size = 0
    with tempfile.TemporaryDirectory(prefix="vmft-disk-") as tmp:
        raw = Path(tmp) / "guest.raw"
        _as_raw(disk, snapshot, raw)
        with open(raw, "rb") as f:
            while block := f.read(CHUNK):
                whole.update(block)
                chunks.append(hashlib.sha256(block).hexdigest())
                size += len(block)
    return DiskDigest(disk, snapshot, size, whole.hexdigest(), tuple(chunks))


def guest_file(disk: Path, path: str, snapshot: str | None = None) -> bytes:
    """The contents of file `path` in the ext4 file system on `disk`, read on the
    host without mounting it (debugfs)."""
    with tempfile.TemporaryDirectory(prefix="vmft-disk-") as tmp:
        raw = Path(tmp) / "guest.raw"
        _as_raw(disk, snapshot, raw)
        proc = subprocess.run(["debugfs", "-R", f"cat {path}", str(raw)], capture_output=True)
    errors = [line for line in proc.stderr.decode(errors="replace").splitlines()
              if not line.startswith("debugfs ")]
    if proc.returncode != 0 or errors:
        raise DiskReadError(f"{path} on {disk}: {'; '.join(errors) or proc.returncode}")
    return proc.stdout
