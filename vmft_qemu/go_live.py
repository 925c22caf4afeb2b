"""Go-live: the backup stops replaying where the primary was and runs live.

Paper section 2.3: after the primary fails (and this side has won the
test-and-set), the backup "must continue replaying its execution from the log
entries until it has consumed the last log entry.  At that point, the backup VM
will stop replaying mode and start executing as a normal VM."

QEMU has no switch from replay to live execution, so the backup:

1. feeds its replaying QEMU every received byte up to the log's last safe point
   (`ReplayLogReader.safe_point`; the backup controller never feeds further);
2. waits until QEMU has consumed all of it: one of its threads sits in read()
   on the empty replay pipe (`replay_starved`);
3. appends a tail that lets it stop there without reading past it: a
   completion for each disk request that may be in flight (`stop_tail`: the
   primary had issued them and the log has not completed them; they complete
   now, as they would on a live machine), in the order they were issued,
   ending with one for a request never issued, which QEMU waits for forever,
   so the guest stays frozen while QMP answers (a replaying QEMU starved of
   log does not answer QMP; one that meets end-of-file exits:
   qemu-rr-facts.md);
4. pauses it (`stop`), checks it stands at the safe point's icount and takes
   its state with `savevm` (retried while a disk completion is still queued);
5. once that QEMU has exited, rewrites the replay state in the snapshot as a
   recording saves it (`hand_over`): a replay's snapshot holds the event it
   had read ahead, which the recording would carry on into the snapshot of
   any later join, where the new backup's replay would wait for it forever;
   and makes this host's disk copy durable (`make_durable`): the replay ran
   without flushing it (`machine.command_line`), since a backup's copy is
   lost with its host anyway until it goes live;
6. the caller then starts a record-mode QEMU from that snapshot (`-loadvm`),
   on this host's disk copy, and puts it on the LAN.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from pathlib import Path
from typing import Awaitable, Callable

from qemu.qmp import QMPClient

from .config import FTConfig
from .events import emit
from .failure_detector import FailureDetector
from . import test_and_set
from .log_pipe import unread_bytes
from .machine import savevm
from .replay_log import DiskCompletions, block_completion, forget_read_ahead, instruction_event
from .waiting import wait_until

log = logging.getLogger(__name__)

SNAPSHOT = "vmft-go-live"
MAX_DRAINED = 64  # more disk requests than a small guest ever has in flight
SYS_READ = 0  # x86_64 syscall number, as /proc/PID/task/TID/syscall shows it
POLL = 0.002


async def contend(config: FTConfig, role: str, reason: str) -> test_and_set.Verdict:
    """The test-and-set every side must win before it runs the VM alone.

    Raises `test_and_set.LockUnavailable` when the shared storage does not
    answer in time (or the pair has no lock): then this side must not go live."""
    lock = test_and_set.open_lock(config.lock)
    if lock is None:
        raise test_and_set.LockUnavailable("lock.backend is \"none\": this pair never goes live alone")
    owner = test_and_set.LockOwner(host=socket.gethostname(), pid=os.getpid(), vm=config.vm.name,
                                   epoch=config.lock.epoch, role=role)
    verdict = await test_and_set.acquire(lock, owner, config.lock.timeout_ms / 1000)
    emit(log, "go-live-lock", role=role, won=verdict.won, reason=reason,
         holder=None if verdict.holder is None else verdict.holder.to_json())
    return verdict


async def decide(config: Callable[[], FTConfig], role: str, detector: FailureDetector,
                 ready: Callable[[], bool | None],
                 unreachable: Callable[[str, Exception], None],
                 lost: Callable[[str], None] = lambda reason: None,
                 ) -> tuple[test_and_set.Verdict, str] | None:
    """Wait for the partner to fail, then contend for the lock until it is decided.

    `config()` is the pair's configuration when it contends (a join moves the
    pair to another lock epoch while this waits).
    `ready()` says whether a failure now means contending (True), waiting on
    (False: e.g. nothing to go live with yet) or nothing to decide any more
    (None: the guest shut down).  `lost(reason)` is told before contending.
    While the lock is unreachable this side does not go live:
    `unreachable(reason, error)` is told, and it tries again.
    Returns the verdict and the failure's reason."""
    retry = max(config().lock.timeout_ms / 1000, 0.5)
    while True:
        reason = await detector.wait_failure()
        now = ready()
        if now is None:
            return None
        if now:
            lost(reason)
            try:
                return await contend(config(), role, reason), reason
            except test_and_set.LockUnavailable as e:
                unreachable(reason, e)
        await asyncio.sleep(retry)


def holder_text(holder: test_and_set.LockOwner | None) -> str:
    if holder is None:
        return "the other side (its lock file is still being written)"
    return f"the {holder.role} (host {holder.host}, pid {holder.pid}, epoch {holder.epoch})"


class GoLiveError(RuntimeError):
    """The backup could not take over; the message says at which step."""


def _replay_fd(pid: int, rrfile: Path) -> int | None:
    """QEMU's file descriptor for its replay log, or None."""
    fds = Path(f"/proc/{pid}/fd")
    for entry in fds.iterdir():
        try:
            if os.readlink(entry) == str(rrfile):
                return int(entry.name)
        except OSError:
            continue
    return None


def replay_starved(pid: int, rrfile: Path) -> bool:
    """True when a thread of QEMU `pid` is blocked reading its (empty) replay log."""
    fd = _replay_fd(pid, rrfile)
    if fd is None:
        raise GoLiveError(f"QEMU {pid} has no open replay log {rrfile}")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "syscall").read_text().split()
        except OSError:
            continue
        if len(fields) > 1 and fields[0] == str(SYS_READ) and int(fields[1], 16) == fd:
            return True
    return False


async def wait_consumed(pid: int, rrfile: Path, pipe_fd: int, timeout: float) -> float:
    """Wait until QEMU has replayed everything written to the pipe; return seconds."""
    start = time.monotonic()
    try:
        await wait_until(lambda: unread_bytes(pipe_fd) == 0 and replay_starved(pid, rrfile),
                         timeout, "the replay to reach the end of the received log", every=POLL)
    except TimeoutError:
        unread = unread_bytes(pipe_fd)
        raise GoLiveError(f"the replay did not reach the end of the received log "
                          f"within {timeout:.0f} s ({unread} bytes unread)") from None
    return time.monotonic() - start


def stop_tail(disk: DiskCompletions) -> bytes:
    """What to append to the log so the replay ends here, frozen and answering QMP.

    Each request id is named: QEMU reads the id of an ASYNC BLOCK event once,
    then waits for that request.  (An id of -1 matches any request, but QEMU
    reads it again, 8 bytes further on, on every poll that finds none queued,
    and then waits for an id made of the next event's bytes: a request whose
    host I/O was still running, e.g. a guest flush, would never complete and
    savevm would refuse to the end.)  The requests past the highest completed
    id were issued in order, so the replay completes those it issued and stops
    at the first it did not.  The INSTRUCTION event of count 0 after them,
    which QEMU would never finish either, is never reached."""
    return b"".join(block_completion(request) for request in disk.outstanding(MAX_DRAINED)) \
        + instruction_event(0)


async def save_state(qmp: QMPClient, icount: int, timeout: float) -> int:
    """Pause the frozen replay, check where it stands, savevm; return the attempts.

    `savevm` is refused while QEMU still has a disk completion queued that the
    log did not deliver; letting the VM run a moment lets the tail's
    completions take it (the guest itself cannot move: it is frozen by the
    tail's last request)."""
    def at_the_end(at: int) -> None:
        if at != icount:
            raise GoLiveError(f"the replay stopped at icount {at}, not at the end of the "
                              f"received log ({icount})")

    _, attempts = await savevm(qmp, SNAPSHOT, timeout, GoLiveError, at_the_end)
    return attempts


async def freeze_and_save(qmp_of: Callable[[], Awaitable[QMPClient]], pid: int, rrfile: Path, pipe_fd: int,
                          icount: int, disk: DiskCompletions, timeout: float) -> dict[str, float]:
    """Steps 2 to 4 above; returns how long each took (seconds)."""
    t0 = time.monotonic()
    await wait_consumed(pid, rrfile, pipe_fd, timeout)
    t1 = time.monotonic()
    os.write(pipe_fd, stop_tail(disk))
    qmp = await qmp_of()
    attempts = await save_state(qmp, icount, timeout)
    t2 = time.monotonic()
    times = {"consume_s": t1 - t0, "save_s": t2 - t1, "savevm_attempts": attempts}
    emit(log, "replay-frozen-and-saved", icount=icount, **times)
    return times


def hand_over(snapshots: Path) -> None:
    """Step 5: the go-live snapshot's replay state as a recording's."""
    start = time.monotonic()
    rewritten = forget_read_ahead(snapshots)
    if rewritten:
        emit(log, "replay-state-handed-over", sections=rewritten,
             seconds=round(time.monotonic() - start, 4))
    else:
        # The VM still runs on; a later join would stall at its start.
        emit(log, "replay-state-not-found", level=logging.WARNING, snapshots=str(snapshots))


def make_durable(files: list[Path]) -> None:
    """Step 5: what the replay wrote without flushing reaches this host's disk
    (the files, then their directory) before the VM runs live from it."""
    start = time.monotonic()
    for path in [*files, files[0].parent]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    emit(log, "disk-made-durable", files=[p.name for p in files],
         seconds=round(time.monotonic() - start, 4))
