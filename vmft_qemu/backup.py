"""The backup: replays the primary's log in lock-step, a little behind.

Paper section 2.1: the backup VM receives the log entries, acknowledges them,
and replays them so that it executes exactly as the primary did.  Here the
backup QEMU (`rr=replay`) reads its replay log from a pipe this controller
feeds.  Every LOG frame is checked twice (the channel's checksum and order,
then the replay log reader: it must hold whole events and end at the icount
the frame claims) before a byte of it reaches QEMU; a bad frame is refused and
the connection closed, and the primary resends from the last ACK.  The pipe
is never closed under QEMU: a replaying QEMU that sees end-of-file exits.

The backup's position comes from the log it has fed and what QEMU has taken
of the pipe, not from QMP: a QEMU waiting for log bytes does not answer QMP.

Only log up to the last safe point (`ReplayLogReader.safe_point`) is fed, so
the replay can always be stopped where it stands and go live (`go_live`).
When the failure detector declares the primary failed and this side wins the
test-and-set, `run()` freezes the replay at the end of the received log, saves
the VM and returns "live"; the CLI then runs the VM on as a primary alone.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import socket
from typing import Any, Callable

from . import go_live, machine, metrics, reprotect
from . import log_channel as lc
from .config import FTConfig
from .divergence import DivergenceCheck
from .events import Stateful, emit
from .failure_detector import FailureDetector
from .images import GuestImage
from .log_pipe import open_fifo, unread_bytes
from .machine import Role
from .replay_log import REPLAY_VERSION, LogFormatError, ReplayLogReader, version_bytes
from .vnic import open_dgram_port

log = logging.getLogger(__name__)


class ReplayFeeder:
    """Writes received log into the replay pipe as fast as QEMU takes it."""

    def __init__(self, fd: int, offset: int = 0, icount: int = 0,
                 prefix: bytes | None = None) -> None:
        """`offset`, `icount`: where the log fed starts (a join point, `reprotect`);
        `prefix`: what QEMU reads first (default: the log version)."""
        self.fd = fd
        self.prefix = version_bytes() if prefix is None else prefix
        self.queue: collections.deque[tuple[bytes, int, int]] = collections.deque()
        self.queued_bytes = 0
        self.written_offset = offset
        # (end offset, icount) of fed event runs, to map pipe position -> icount
        self.boundaries: collections.deque[tuple[int, int]] = collections.deque([(offset, icount)])
        self.fed_icount = icount  # icount at the end of everything put here
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()

    def put(self, data: bytes, end_offset: int, icount: int) -> None:
        self.queue.append((data, end_offset, icount))
        self.queued_bytes += len(data)
        self.fed_icount = icount
        self._idle.clear()
        self._wake.set()

    async def written(self) -> None:
        """Wait until everything put here is in the pipe."""
        while self.queue or not self._idle.is_set():
            await self._idle.wait()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        os.write(self.fd, self.prefix)
        while True:
            if not self.queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            data, end_offset, icount = self.queue.popleft()
            view = memoryview(data)
            while view:
                try:
                    n = os.write(self.fd, view)
                    view = view[n:]
                except BlockingIOError:
                    writable = loop.create_future()
                    loop.add_writer(self.fd, writable.set_result, None)
                    try:
                        await writable
                    finally:
                        loop.remove_writer(self.fd)
            self.queued_bytes -= len(data)
            self.written_offset = end_offset
            self.boundaries.append((end_offset, icount))

    def replayed(self) -> tuple[int, int]:
        """(offset, icount) of the last event boundary QEMU has read past.

        QEMU reads the pipe through a 4 KiB stdio buffer, so it may not have
        executed up to here yet; it cannot be beyond the next boundary.
        """
        taken = self.written_offset - unread_bytes(self.fd)
        while len(self.boundaries) > 1 and self.boundaries[1][0] <= taken:
            self.boundaries.popleft()
        return self.boundaries[0]


class BackupController(Stateful):
    role = "backup"

    def __init__(self, config: FTConfig, image: GuestImage, standby: bool = False) -> None:
        """`standby`: a new backup with no VM state yet, for a primary running
        alone to join (`reprotect`); it replays once the state has come."""
        self.config = config
        self.run_dir = config.backup.run_dir
        self.standby = standby
        self.machine = machine.for_config(config, image, Role.REPLAY, self.run_dir,
                                          self.run_dir / "replay.fifo")
        self.reader = ReplayLogReader()
        self._fifo = -1
        self._joining: reprotect.StateReceiver | None = None
        # What the log goes through on its way into the replay pipe: a replay
        # from the join snapshot needs a placeholder (`reprotect.LoadSplice`).
        self._splice: Callable[[bytes], bytes] = lambda data: data
        self._state_ready = asyncio.Event()
        # Go live only with the log up to this icount (None: the primary has
        # not said PROTECT yet, so this standby must never go live).
        self.protected_from: int | None = None if standby else 0
        self.live_icount = 0  # where the replay stood when it went live
        self.feeder: ReplayFeeder | None = None
        self.set_state("starting", "controller started")
        self.connected = False
        self.shutdown_cause: str | None = None
        self.refused = 0
        self.divergence = DivergenceCheck(self.vm_icount)
        self.errors: list[str] = []
        self.detector = FailureDetector(config, "backup")
        self._unfed = b""  # received log after the last safe point
        self._session_task: asyncio.Task[None] | None = None
        self._channel: asyncio.Server | None = None

    # --- the logging channel ---------------------------------------------------

    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        # One primary at a time: a new connection replaces the old one.
        if self._session_task is not None:
            self._session_task.cancel()
        self._session_task = asyncio.current_task()
        peer = writer.get_extra_info("peername")
        sender = lc.Sender(writer)
        try:
            await self._session(reader, sender)
        except lc.FrameError as e:
            await self._refuse(sender, e)
        except LogFormatError as e:
            await self._refuse(sender, lc.CorruptFrame(f"LOG frame refused: {e}"))
        except TimeoutError:
            self._error(f"log channel from {peer}: the primary went silent")
        except (OSError, EOFError) as e:
            self._error(f"log channel from {peer}: {e}")
        except asyncio.CancelledError:
            pass  # a newer connection replaced this one, or this side is going live
        finally:
            if self._session_task is asyncio.current_task() and self.state == "replaying":
                self.set_state("waiting-for-primary",
                               self.errors[-1] if self.errors else "log channel closed",
                               logging.WARNING)
            if self._joining is not None and not self._joining.complete:
                self._joining.close()  # a join cut short: wait for the next one
                self._joining, self.reader = None, ReplayLogReader()
                self.set_state("standby", "the join was cut short", logging.WARNING)
            self.connected = False
            self.detector.set_channel(False)
            writer.close()

    async def _refuse(self, sender: lc.Sender, error: Exception) -> None:
        self.refused += 1
        self._error(f"refused: {error}")
        try:
            await sender.send(lc.FrameType.REFUSE, payload=lc.json_payload({"reason": str(error)}))
        except ConnectionError:
            pass

    async def _session(self, reader: asyncio.StreamReader, sender: lc.Sender) -> None:
        order = lc.FrameOrder()
        hello = await asyncio.wait_for(lc.read_frame(reader), 10)
        order.check(hello)
        if hello.type != lc.FrameType.HELLO:
            raise lc.ProtocolMismatch(f"expected HELLO first, got {hello.type.name}")
        self._check_hello(hello.json())
        standby = self.standby and self.feeder is None
        if standby and hello.json().get("join_epoch") is None:
            raise lc.ProtocolMismatch(
                "this standby has no VM state yet, and the primary cannot take a new backup "
                "now (it has had one in this lock epoch: that one's failure is decided first)")
        order.next_offset = self.reader.offset
        await self._ack(sender, lc.ACK_STANDBY if standby else 0)
        self.connected = True
        self.detector.set_channel(True)
        if not standby:
            self.set_state("replaying",
                           f"primary connected; its log from offset {self.reader.offset}")
        emit(log, "primary-connected", resume_offset=self.reader.offset)
        silence = max(10 * self.config.channel.heartbeat_ms / 1000, 2.0)
        while True:
            async with asyncio.timeout(silence):  # no task per frame, as wait_for makes
                frame = await lc.read_frame(reader)
            if self._session_task is not asyncio.current_task():
                # A newer connection replaced this one, and its cancel was lost
                # (seen with the asyncio.wait_for this read used before: Python
                # 3.11's returns the result of a read that completed as the
                # cancel came).  Its frames must not reach the reader after the
                # new session's ACK (seen: after a SIGSTOP and a reconnect, a
                # backup fed by both acknowledged more log than the primary had).
                return
            order.check(frame)
            self.detector.heard()
            if frame.type == lc.FrameType.LOG:
                self._accept_log(frame)
            elif frame.type == lc.FrameType.DIGEST:
                self.divergence.primary_sent(*lc.DIGEST_PAYLOAD.unpack(frame.payload))
                continue
            elif frame.type in (lc.FrameType.JOIN, lc.FrameType.STATE):
                self._take_state(frame)
                order.next_offset = self.reader.offset
                continue
            elif frame.type == lc.FrameType.PROTECT:
                self.protected_from = frame.icount
                self.set_state("replaying", f"protecting the VM from icount {frame.icount} "
                               f"(lock epoch {self.config.lock.epoch})")
            elif frame.type != lc.FrameType.HEARTBEAT:
                raise lc.ProtocolMismatch(f"unexpected {frame.type.name} from the primary")
            await self._ack(sender)

    def _check_hello(self, hello: dict[str, Any]) -> None:
        if hello.get("vm") != self.config.vm.name:
            raise lc.ProtocolMismatch(
                f"primary runs VM {hello.get('vm')!r}, this backup is for {self.config.vm.name!r}")
        version = hello.get("log_version")
        if version != REPLAY_VERSION:
            shown = f"{version:#x}" if isinstance(version, int) else repr(version)
            raise lc.ProtocolMismatch(
                f"primary writes replay log version {shown}, this backup's QEMU replays "
                f"version {REPLAY_VERSION:#x}: refusing its log")

    def _accept_log(self, frame: lc.Frame) -> None:
        complete = self.reader.split(frame.payload, whole=True, icount=frame.icount)
        if self.reader.shutdown and self.shutdown_cause is None:
            self.shutdown_cause = self.reader.shutdown
            emit(log, "primary-shutdown-logged", cause=self.shutdown_cause,
                 icount=self.reader.icount)
        assert self.feeder is not None
        # Feed up to the last safe point only (everything once the guest shut down).
        data = self._unfed + complete
        offset, icount = (self.reader.offset, self.reader.icount) if self.shutdown_cause \
            else self.reader.safe_point
        cut = len(data) - (self.reader.offset - offset)
        if cut > 0:
            self.feeder.put(self._splice(data[:cut]), offset, icount)
        self._unfed = data[max(cut, 0):]

    def _take_state(self, frame: lc.Frame) -> None:
        """A standby receives the join point and the VM's state (`reprotect`)."""
        if frame.type == lc.FrameType.JOIN:
            if not self.standby or self.feeder is not None:
                raise lc.ProtocolMismatch("JOIN to a backup that already has the VM's state")
            if self._joining is not None:
                self._joining.close()
            self._joining = reprotect.StateReceiver(self.run_dir, frame)
            self.machine.paths.console.unlink(missing_ok=True)
            self.reader = ReplayLogReader(frame.offset, frame.icount)
            self.config = dataclasses.replace(self.config, lock=dataclasses.replace(
                self.config.lock, epoch=self._joining.epoch))
            self.set_state("joining", f"receiving the VM's state ({self._joining.total} bytes)")
            return
        if self._joining is None:
            raise lc.ProtocolMismatch("STATE frame without a JOIN first")
        self._joining.take(frame)
        if self._joining.complete:
            self.machine.rrsnapshot = self._joining.snapshot  # the replay starts from it
            self.feeder = ReplayFeeder(self._fifo, self._joining.offset, self._joining.icount)
            self._splice = reprotect.LoadSplice()
            self._state_ready.set()

    async def _ack(self, sender: lc.Sender, flags: int = 0) -> None:
        replayed = self.feeder.replayed() if self.feeder else (self.reader.offset,
                                                              self.reader.icount)
        await sender.send(lc.FrameType.ACK, self.reader.offset, self.reader.icount,
                          lc.ACK_PAYLOAD.pack(*replayed, self.reader.safe_point[1]), flags)

    # --- status and lifecycle --------------------------------------------------

    def _error(self, message: str) -> None:
        self.errors = (self.errors + [message])[-20:]
        emit(log, "channel-error", logging.WARNING, error=message)

    def vm_icount(self) -> int:
        return self.feeder.replayed()[1] if self.feeder else 0

    def snapshot(self) -> dict[str, Any]:
        replayed = self.feeder.replayed() if self.feeder else (0, 0)
        return {
            "role": "backup", "vm": self.config.vm.name, "host": socket.gethostname(),
            "state": self.state, "state_since": self.state_since,
            "qemu_pid": self.machine.pid, "controller_pid": os.getpid(),
            "received": {"offset": self.reader.offset, "icount": self.reader.icount},
            "replayed": {"offset": replayed[0], "icount": replayed[1]},
            "backlog_bytes": self.reader.offset - replayed[0],
            "connected": self.connected, "refused_frames": self.refused,
            "shutdown_cause": self.shutdown_cause, "divergence": self.divergence.snapshot(),
            "partner": self.detector.snapshot(), "errors": self.errors,
        }

    # --- the primary failed: go live, or stop ------------------------------------

    async def _watch_primary(self) -> str:
        """Wait for the primary to fail, then contend for the go-live lock.

        Returns "live" once the replay is frozen and saved at the end of the
        received log, or "lost-lock" when the primary holds the lock (it went
        on alone).  While the lock cannot be reached, keeps replaying and
        retries: maybe the primary is only cut off and comes back."""
        def ready() -> bool | None:
            if self.feeder is None:
                return False  # a standby with no state: nothing to decide, the next join may come
            if self.protected_from is None or self.reader.safe_point[1] < self.protected_from:
                return None  # a join not completed: this replay may lack released output
            # A guest that shut down is not a failure (QEMU exits after
            # replaying it), and with no log yet there is nothing to go live with.
            return self.shutdown_cause is None and self.reader.offset > 0

        def unreachable(reason: str, error: Exception) -> None:
            self.set_state("primary-failed-no-lock", f"go-live lock unreachable: {error}",
                           logging.WARNING)
            self._error(f"primary failed ({reason}) but the go-live lock is unreachable: "
                        f"not going live ({error})")

        decided = await go_live.decide(
            lambda: self.config, "backup", self.detector, ready, unreachable,
            lambda reason: self.set_state("partner-lost", reason, logging.WARNING))
        if decided is None:
            self.set_state("failed", "the primary failed before this new backup held all the "
                           "log it released output for: nothing to go live with", logging.ERROR)
            return "failed"
        verdict, reason = decided
        if not verdict.won:
            self.set_state("stopped", "lost the go-live lock to "
                           f"{go_live.holder_text(verdict.holder)}", logging.WARNING)
            self._error(f"the primary failed ({reason}) but the go-live lock is held by "
                        f"{go_live.holder_text(verdict.holder)}: it runs the VM, "
                        "this backup stops for good")
            return "lost-lock"
        try:
            await self._go_live()
        except go_live.GoLiveError as e:
            self.set_state("failed", f"going live failed: {e}", logging.ERROR)
            self._error(f"going live failed: {e}")
            return "failed"
        return "live"

    async def _go_live(self) -> None:
        self.set_state("going-live", "won the go-live lock: replaying to the end of the log",
                       logging.WARNING)
        if self._channel is not None:
            self._channel.close()
        if self._session_task is not None:
            self._session_task.cancel()
        assert self.feeder is not None and self.machine.pid is not None
        await self.feeder.written()
        emit(log, "going-live", icount=self.feeder.fed_icount,
             unfed_bytes=len(self._unfed), received_icount=self.reader.icount)
        await go_live.freeze_and_save(self.machine.qmp, self.machine.pid, self.machine.rrfile,
                                      self.feeder.fd, self.feeder.fed_icount,
                                      self.reader.disk_at_safe_point, timeout=120)
        self.live_icount = self.feeder.fed_icount
        await self.machine.stop()
        go_live.hand_over(self.machine.paths.snapshots)
        go_live.make_durable([self.machine.paths.disk, self.machine.paths.snapshots])

    async def run(self) -> str:
        """Replay until the guest shuts down or the primary fails.

        Returns "shut-down" (the primary's guest shut down and we replayed
        it), "live" (this side won the lock: the caller runs the VM on from
        the go-live snapshot), "lost-lock" or "failed"."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = self._fifo = open_fifo(self.machine.rrfile)
        if not self.standby:
            self.feeder = ReplayFeeder(fd)
        feeding: asyncio.Task[None] | None = None
        self._channel = await asyncio.start_server(
            self._on_connection, self.config.backup.address, self.config.backup.log_port)
        await self.detector.start()
        # The status socket answers once the log channel listens.
        published = await metrics.publish(self.run_dir, self.config.backup.metrics_port,
                                          self.snapshot)
        emit(log, "listening", address=self.config.backup.address,
             port=self.config.backup.log_port)
        # The replaying guest's NIC: its output never reaches the LAN; it is
        # only hashed, to compare with what the primary's guest sent.
        guest = open_dgram_port(self.machine.paths.controller_net,
                                self.machine.paths.guest_net) if self.machine.spec.mac else None
        if guest is not None:
            guest.listen(self.divergence.backup_produced)
        watch: asyncio.Task[str] | None = None
        try:
            # A standby answers a joining primary's heartbeats from the start.
            watch = asyncio.create_task(self._watch_primary())
            if self.standby:
                self.set_state("standby", "waiting for a primary running alone to join")
                state = asyncio.create_task(self._state_ready.wait())
                await asyncio.wait({state, watch}, return_when=asyncio.FIRST_COMPLETED)
                if watch.done():  # its primary failed before the join completed
                    state.cancel()
                    return await watch
            assert self.feeder is not None
            feeding = asyncio.create_task(self.feeder.run())
            await self.machine.launch()
            if self.state == "starting":
                self.set_state("waiting-for-primary", "replay QEMU started")
            exited = asyncio.create_task(self.machine.wait())
            await asyncio.wait({watch, exited}, return_when=asyncio.FIRST_COMPLETED)
            if watch.done() or self.state == "going-live":  # going live stops QEMU itself
                exited.cancel()
                return await watch
            code = exited.result()
            emit(log, "qemu-exited", code=code, shutdown_cause=self.shutdown_cause,
                 icount=self.reader.icount)
            if self.shutdown_cause is not None:
                # The primary shut its guest down and we replayed it: not a failure,
                # so the backup does not go live (paper section 2.3).
                self.set_state("shut-down", f"replayed the guest's shutdown "
                               f"({self.shutdown_cause})")
                emit(log, "shutdown-replayed", cause=self.shutdown_cause)
                return "shut-down"
            self.set_state("failed", f"replay QEMU exited with {code}", logging.ERROR)
            self._error(f"replay QEMU exited with {code}: {self.machine.stderr_tail()}")
            return "failed"
        finally:
            if watch is not None:
                watch.cancel()
            self._channel.close()
            self.detector.close()
            published.close()
            if feeding is not None:
                feeding.cancel()
            if guest is not None:
                guest.close()
            if self._session_task is not None:
                self._session_task.cancel()
            await self.machine.stop()
            os.close(fd)
