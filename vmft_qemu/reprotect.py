"""Re-protection: a new backup joins a VM that runs alone.

Paper section 3.1 (FT VMotion): after a failure, "a new backup VM is started on
another host" by cloning the running primary: its state is taken with a short
pause, sent to the new host, and the logging channel carries on from exactly
that point.  QEMU can only replay from a snapshot it loaded the same way the
recording did (loading arms timers, e.g. virtio-net's announce timer, that a
recording which merely saved never had, and the replay then waits for clock
checkpoints the log does not have), so both sides start from the snapshot:

1. The primary stops its guest and `savevm vmft-join-N` (a new name for each
   join; the VM state into the snapshot drive, the disk's blocks into the
   disk), then replaces its QEMU.  Between the two QEMUs it deletes every
   other snapshot from both files (`drop_snapshots`): only there is that
   safe.  The new recording loads the join snapshot (`-loadvm`), saves it
   again as its record/replay start (`rrsnapshot`, which also resets the
   recording's counters, e.g. blkreplay's request ids, as the loading replay
   will have them) and waits (`-S`) until its controller reads its log from
   byte 0 and says `cont` (`save_join_snapshot`, `PrimaryController._restart_recording`).
   The new log counts on from the icount of the old recording's last event
   before the snapshot, not from the stop (`logged_icount`).  A primary that
   went live loads nothing of its replay's place in the log: go-live rewrote
   that in its snapshot (`go_live.hand_over`).
2. With the guest running, the state is shipped over the log channel
   (`ship_state`): the snapshot drive file as it is (nothing writes to it
   after the start; its holes stay home: `data_extents`), and the disk as of
   the snapshot, read from the running
   image without locking it (`qemu-img convert -U -l`), only the clusters that
   differ from the image's backing file.
3. The new backup starts its replaying QEMU with `rrsnapshot=vmft-join-N` and
   feeds it the new recording's log from byte 0.  One thing is asymmetric:
   the replay's snapshot load drops the event kind it had read ahead (the
   snapshot holds no usable log position: QEMU's `ftell` fails on the record
   pipe, so its load-time `fseek` does too, and it reads on).  The recording
   logged only the machine's creation before its load (`CREATION_EVENTS`,
   with the RTC on the virtual clock: `machine.command_line`), so a
   placeholder kind goes right after them (`LoadSplice`).
4. Once the backup has received the log up to the present, the primary holds
   its output for the backup's ACKs again and sends PROTECT with the icount
   up to which it released frames alone; the backup may go live only when it
   holds the log up to there.  From then on the pair is one generation: both
   sides race for the lock epoch after the one the primary holds.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, TypeVar

from qemu.qmp import QMPClient

from . import log_channel as lc
from .events import emit
from .machine import qemu_img, savevm
from .replay_log import (AUDIO_OUT, CHECKPOINT_INIT, CHECKPOINT_RESET, INSTRUCTION, SHUTDOWN_FIRST,
                         SHUTDOWN_LAST, Event)

log = logging.getLogger(__name__)
T = TypeVar("T")

JOIN_SNAPSHOT_NAME = re.compile(r"vmft-join-[0-9]+")
# What a recording started from a snapshot logs before it loads it: the
# machine's creation (QEMU's CHECKPOINT_INIT and CHECKPOINT_RESET).
CREATION_EVENTS = bytes([CHECKPOINT_INIT, CHECKPOINT_RESET])
# The event kind the replay reads ahead, and drops, as it loads the snapshot:
# one no device of ours consumes.
PLACEHOLDER_KIND = AUDIO_OUT
STATE_CHUNK = 1 << 20


class JoinError(RuntimeError):
    """The join could not be completed; the message says at which step."""


@dataclass(frozen=True)
class JoinPoint:
    """Where the new backup's replay starts, and what taking it cost."""

    snapshot: str  # the join snapshot both sides start from
    offset: int  # log offset the new backup's log starts at (the new recording's start)
    icount: int  # instruction count the new log counts from (`logged_icount`)
    pause_s: float  # the guest was stopped this long
    savevm_s: float  # of which the savevm
    restart_s: float  # and the new recording's start from the snapshot
    savevm_attempts: int

    def json(self) -> dict[str, float | str]:
        return {"snapshot": self.snapshot, "offset": self.offset, "icount": self.icount,
                "pause_s": round(self.pause_s, 4), "savevm_s": round(self.savevm_s, 4),
                "restart_s": round(self.restart_s, 4), "savevm_attempts": self.savevm_attempts}


def join_snapshot_name() -> str:
    """A name no snapshot in the VM's files has: `savevm` with a name that
    exists deletes the old snapshot first, which is not safe (`drop_snapshots`)."""
    return f"vmft-join-{time.time_ns()}"


async def save_join_snapshot(qmp: QMPClient, name: str,
                             timeout: float = 10.0) -> tuple[int, int]:
    """Step 1's first half: stop the guest and `savevm NAME`; the guest stays
    stopped.  Returns the icount it stopped at and the attempts taken
    (`machine.savevm`).  If it fails, the guest runs on alone."""
    try:
        return await savevm(qmp, name, timeout, JoinError)
    except JoinError:
        await qmp.execute("cont")
        raise


def drop_snapshots(files: list[Path], keep: str) -> int:
    """Between the old recording's exit and the new one's start: delete every
    snapshot but `keep` from the VM's files (the go-live snapshot, the last
    join's), so that the snapshot drive shipped holds one VM state and the
    next savevm reuses their clusters (measured: 0.13 s instead of 0.6 to
    0.8 s into a drive that still held the go-live snapshot).  Returns the
    snapshots deleted; a failure costs bytes, not the join, and is logged.

    Only a QEMU-less file is safe for this.  QEMU drains a disk before it
    deletes a snapshot on it (`delvm`, or `savevm` over an existing name),
    and under record/replay a disk request the host has completed waits in
    the replay queue until the vCPU logs it: the main loop waits for the
    vCPU, which waits for the main loop, and the guest stands still for
    good (seen: a join after a takeover, its `delvm vmft-go-live` on the
    running guest, hung with the go-live snapshot gone from the snapshot
    drive and still on the disk)."""
    dropped = 0
    for path in files:
        try:
            info = json.loads(qemu_img("info", "--output=json", str(path), error=JoinError))
            for snap in info.get("snapshots", []):
                if snap["name"] != keep:
                    qemu_img("snapshot", "-d", snap["name"], str(path), error=JoinError)
                    dropped += 1
        except (JoinError, ValueError) as e:
            emit(log, "stale-snapshots-kept", logging.WARNING, file=str(path), error=str(e))
    return dropped


def logged_icount(last_words: list[Event], stopped_at: int) -> int:
    """The icount the join snapshot's replay state stands at, from the old
    recording's last events (read after it exited).

    A recording counts each INSTRUCTION event from its previous event, and its
    snapshot keeps the icount of the last event before it, not the one the
    guest stopped at: the stopped guest logged nothing more until its
    shutdown, whose INSTRUCTION covers the gap.  A recording that loads the
    snapshot, and the replay of it, count on from there, so the new log's
    reader must too."""
    shutdown = next((i for i, e in enumerate(last_words)
                     if SHUTDOWN_FIRST <= e.kind <= SHUTDOWN_LAST), None)
    if shutdown is None:
        raise JoinError("the old recording ended without logging its shutdown: where its "
                        "snapshot's log position stands is unknown")
    before = last_words[shutdown - 1] if shutdown else None
    gap = before.value if before is not None and before.kind == INSTRUCTION else 0
    return stopped_at - gap


class LoadSplice:
    """Step 3's placeholder: put into the log a replay that loads the join
    snapshot is fed, right after the creation events (whose bytes it checks)."""

    def __init__(self) -> None:
        self._seen = 0  # bytes of CREATION_EVENTS passed so far

    def __call__(self, data: bytes) -> bytes:
        """`data`: the next bytes of the new recording's log, in order."""
        want = len(CREATION_EVENTS) - self._seen
        if want <= 0:
            return data
        head = data[:want]
        if head != CREATION_EVENTS[self._seen:self._seen + len(head)]:
            raise JoinError(f"the new recording's log starts with {bytes(head).hex()} where the "
                            f"machine's creation ({CREATION_EVENTS.hex()}) was expected")
        self._seen += len(head)
        if self._seen < len(CREATION_EVENTS):
            return data
        return head + bytes([PLACEHOLDER_KIND]) + data[want:]


# --- the state: files shipped to the new backup ------------------------------------

@dataclass(frozen=True)
class StateFile:
    name: str  # file name in the run directory
    path: Path  # where the sender reads it
    size: int
    sha256: str  # of all `size` bytes, holes read as zeros
    extents: tuple[tuple[int, int], ...]  # (offset, length) of its data: what travels

    @property
    def data(self) -> int:
        return sum(length for _, length in self.extents)


def data_extents(path: Path) -> tuple[tuple[int, int], ...]:
    """Where a sparse file holds data.  A snapshot drive is one: qcow2 punches
    a hole where a deleted snapshot was (`pass-discard-snapshot`), and a
    later snapshot fills only part of it, so the file can be twice the size
    of what it holds (measured after a takeover: 184 MB, 90 MB of data)."""
    extents = []
    with open(path, "rb") as f:
        fd, size, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:  # ENXIO: only a hole from pos to the end
                if e.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, end - start))
            pos = end
    return tuple(extents)


def export_disk(disk: Path, out: Path, snapshot: str) -> None:
    """The disk as of the join snapshot, read from the running image (-U), as a
    qcow2 on the same backing file holding only the clusters that differ."""
    info = json.loads(qemu_img("info", "-U", "--output=json", str(disk), error=JoinError))
    backing = ["-B", info["full-backing-filename"], "-F", info["backing-filename-format"]] \
        if info.get("full-backing-filename") else []
    out.unlink(missing_ok=True)
    qemu_img("convert", "-U", "-l", f"snapshot.name={snapshot}", "-O", "qcow2",
             *backing, str(disk), str(out), error=JoinError)


def adopt_disk(disk: Path, snapshot: str) -> None:
    """On the new backup: give the received disk the join snapshot `-loadvm`
    looks for in every drive (its blocks are already the snapshot's)."""
    qemu_img("snapshot", "-c", snapshot, str(disk), error=JoinError)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(STATE_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def state_files(snapshots: Path, disk: Path | None, scratch: Path,
                snapshot: str) -> list[StateFile]:
    """Step 3's files: the snapshot drive as it is, the disk exported."""
    files = [("snapshots.qcow2", snapshots)]
    if disk is not None:
        export_disk(disk, scratch, snapshot)
        files.append(("disk.qcow2", scratch))
    return [StateFile(name, path, path.stat().st_size, _digest(path), data_extents(path))
            for name, path in files]


async def with_heartbeats(sender: lc.Sender, work: Awaitable[T], every: float) -> T:
    """Await `work` while the new backup hears a heartbeat frame `every` seconds
    (it would take a silent primary for a failed one)."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await sender.send(lc.FrameType.HEARTBEAT)
            await asyncio.wait({task}, timeout=every)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return task.result()


async def ship_state(sender: lc.Sender, point: JoinPoint, epoch: int,
                     files: list[StateFile], progress: Callable[[int, int], None]) -> int:
    """Send JOIN (the join point, the pair's epoch, the files) and the files'
    bytes as STATE frames; returns the bytes sent."""
    await sender.send(lc.FrameType.JOIN, point.offset, point.icount, lc.json_payload({
        "epoch": epoch, "snapshot": point.snapshot,
        "files": [{"name": f.name, "size": f.size, "sha256": f.sha256, "data": f.data}
                  for f in files]}))
    total = sum(f.data for f in files)
    sent = 0
    for index, f in enumerate(files):
        with open(f.path, "rb") as src:
            for start, length in f.extents:
                src.seek(start)
                position, end = start, start + length
                while position < end:
                    chunk = src.read(min(STATE_CHUNK, end - position))
                    if not chunk:
                        break
                    await sender.send(lc.FrameType.STATE, position, index, chunk)
                    position += len(chunk)
                    sent += len(chunk)
                    progress(sent, total)
            if position != end or os.fstat(src.fileno()).st_size != f.size:
                raise JoinError(f"{f.path} changed while it was sent")
    return sent


class StateReceiver:
    """The new backup's side of step 3: writes the files, checks them."""

    def __init__(self, run_dir: Path, join: lc.Frame) -> None:
        body = join.json()
        self.epoch = int(body["epoch"])
        self.snapshot = str(body.get("snapshot"))
        if not JOIN_SNAPSHOT_NAME.fullmatch(self.snapshot):  # it goes into QEMU's options
            raise lc.ProtocolMismatch(f"JOIN names no join snapshot: {self.snapshot!r}")
        self.offset, self.icount = join.offset, join.icount
        self.files = body["files"]
        for f in self.files:
            if "/" in f["name"] or f["name"].startswith("."):
                raise lc.ProtocolMismatch(f"JOIN names a file outside the run dir: {f['name']!r}")
        self.run_dir = run_dir
        self.received = 0
        self.total = sum(f["data"] for f in self.files)  # what travels: the holes do not
        self._hashes = [hashlib.sha256() for _ in self.files]
        self._sizes = [0] * len(self.files)
        self._out = [open(run_dir / f["name"], "wb") for f in self.files]

    @property
    def complete(self) -> bool:
        return self.received == self.total

    def take(self, frame: lc.Frame) -> None:
        """A piece of a file, at or past the end of the one before (a hole between)."""
        index = frame.icount
        if not 0 <= index < len(self.files) or frame.offset < self._sizes[index]:
            raise lc.OutOfOrderFrame(f"STATE frame for file {index} at {frame.offset} "
                                     "is not the next piece")
        end = frame.offset + len(frame.payload)
        if end > self.files[index]["size"]:
            raise lc.CorruptFrame(f"{self.files[index]['name']}: more bytes than announced")
        self._hole_to(index, frame.offset)
        self._out[index].write(frame.payload)
        self._hashes[index].update(frame.payload)
        self._sizes[index] = end
        self.received += len(frame.payload)
        if self.complete:
            self.finish()

    def _hole_to(self, index: int, offset: int) -> None:
        """Leave a hole up to `offset` (zeros, as the sender hashed them)."""
        gap = offset - self._sizes[index]
        if gap:
            self._out[index].seek(offset)
            zeros = bytes(min(gap, STATE_CHUNK))
            while gap:
                self._hashes[index].update(zeros[:gap])
                gap -= min(gap, len(zeros))
            self._sizes[index] = offset

    def finish(self) -> None:
        for index, (f, out) in enumerate(zip(self.files, self._out)):
            self._hole_to(index, f["size"])
            out.truncate(f["size"])
            out.close()
        for f, h in zip(self.files, self._hashes):
            if h.hexdigest() != f["sha256"]:
                raise lc.CorruptFrame(f"{f['name']}: SHA-256 does not match the JOIN frame's")
        if any(f["name"] == "disk.qcow2" for f in self.files):
            adopt_disk(self.run_dir / "disk.qcow2", self.snapshot)
        emit(log, "join-state-received", bytes=self.total, epoch=self.epoch,
             offset=self.offset, icount=self.icount)

    def close(self) -> None:
        for out in self._out:
            out.close()
