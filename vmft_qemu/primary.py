"""The primary: runs the guest under record and ships its log to the backup.

Paper section 2.1: the primary VM executes, every input it receives goes into
log entries, and the entries are sent over the logging channel to the backup.
Here QEMU (`rr=record`) writes its replay log into a pipe; this controller
splits it into complete events, keeps every byte the backup has not yet
acknowledged (the retained log), sends it as LOG frames and tracks the ACKs.
If the connection breaks it reconnects and resends from the backup's last ACK.

When the failure detector declares the backup failed, the primary must win the
test-and-set before it goes on alone (section 2.3): then it releases output
without waiting and stops shipping log.  If the backup won instead (it went
live), this primary stops its VM for good.  A backup that went live runs the
VM on through this same controller, "alone" from the start, resumed from the
go-live snapshot.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Coroutine

from . import go_live, machine, metrics, reprotect
from . import log_channel as lc
from .config import FTConfig
from .events import Stateful, emit
from .failure_detector import FailureDetector
from .images import GuestImage
from .lag_control import LagControl, Throttle
from .log_flush import FlushRequests
from .log_pipe import open_fifo
from .machine import Role
from .output_gate import OutputGate
from .replay_log import REPLAY_VERSION, Event, ReplayLogReader
from .status import RateMeter
from .vnic import Port, gratuitous_arp, open_dgram_port, open_tap

log = logging.getLogger(__name__)


async def first_failure(*coros: Coroutine[Any, Any, None]) -> None:
    """Run `coros` together until one ends; cancel the rest; re-raise its error."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        task.result()


class ChannelRefused(Exception):
    """The backup refused this primary (wrong VM, log version, ...)."""


@dataclass(frozen=True)
class Position:
    offset: int = 0
    icount: int = 0

    def json(self) -> dict[str, int]:
        return {"offset": self.offset, "icount": self.icount}


@dataclass(frozen=True)
class Segment:
    """Complete events read from the record pipe in one go."""

    offset: int
    data: bytes
    icount: int  # icount at the segment's end

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


class RetainedLog:
    """The log the backup has not acknowledged yet, in complete-event segments."""

    def __init__(self) -> None:
        self.segments: collections.deque[Segment] = collections.deque()
        self.nbytes = 0
        self.start = 0  # offset of the first retained byte

    def append(self, segment: Segment) -> None:
        self.segments.append(segment)
        self.nbytes += len(segment.data)

    def release(self, upto: int) -> None:
        """Forget everything the backup acknowledged (ends at or before `upto`)."""
        while self.segments and self.segments[0].end <= upto:
            gone = self.segments.popleft()
            self.nbytes -= len(gone.data)
            self.start = gone.end
        if not self.segments:
            self.start = max(self.start, upto)

    def is_boundary(self, offset: int) -> bool:
        """Is `offset` a point of the retained log a backup can resume from?"""
        return offset == self.start or any(offset in (seg.offset, seg.end) for seg in self.segments)

    def frame_from(self, offset: int, max_bytes: int) -> Segment | None:
        """The log from `offset` (a segment boundary) as one frame-sized segment."""
        parts: list[Segment] = []
        size = 0
        for seg in self.segments:
            if seg.end <= offset:
                continue
            if seg.offset != offset and not parts:
                raise ValueError(f"offset {offset} is not an event boundary of the retained log")
            if parts and size + len(seg.data) > max_bytes:
                break
            parts.append(seg)
            size += len(seg.data)
        if not parts:
            return None
        return Segment(parts[0].offset, b"".join(p.data for p in parts), parts[-1].icount)


RESTART_QMP_TIMEOUT_S = 10.0  # a join's QMP calls to the restarted recording

# Protected <-> lagging, with hysteresis: proportional lag control keeps the
# backup a little over its target, which is no news.
LAGGING_OVER_TARGET = 2.0  # lagging once the backup is this many targets behind
BACK_WITHIN_TARGET = 1.5  # protected again once within this many targets


class PrimaryController(Stateful):
    role = "primary"

    def __init__(self, config: FTConfig, image: GuestImage, host: str = "primary",
                 resume: str | None = None, resume_icount: int = 0) -> None:
        """`host`: which host of the config this runs on ("backup" after a
        go-live); `resume`: the snapshot to resume the guest from, which also
        means running alone (the partner is gone); `resume_icount`: the
        instruction count the snapshot stands at (the new log counts on from it)."""
        self.config = config
        self.image = image
        side = config.primary if host == "primary" else config.backup
        self.run_dir = side.run_dir
        self.tap_name = side.tap
        self.metrics_port = side.metrics_port
        self.machine = machine.for_config(config, image, Role.RECORD, self.run_dir,
                                          self.run_dir / "record.fifo", loadvm=resume)
        self.alone = resume is not None
        self.exit_code: int | None = None
        self.detector = FailureDetector(config, "primary")
        self._shipping: asyncio.Task[None] | None = None
        self.paused_full = False  # the guest waits: the retained log is full
        self.reader = ReplayLogReader(icount=resume_icount)
        self.retained = RetainedLog()
        self.joining = False  # keeping the log from a join point for a backup that joins
        self._ever_connected = False  # has a backup had this primary's log?
        self._recording = asyncio.Event()  # QEMU is running
        self.join_stats: dict[str, Any] = {}
        self._later: list[asyncio.Task[None]] = []  # tasks started after run() began
        self._lag_task: asyncio.Task[None] | None = None
        self._join_started = 0.0
        self._record_fd = -1  # the record pipe, which every QEMU of this controller writes
        self._restarting = False  # a join replaces the recording QEMU (`_restart_recording`)
        self._restarted = asyncio.Event()
        self.acked = Position()
        self.backup_replayed = Position()
        self.set_state("starting", "resuming the VM from the go-live snapshot" if resume
                       else "controller started")
        self.connected = False
        self.shutdown_cause: str | None = None
        self.errors: list[str] = []
        self.ack_delay_ms: float | None = None
        self._sent_at: collections.deque[tuple[int, float]] = collections.deque()
        self._new_log = asyncio.Event()
        self._acked_changed = asyncio.Event()
        self.lag_control = LagControl(config.lag.target_ms)
        self.throttle: Throttle | None = None  # the throttle plugin's control file
        self.gate: OutputGate | None = None
        self._ports: list[Port] = []
        self._unstamped: list[tuple[bytes, float]] = []
        self._flush_requests: FlushRequests | None = None  # the logflush plugin's socket
        self._tap: Port | None = None
        # DIGEST payloads to send; a backup gone for long loses the oldest.
        self._digests: collections.deque[bytes] = collections.deque(maxlen=100_000)
        self._released = 0
        self._stamp_wanted = asyncio.Event()
        self._icount_rate = RateMeter()
        self._byte_rate = RateMeter()
        # (log offset, time.monotonic_ns()) as each segment is read: maps the
        # backup's replay position to when the primary was there.
        self._clock_marks: collections.deque[tuple[int, int]] = collections.deque()

    # --- the record pipe -------------------------------------------------------

    def _on_record_readable(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                return
            if not data:
                return
            self._take_log(data)

    def _take_log(self, data: bytes) -> None:
        start = self.reader.offset
        complete = self.reader.split(data)
        if not complete:
            return
        if not self.alone or self.joining:
            self.retained.append(Segment(start, complete, self.reader.icount))
            self._bound_retained()
        self._icount_rate.add(self.reader.icount)
        self._byte_rate.add(self.reader.offset)
        self._clock_marks.append((self.reader.offset, time.monotonic_ns()))
        if self.reader.shutdown and self.shutdown_cause is None:
            self.shutdown_cause = self.reader.shutdown
            emit(log, "guest-shutdown", cause=self.shutdown_cause, icount=self.reader.icount)
        self._new_log.set()

    def _bound_retained(self) -> None:
        """Pause the guest while the retained log is full, resume at half.

        The retained log is what the backup has not acknowledged; it only
        grows without bound when the backup is gone and the go-live lock is
        unreachable, so this primary may neither drop it nor go on alone."""
        limit = self.config.channel.max_retained_mib << 20
        full = self.retained.nbytes > limit
        if full and not self.paused_full:
            self.paused_full = True
            self._error(f"retained log over {limit >> 20} MiB unacknowledged: guest paused "
                        "until the backup catches up or this primary may go on alone")
            self._task(self._qmp_command("stop"), "pausing the guest")
        elif self.paused_full and self.retained.nbytes < limit // 2:
            self.paused_full = False
            emit(log, "retained-log-drained", retained_bytes=self.retained.nbytes)
            self._task(self._qmp_command("cont"), "resuming the guest")

    async def _qmp_command(self, command: str) -> None:
        await (await self.machine.qmp()).execute(command)

    # --- the logging channel ---------------------------------------------------

    def _targets(self) -> list[tuple[str, int]]:
        """Where to ship the log: the backup; running alone, the standby hosts
        (and those too while no backup has come yet)."""
        backup = (self.config.backup.address, self.config.backup.log_port)
        if self.alone:
            return list(self.config.protect.hosts)
        if self._ever_connected:
            return [backup]
        return [backup, *(h for h in self.config.protect.hosts if h != backup)]

    def _rejoining(self) -> bool:
        """Does this primary look for a new backup when it runs alone?"""
        return self.config.protect.auto and bool(self.config.protect.hosts)

    async def _ship_forever(self) -> None:
        pause = self.config.channel.reconnect_ms / 1000
        while True:
            for addr, port in self._targets():
                try:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(addr, port), 5)
                except (OSError, TimeoutError):
                    continue
                try:
                    await self._session(reader, writer, (addr, port))
                except TimeoutError:
                    self._error(f"log channel to {addr}:{port}: the backup went silent")
                except (lc.FrameError, OSError, EOFError, ChannelRefused,
                        reprotect.JoinError) as e:
                    self._error(f"log channel to {addr}:{port}: {e}")
                finally:
                    self.connected = False
                    writer.close()
                    if self.joining:
                        self._end_join()
                if self.state in ("protected", "lagging"):
                    self.set_state("unprotected", self.errors[-1], logging.WARNING)
            await asyncio.sleep(pause)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       endpoint: tuple[str, int]) -> None:
        sender = lc.Sender(writer)
        await sender.send(lc.FrameType.HELLO, payload=lc.json_payload({
            "vm": self.config.vm.name, "log_version": REPLAY_VERSION,
            "protocol": lc.PROTOCOL_VERSION, "pid": os.getpid(),
            "join_epoch": self._join_epoch()}))
        order = lc.FrameOrder()
        welcome = await asyncio.wait_for(lc.read_frame(reader), 10)
        order.check(welcome)
        if welcome.type == lc.FrameType.REFUSE:
            raise ChannelRefused(welcome.json().get("reason", "no reason given"))
        if welcome.type != lc.FrameType.ACK:
            raise lc.ProtocolMismatch(f"expected ACK after HELLO, got {welcome.type.name}")
        standby = bool(welcome.flags & lc.ACK_STANDBY)
        if not standby:
            self._check_resume_point(welcome.offset)  # before its ACK can release anything
        self._on_ack(welcome)
        protecting = []
        if standby:
            if not self.alone:  # this primary's failure watch runs: the standby is its partner
                self.detector.partner_at(endpoint[0])
                self.detector.set_channel(True)
            offset = await self._join(sender, endpoint)
            protecting.append(self._protect_when_caught_up(sender, endpoint))
        else:
            offset = welcome.offset
            self.set_state("protected", f"backup connected; resending from log offset {offset}")
        self.connected = self._ever_connected = True
        self.detector.set_channel(True)
        emit(log, "backup-connected", resume_offset=offset)
        try:
            await first_failure(self._send_log(sender, offset),
                                self._read_acks(reader, order), *protecting)
        finally:
            self.detector.set_channel(False)

    def _check_resume_point(self, offset: int) -> None:
        """Refuse a returning backup that cannot go on from the log it says it has."""
        if self.alone:
            raise ChannelRefused("that host replays another generation of this VM: "
                                 "a new backup must start as a standby (`vmft protect`)")
        if offset < self.retained.start:
            raise ChannelRefused(
                f"backup has the log up to offset {offset} but the primary keeps "
                f"it only from {self.retained.start}: the backup must be re-created")
        if not self.retained.is_boundary(offset):
            raise ChannelRefused(
                f"backup has the log up to offset {offset}, which is no event boundary of "
                f"the log this primary recorded (up to {self.reader.offset}): it holds log "
                f"the primary never sent, so the backup must be re-created")

    # --- re-protection: a new backup joins this primary running alone ----------

    def _join_epoch(self) -> int | None:
        """The lock epoch a standby joining now would share with this primary.

        Alone, this primary holds its epoch's lock: the new pair is the next
        generation.  Never yet acknowledged by a backup, this primary still
        waits for its first one, which may as well come as a standby.  A
        primary that has had a backup must first settle that backup's failure
        (win the lock) before it takes another."""
        if self.alone:
            return self.config.lock.epoch + 1
        if self._ever_connected:
            return None
        return self.config.lock.epoch

    async def _join(self, sender: lc.Sender, endpoint: tuple[str, int]) -> int:
        """Restart the recording from a snapshot and ship the state (`reprotect`);
        returns the log offset the new backup's replay starts from."""
        epoch = self._join_epoch()
        if epoch is None:
            raise ChannelRefused("the backup is a standby, but this primary has had a "
                                 "backup in this lock epoch: not joining it")
        self.set_state("joining", f"a new backup at {endpoint[0]}:{endpoint[1]} joins "
                       f"(lock epoch {epoch})")
        await self._recording.wait()
        started = self._join_started = time.monotonic()
        beat = self.config.channel.heartbeat_ms / 1000
        point = await reprotect.with_heartbeats(sender, self._restart_recording(), beat)
        paths = self.machine.paths
        files = await reprotect.with_heartbeats(sender, asyncio.to_thread(
            reprotect.state_files, paths.snapshots, paths.disk if self.machine.spec.disk else None,
            self.run_dir / "join-disk.qcow2", point.snapshot), beat)
        self.join_stats = {"endpoint": f"{endpoint[0]}:{endpoint[1]}", "epoch": epoch,
                           **point.json(), "state_bytes": sum(f.data for f in files),
                           "sent_bytes": 0}

        def progress(sent: int, total: int) -> None:
            self.join_stats["sent_bytes"] = sent
            self.detector.heard()  # the standby takes the state: it is there

        await reprotect.ship_state(sender, point, epoch, files, progress)
        self.join_stats["state_s"] = round(time.monotonic() - started, 3)
        emit(log, "join-state-sent", **self.join_stats)
        self.acked = Position(point.offset, point.icount)
        return point.offset

    async def _restart_recording(self) -> reprotect.JoinPoint:
        """Step 1 of `reprotect`: savevm, then a new recording from that snapshot,
        whose whole log (from byte 0) is kept for the new backup."""
        started = time.monotonic()
        old = self.machine
        name = reprotect.join_snapshot_name()
        stopped_at, attempts = await reprotect.save_join_snapshot(await old.qmp(), name)
        saved = time.monotonic()
        self._restarting = True
        loop = asyncio.get_running_loop()
        try:
            loop.remove_reader(self._record_fd)
            await old.stop()
            last_words: list[Event] = []  # the old recording's (its shutdown): not this VM's log
            while True:
                try:
                    data = os.read(self._record_fd, 1 << 16)
                except BlockingIOError:
                    break
                if not data:
                    break
                self.reader.split(data, events=last_words)
            logged_at = reprotect.logged_icount(last_words, stopped_at)
            files = [old.paths.snapshots] + ([old.paths.disk] if old.spec.disk else [])
            dropped = await asyncio.to_thread(reprotect.drop_snapshots, files, name)
            self.machine = machine.for_config(
                self.config, self.image, Role.RECORD, self.run_dir, old.rrfile,
                loadvm=name, rrsnapshot=name, paused=True)
            self.reader = ReplayLogReader(icount=logged_at)
            self.retained = RetainedLog()
            self.joining = True
            self._clock_marks.clear()
            self._byte_rate = RateMeter()
            # The new backup's replay numbers its guest's frames from the join
            # point on: so do the digests (frames still held came before it).
            self._digests.clear()
            self._released = -(self.gate.held + len(self._unstamped)) if self.gate else 0
            loop.add_reader(self._record_fd, self._on_record_readable, self._record_fd)
            await self.machine.launch()
            qmp = await self.machine.qmp()
            try:
                async with asyncio.timeout(RESTART_QMP_TIMEOUT_S):
                    at = (await qmp.execute("query-replay"))["icount"]
                    if at != stopped_at:
                        raise reprotect.JoinError(
                            f"the recording restarted from the snapshot at icount {at}, "
                            f"not at {stopped_at} where it was taken")
                    await qmp.execute("cont")
            except TimeoutError:
                raise reprotect.JoinError(f"the restarted recording did not answer QMP within "
                                          f"{RESTART_QMP_TIMEOUT_S:.0f} s") from None
        except BaseException:
            # The VM is lost: fail loudly (`run` reports the recording's end).
            old.kill()
            self.machine.kill()
            raise
        finally:
            self._restarting = False
            self._restarted.set()
        done = time.monotonic()
        point = reprotect.JoinPoint(name, 0, logged_at, done - started, saved - started,
                                    done - saved, attempts)
        emit(log, "recording", qemu_pid=self.machine.pid, resumed=name, snapshots_dropped=dropped)
        emit(log, "join-point", **point.json())
        return point

    def _end_join(self) -> None:
        self.joining = False
        self.retained = RetainedLog()
        self.retained.start = self.reader.offset
        if self.state == "joining":
            self.set_state("alone", "the join was cut short", logging.WARNING)

    async def _protect_when_caught_up(self, sender: lc.Sender, endpoint: tuple[str, int]) -> None:
        """Once the new backup has the log up to now: hold output for its ACKs
        again, tell it up to where this primary released output alone, and
        run as a pair of the next lock epoch."""
        target = self.reader.offset
        while self.acked.offset < target:
            self._acked_changed.clear()
            await self._acked_changed.wait()
        if self.gate is not None:
            self.gate.shut()
        released_to = (await (await self.machine.qmp()).execute("query-replay"))["icount"]
        await sender.send(lc.FrameType.PROTECT, self.reader.offset, released_to)
        addr, port = endpoint
        self.config = dataclasses.replace(
            self.config, backup=dataclasses.replace(self.config.backup, address=addr, log_port=port),
            lock=dataclasses.replace(self.config.lock, epoch=self.join_stats["epoch"]))
        if self.alone:  # the new pair needs its own failure detector and watch
            self.detector.close()
            self.detector = FailureDetector(self.config, "primary")
            self._later.append(self._task(self._watch_new_backup(), "failure watch"))
        self.alone, self.joining = False, False
        self._start_lag_control()
        self.join_stats["protected_s"] = round(time.monotonic() - self._join_started, 3)
        self.join_stats["log_bytes"] = self.reader.offset - self.join_stats["offset"]
        self.set_state("protected", f"the new backup at {addr}:{port} has the log: output waits "
                       f"for its ACKs again (lock epoch {self.config.lock.epoch})")
        emit(log, "protected-again", released_to=released_to, **self.join_stats)
        await asyncio.Future()  # stay with the session's other tasks

    def _start_lag_control(self) -> None:
        if self.throttle is not None and self._lag_task is None:
            self._lag_task = self._task(self.lag_control.run(
                self.throttle, self.lag_ms, lambda: self.connected), "lag control")
            self._later.append(self._lag_task)

    async def _watch_new_backup(self) -> None:
        await self.detector.start()
        self.detector.set_channel(self.connected)
        await self._watch_backup()

    async def _send_log(self, sender: lc.Sender, offset: int) -> None:
        heartbeat = self.config.channel.heartbeat_ms / 1000
        max_bytes = self.config.channel.max_frame_kib * 1024
        self._sent_at.clear()
        while True:
            self._new_log.clear()
            segment = self.retained.frame_from(offset, max_bytes)
            if segment is None:
                try:
                    async with asyncio.timeout(heartbeat):  # no task per wait, as wait_for makes
                        await self._new_log.wait()
                except TimeoutError:
                    await self._send_with_digests(sender, lc.FrameType.HEARTBEAT, offset,
                                                  self.reader.icount)
                continue
            await self._send_with_digests(sender, lc.FrameType.LOG, segment.offset,
                                          segment.icount, segment.data)
            self._sent_at.append((segment.end, time.monotonic()))
            offset = segment.end

    async def _send_with_digests(self, sender: lc.Sender, ftype: lc.FrameType, offset: int,
                                 icount: int, payload: bytes = b"", most: int = 256) -> None:
        """Send a LOG or HEARTBEAT frame, after up to `most` of the released
        frames' digests in the same send: they get no send of their own (the
        check is not urgent, and one of these frames comes within
        `channel.heartbeat_ms`)."""
        digests = [sender.frame(lc.FrameType.DIGEST, payload=self._digests.popleft())
                   for _ in range(min(most, len(self._digests)))]
        await sender.write(*digests, sender.frame(ftype, offset, icount, payload))

    async def _read_acks(self, reader: asyncio.StreamReader, order: lc.FrameOrder) -> None:
        silence = max(10 * self.config.channel.heartbeat_ms / 1000, 2.0)
        while True:
            async with asyncio.timeout(silence):
                frame = await lc.read_frame(reader)
            order.check(frame)
            self.detector.heard()
            if frame.type == lc.FrameType.REFUSE:
                raise ChannelRefused(frame.json().get("reason", "no reason given"))
            if frame.type == lc.FrameType.ACK:
                self._on_ack(frame)

    def _on_ack(self, frame: lc.Frame) -> None:
        if frame.offset > self.reader.offset:
            raise lc.ProtocolMismatch(
                f"ACK for offset {frame.offset} beyond the log recorded so far ({self.reader.offset})")
        self.acked = Position(frame.offset, frame.icount)
        replayed_offset, replayed_icount, safe_icount = lc.ACK_PAYLOAD.unpack(frame.payload)
        self.backup_replayed = Position(replayed_offset, replayed_icount)
        self.retained.release(frame.offset)
        self._bound_retained()
        if self.gate is not None:
            # Released against the point the backup could go live at, which
            # may be a few events before the end of what it received.
            self.gate.acknowledged(safe_icount)
        sent_at = None
        while self._sent_at and self._sent_at[0][0] <= frame.offset:
            sent_at = self._sent_at.popleft()[1]
        if sent_at is not None:
            self.ack_delay_ms = (time.monotonic() - sent_at) * 1000
        self._acked_changed.set()

    # --- the guest's network: inbound goes in (and into the log), outbound waits

    def _connect_network(self) -> None:
        paths = self.machine.paths
        guest = open_dgram_port(paths.controller_net, paths.guest_net)
        self._tap = tap = open_tap(self.tap_name)
        self._ports = [guest, tap]
        self.gate = OutputGate(self._release, audit=self.run_dir / "gate.jsonl")
        tap.listen(guest.send)
        guest.listen(self._on_guest_frame)

    def _release(self, frame: bytes) -> None:
        """The gate opened for `frame`: onto the LAN; its digest goes to the backup
        with the next log frame."""
        assert self._tap is not None
        self._tap.send(frame)
        self._released += 1
        self._digests.append(lc.DIGEST_PAYLOAD.pack(self._released, hashlib.sha256(frame).digest()))

    def _on_guest_frame(self, frame: bytes) -> None:
        assert self.gate is not None
        if self.gate.is_open:  # alone: nobody to wait for
            self.gate.hold(frame, self.reader.icount, time.monotonic())
            return
        self._unstamped.append((frame, time.monotonic()))
        self._stamp_wanted.set()

    async def _stamp_forever(self) -> None:
        """Stamp the guest's frames with an icount at or after the one that sent them."""
        assert self.gate is not None
        while True:
            await self._stamp_wanted.wait()
            self._stamp_wanted.clear()
            batch, self._unstamped = self._unstamped, []
            icount = await self._sent_by_now()
            for frame, arrived in batch:
                self.gate.hold(frame, icount, arrived)

    async def _sent_by_now(self) -> int:
        """An icount at or after the sending of every frame that has arrived.

        QEMU's vCPU thread logs the bottom half that sends the guest's frames
        (an ASYNC_BH event) before it runs it, then a safe point at the same
        icount, which the backup's ACKs are counted in.  With the logflush
        plugin: the last such event in the log after a flush on request
        (`log_flush.py`); about half the time the vCPU thread has not written
        the safe point yet, and one of logflush's follow-up flushes brings
        it.  Without the plugin: QEMU's icount by QMP, which is past that
        event too, but later, so the frame waits for more log."""
        if self._flush_requests is not None:
            await self._flush_requests.flush()
            self._on_record_readable(self._record_fd)  # all the flushed log, now in the pipe
            return self.reader.bh_icount
        qmp = await self.machine.qmp()  # a join restarts QEMU
        return (await qmp.execute("query-replay"))["icount"]

    # --- status and lifecycle --------------------------------------------------

    def _task(self, coro: Coroutine[Any, Any, None], what: str) -> asyncio.Task[None]:
        """A background task whose failure is reported, never lost."""
        task = asyncio.create_task(coro, name=what)

        def done(t: asyncio.Task[None]) -> None:
            if not t.cancelled() and t.exception() is not None:
                self.set_state("failed", f"{what} failed: {t.exception()!r}", logging.ERROR)
                self._error(f"{what} failed: {t.exception()!r}")

        task.add_done_callback(done)
        return task

    def _error(self, message: str) -> None:
        self.errors = (self.errors + [message])[-20:]
        emit(log, "channel-error", logging.WARNING, error=message)

    def vm_icount(self) -> int:
        return self.reader.icount

    def _watch_lag(self, snapshot: dict[str, Any]) -> None:
        """Protected <-> lagging: the backup beyond the lag target, and back within."""
        lag, target = snapshot["lag_ms"], self.config.lag.target_ms
        if self.state == "protected" and lag > LAGGING_OVER_TARGET * target:
            self.set_state("lagging", f"backup {lag:.0f} ms behind, target {target} ms",
                           lag_ms=lag)
        elif self.state == "lagging" and lag <= BACK_WITHIN_TARGET * target:
            self.set_state("protected", f"backup back within the target: {lag:.0f} ms behind",
                           lag_ms=lag)

    def lag_ms(self) -> float:
        """How far behind the backup is, in the primary's running time: from
        when the primary recorded the last event the backup has replayed to
        when it recorded its newest.  (Not the guest's clock reads: a
        CPU-bound guest makes none for seconds.)"""
        if self.alone:
            return 0.0
        marks, replayed = self._clock_marks, self.backup_replayed.offset
        while len(marks) > 1 and marks[1][0] <= replayed:
            marks.popleft()
        return (marks[-1][1] - marks[0][1]) / 1e6 if marks else 0.0

    def snapshot(self) -> dict[str, Any]:
        recorded = Position(self.reader.offset, self.reader.icount)
        lag = max(0, recorded.icount - self.backup_replayed.icount)
        return {
            "role": "primary", "vm": self.config.vm.name, "host": socket.gethostname(),
            "state": self.state, "state_since": self.state_since,
            "qemu_pid": self.machine.pid, "controller_pid": os.getpid(),
            "recorded": recorded.json(), "acked": self.acked.json(),
            "backup_replayed": self.backup_replayed.json(),
            "lag_insns": lag, "lag_ms": self.lag_ms(), "lag_target_ms": self.config.lag.target_ms,
            "icount_per_s": self._icount_rate.rate(),
            "log_bytes_per_s": self._byte_rate.rate(),
            "ack_delay_ms": self.ack_delay_ms, "retained_bytes": self.retained.nbytes,
            "paused_retained_full": self.paused_full,
            "throttle_share": self.lag_control.share, "throttle_reason": self.lag_control.reason,
            "throttle_slept_s": self.throttle.slept_s if self.throttle else 0.0,
            "connected": self.connected, "shutdown_cause": self.shutdown_cause,
            "alone": self.alone, "partner": None if self.alone else self.detector.snapshot(),
            "gate": None if self.gate is None else {
                "held": self.gate.held + len(self._unstamped), "released": self.gate.released,
                "last_hold_ms": self.gate.last_hold_ms, "max_hold_ms": self.gate.max_hold_ms,
                "hold_ms": self.gate.hold_ms.json()},
            "errors": self.errors,
        }

    async def _wait_acked(self, offset: int, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                while self.acked.offset < offset:
                    self._acked_changed.clear()
                    await self._acked_changed.wait()
            return True
        except TimeoutError:
            return False

    # --- the backup failed: go on alone, or stop ---------------------------------

    async def _watch_backup(self) -> None:
        """Wait for the backup to fail, then contend for the go-live lock."""
        def unreachable(reason: str, error: Exception) -> None:
            # Not going alone: the output stays held, so the outside world
            # sees nothing the backup could contradict should it win later.
            self.set_state("backup-failed-no-lock", f"go-live lock unreachable: {error}",
                           logging.WARNING)
            self._error(f"backup failed ({reason}) but the go-live lock is unreachable: "
                        f"holding output ({error})")

        decided = await go_live.decide(
            lambda: self.config, "primary", self.detector,
            lambda: None if self.shutdown_cause is not None else True, unreachable,
            lambda reason: self.set_state("partner-lost", reason, logging.WARNING))
        if decided is None:
            return  # the guest is shutting down: nothing to take over
        verdict, reason = decided
        if verdict.won:
            self._go_alone(reason)
            return
        self.set_state("stopped", "lost the go-live lock to "
                       f"{go_live.holder_text(verdict.holder)}", logging.WARNING)
        self.exit_code = 3
        self._error(f"lost the go-live lock to {go_live.holder_text(verdict.holder)}"
                    f" ({reason}): the backup runs the VM now, this primary stops for good")
        self.machine.kill()

    def _go_alone(self, reason: str) -> None:
        self.alone = True
        self.set_state("alone", f"won the go-live lock ({reason}): running alone", logging.WARNING)
        if self._shipping is not None:
            self._shipping.cancel()
        self.retained = RetainedLog()
        self._bound_retained()
        if self.gate is not None:
            self.gate.open()
        emit(log, "going-alone", logging.WARNING, reason=reason, icount=self.reader.icount)
        if self._rejoining():
            self._shipping = self._task(self._ship_forever(), "re-protection")
            self._later.append(self._shipping)

    async def _recording_exit(self) -> int:
        """The recording QEMU's exit status; one a join replaced does not count."""
        while True:
            current = self.machine
            if current.pid is None:
                return 1  # the join's new recording did not start
            code = await current.wait()
            if current is self.machine and not self._restarting:
                return code
            await self._restarted.wait()
            self._restarted.clear()

    async def run(self) -> int:
        """Run until the guest shuts down; returns the exit status for the CLI:
        0 after a clean shutdown, 3 when the backup won the go-live lock, 1 on failure."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = self._record_fd = open_fifo(self.machine.rrfile)
        loop = asyncio.get_running_loop()
        loop.add_reader(fd, self._on_record_readable, fd)
        published = await metrics.publish(self.run_dir, self.metrics_port, self.snapshot,
                                          self._watch_lag)
        background: list[asyncio.Task[None]] = []
        try:
            if self.machine.spec.mac:
                self._connect_network()
            if self.alone:
                self.set_state("alone", "live on this host, from the go-live snapshot")
                if self.gate is not None:
                    self.gate.open()
                if self._rejoining():
                    self._shipping = self._task(self._ship_forever(), "re-protection")
                    background.append(self._shipping)
            else:
                await self.detector.start()
                self._shipping = self._task(self._ship_forever(), "log shipping")
                background += [self._shipping, self._task(self._watch_backup(), "failure watch")]
            if self.machine.spec.throttle:
                self.throttle = Throttle(self.machine.paths.throttle)  # before QEMU maps it
            await self.machine.launch()
            if self.alone and self._tap is not None and self.machine.spec.ip:
                # The guest now sends from this host: let the LAN's switches learn it.
                self._tap.send(gratuitous_arp(self.machine.spec.mac, self.machine.spec.ip))
            if self.gate is not None:
                if self.machine.spec.log_flush_us:
                    paths = self.machine.paths
                    self._flush_requests = FlushRequests(paths.log_flush,
                                                         paths.log_flush_controller)
                background.append(self._task(self._stamp_forever(), "output stamping"))
            emit(log, "recording", qemu_pid=self.machine.pid, resumed=self.machine.loadvm)
            self._recording.set()
            if self.state == "starting":
                self.set_state("unprotected", "recording; no backup connected yet")
            if not self.alone:
                self._start_lag_control()
            code = await self._recording_exit()
            self._on_record_readable(fd)  # whatever QEMU wrote last
            emit(log, "qemu-exited", code=code, shutdown_cause=self.shutdown_cause,
                 icount=self.reader.icount, log_bytes=self.reader.offset)
            if self.exit_code is not None:
                return self.exit_code
            if code != 0 or not self.reader.ended:
                self.set_state("failed", f"record QEMU exited with {code}", logging.ERROR)
                self._error(f"record QEMU exited with {code}: {self.machine.stderr_tail()}")
                return 1
            self.set_state("shutting-down", f"guest shut down ({self.shutdown_cause})")
            delivered = self.alone or await self._wait_acked(self.reader.offset, 30)
            self.set_state("shut-down", "alone" if self.alone else "the backup has the whole log"
                           if delivered else "the backup did not acknowledge the whole log")
            emit(log, "shutdown-complete", backup_has_all=delivered)
            return 0
        finally:
            for task in background + self._later:
                task.cancel()
            await asyncio.gather(*background, *self._later, return_exceptions=True)
            self.detector.close()
            for port in self._ports:
                port.close()
            if self.gate is not None:
                self.gate.close()
            if self._flush_requests is not None:
                self._flush_requests.close()
            loop.remove_reader(fd)
            published.close()
            await self.machine.stop()
            if self.throttle is not None:
                self.throttle.close()
            os.close(fd)
