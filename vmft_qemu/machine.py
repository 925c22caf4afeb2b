"""The virtual machine: one QEMU process, launched the same way on both sides.

The paper's primary and backup are the same VM on two hosts: same virtual
hardware, one executing, one replaying.  `command_line()` builds QEMU's
arguments from one `VMSpec` for every role, so the device configuration can
never differ between them (a replay with even one extra device hangs, see
qemu-rr-facts.md); only the record/replay mode and the per-host paths change.
`Machine` starts that QEMU, watches it with psutil and talks QMP to it.
"""

from __future__ import annotations

import asyncio
import ctypes
import enum
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil
from qemu.qmp import ConnectError, QMPClient

from .config import FTConfig
from .images import GuestImage

log = logging.getLogger(__name__)

PLUGIN_DIR = Path(__file__).resolve().parent.parent / "qemu_plugins" / "build"


class Role(enum.Enum):
    """How the QEMU executes: the FT roles plus the baselines the benchmarks use."""

    PLAIN = "plain"  # TCG without icount
    ICOUNT = "icount"  # TCG with icount, no record/replay
    RECORD = "record"  # the primary: executes and writes the replay log
    REPLAY = "replay"  # the backup: re-executes from the replay log


@dataclass(frozen=True)
class VMSpec:
    """Everything that defines the virtual hardware and the guest."""

    name: str
    memory_mib: int
    image: GuestImage
    workload: str = "ticks"
    icount_shift: str = "3"
    disk: bool = True
    qemu: str = "qemu-system-x86_64"
    extra_append: str = ""
    mac: str | None = None  # the guest's NIC; None: no network
    ip: str | None = None  # the guest's address/prefix, e.g. 192.168.77.10/24
    tap: str | None = None  # NIC straight on this TAP: a baseline without FT
    log_flush_us: int = 0  # record side: flush the replay log this often (0: never)
    replay_kick_us: int = 0  # replay side: look this often for a halted vCPU to wake (0: never)
    throttle: bool = False  # record side: load the throttle plugin for lag control
    rtc_base: str = "2026-01-01T00:00:00"  # the guest's RTC at its first boot (UTC)

    @classmethod
    def from_config(cls, config: FTConfig, image: GuestImage) -> "VMSpec":
        vm = config.vm
        return cls(name=vm.name, memory_mib=vm.memory_mib, image=image,
                   workload=vm.workload, icount_shift=vm.icount_shift, disk=vm.disk,
                   qemu=vm.qemu, mac=vm.mac or None, ip=vm.ip or None,
                   log_flush_us=config.primary.log_flush_us,
                   replay_kick_us=config.backup.replay_kick_us, throttle=config.lag.control,
                   rtc_base=vm.rtc_base)

    @property
    def append(self) -> str:
        args = f"console=ttyS0 panic=-1 quiet vmft.workload={self.workload}"
        if self.mac and self.ip:
            args += f" vmft.ip={self.ip}"
        return f"{args} {self.extra_append}".strip()


@dataclass(frozen=True)
class MachinePaths:
    """Where one side keeps its QEMU's files."""

    run_dir: Path

    @property
    def qmp(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def console(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.run_dir / "qemu.log"

    @property
    def disk(self) -> Path:
        return self.run_dir / "disk.qcow2"

    @property
    def snapshots(self) -> Path:
        return self.run_dir / "snapshots.qcow2"

    @property
    def throttle(self) -> Path:
        """The throttle plugin's control file (`lag_control.Throttle`)."""
        return self.run_dir / "throttle.ctl"

    @property
    def log_flush(self) -> Path:
        """The logflush plugin's flush socket (`log_flush.FlushRequests`)."""
        return self.run_dir / "logflush.sock"

    @property
    def log_flush_controller(self) -> Path:
        """The controller's end of the flush socket."""
        return self.run_dir / "logflush-controller.sock"

    @property
    def guest_net(self) -> Path:
        """QEMU's end of the guest NIC's datagram socket."""
        return self.run_dir / "net-qemu.sock"

    @property
    def controller_net(self) -> Path:
        """The controller's end of the guest NIC's datagram socket."""
        return self.run_dir / "net-controller.sock"


def command_line(spec: VMSpec, role: Role, paths: MachinePaths,
                 rrfile: Path | None = None, loadvm: str | None = None,
                 rrsnapshot: str | None = None, paused: bool = False) -> list[str]:
    """QEMU's arguments for `spec` in `role`; identical devices in every role.

    With `loadvm`, the guest resumes from that snapshot (taken by `go_live` or
    `reprotect`).  `rrsnapshot`: the snapshot QEMU's record/replay starts from
    (a recording saves it as it starts, a replay loads it: `reprotect`);
    `paused`: the guest waits for QMP `cont`."""
    args = [
        spec.qemu, "-name", spec.name, "-machine", "q35", "-cpu", "qemu64",
        "-m", str(spec.memory_mib), "-nodefaults", "-no-user-config",
        "-display", "none",
        "-kernel", str(spec.image.kernel), "-initrd", str(spec.image.initrd),
        "-append", spec.append,
        "-chardev", f"file,id=console,path={paths.console},append=on", "-serial", "chardev:console",
        "-qmp", f"unix:{paths.qmp},server=on,wait=off",
        # The RTC runs on the guest's virtual clock from a fixed date: QEMU
        # reads the host clock for its start date outside the replay log, and
        # with the host clock every snapshot load logs clock reads, which
        # would hide where a replay loads its snapshot (`reprotect`).
        "-rtc", f"base={spec.rtc_base},clock=vm",
        # A qcow2 drive no device uses: where savevm puts the VM state.
        "-drive", f"file={paths.snapshots},if=none,id=rr,format=qcow2",
    ]
    if spec.disk:
        # Block I/O completions go through blkreplay so they are in the log.
        # A replay cannot move past a completion the log holds until its own
        # request has completed too, so a guest flush that the host's disk
        # keeps waiting (seen: 12.6 s) would halt the backup, and lag control
        # the primary with it.  The backup's copy needs to be durable only once
        # it goes live (`go_live.make_durable`), so its QEMU does not flush.
        no_flush = ",cache.no-flush=on" if role is Role.REPLAY else ""
        args += [
            "-drive", f"file={paths.disk},if=none,id=disk0-img,format=qcow2{no_flush}",
            "-drive", "driver=blkreplay,if=none,image=disk0-img,id=disk0",
            "-device", "virtio-blk-pci,drive=disk0",
        ]
    if spec.mac and spec.tap:
        args += [
            "-netdev", f"tap,id=net0,ifname={spec.tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=net0,mac={spec.mac},romfile=",
        ]
    elif spec.mac:
        # One frame per datagram to the controller.  filter-replay on the
        # netdev's transmit queue (what the netdev sends to the guest: QEMU's
        # "queue=tx") puts every frame the guest receives into the log (record)
        # and feeds it from there (replay).  The guest's own output passes by
        # it; on the backup it reaches the controller, which compares and drops it.
        args += [
            "-netdev", f"dgram,id=net0,local.type=unix,local.path={paths.guest_net},"
                       f"remote.type=unix,remote.path={paths.controller_net}",
            "-object", "filter-replay,id=net0-replay,netdev=net0,queue=tx",
            "-device", f"virtio-net-pci,netdev=net0,mac={spec.mac},romfile=",
        ]
    if role is not Role.PLAIN:
        icount = f"shift={spec.icount_shift}"
        if role in (Role.RECORD, Role.REPLAY):
            if rrfile is None:
                raise ValueError(f"role {role.value} needs a replay log file")
            mode = "record" if role is Role.RECORD else "replay"
            icount += f",rr={mode},rrfile={rrfile}"
            if rrsnapshot:
                icount += f",rrsnapshot={rrsnapshot}"
        args += ["-icount", icount]
    if role is Role.RECORD and spec.log_flush_us:
        # logflush.c: the recording wakes its vCPU as soon as an input is
        # queued, so that it reaches the guest at once, and pushes its log out
        # every interval and whenever the output gate asks; the replay wakes
        # its vCPU whenever it has halted, to take the checkpoints those
        # wake-ups logged.
        args += _plugin("logflush", f"interval_us={spec.log_flush_us}", "kick=inputs",
                        f"flush_socket={paths.log_flush}")
    if role is Role.REPLAY and spec.replay_kick_us:
        args += _plugin("logflush", "kick=halted", f"poll_us={spec.replay_kick_us}")
    if role is Role.RECORD and spec.throttle:
        # Only the recording is throttled; the replay needs no plugin.
        args += _plugin("throttle", f"control={paths.throttle}")
    if loadvm:
        args += ["-loadvm", loadvm]
    if paused:
        args += ["-S"]
    return args


def _plugin(name: str, *plugin_args: str) -> list[str]:
    plugin = PLUGIN_DIR / f"lib{name}.so"
    if not plugin.exists():
        raise FileNotFoundError(f"{plugin} is missing: build it with `make -C qemu_plugins` "
                                "(part of `make setup`)")
    return ["-plugin", ",".join([str(plugin), *plugin_args])]


def die_with_parent() -> None:
    """In the child: get SIGKILL when the controller dies, so no QEMU outlives it;
    and run at normal priority even if the controller runs above it."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.setpriority(os.PRIO_PROCESS, 0, 0)


async def savevm(qmp: QMPClient, name: str, timeout: float, error: type[Exception],
                 check: Callable[[int], None] = lambda icount: None) -> tuple[int, int]:
    """Stop the guest and `savevm NAME`; the guest stays stopped.  Returns the
    icount it stopped at and the attempts taken.

    `savevm` is refused while QEMU still has a disk completion queued that the
    log did not deliver: the VM runs a moment (`cont`) and it is tried again.
    `check(icount)` may refuse the stopping point before anything is saved;
    a failed savevm raises `error`."""
    deadline = time.monotonic() + timeout
    attempts = 0
    while True:
        attempts += 1
        await qmp.execute("stop")
        at = (await qmp.execute("query-replay"))["icount"]
        check(at)
        out = await qmp.execute("human-monitor-command", {"command-line": f"savevm {name}"})
        if not out.strip():
            return at, attempts
        if "does not allow" not in out or time.monotonic() > deadline:
            raise error(f"savevm failed: {out.strip()}")
        await qmp.execute("cont")
        await asyncio.sleep(0.01)


def qemu_img(*args: str, error: type[Exception] = RuntimeError) -> str:
    """Runs qemu-img; its output, or `error` with qemu-img's own message."""
    done = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise error(f"qemu-img {' '.join(args[:2])}: {done.stderr.strip()}")
    return done.stdout


class Machine:
    """One QEMU process of the FT pair (or of a benchmark baseline)."""

    def __init__(self, spec: VMSpec, role: Role, run_dir: Path,
                 rrfile: Path | None = None, netns: str | None = None,
                 loadvm: str | None = None, rrsnapshot: str | None = None,
                 paused: bool = False) -> None:
        """`loadvm`, `rrsnapshot`: resume from that snapshot in run_dir's own
        disk and snapshot drive instead of booting (see `command_line`)."""
        self.spec = spec
        self.loadvm = loadvm
        self.rrsnapshot = rrsnapshot
        self.paused = paused
        self.netns = netns  # run QEMU in this network namespace
        self.role = role
        self.paths = MachinePaths(run_dir)
        self.rrfile = rrfile
        self.process: asyncio.subprocess.Process | None = None
        self.ps: psutil.Process | None = None
        self._qmp: QMPClient | None = None

    def prepare(self) -> None:
        """Create the run directory, the snapshot drive and this side's disk copy."""
        self.paths.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in (self.paths.qmp, self.paths.guest_net):
            stale.unlink(missing_ok=True)
        if self.loadvm or self.rrsnapshot:
            return  # the guest carries on: same console, disk and snapshots
        for stale in (self.paths.console, self.paths.disk, self.paths.snapshots):
            stale.unlink(missing_ok=True)
        qemu_img("create", "-f", "qcow2", str(self.paths.snapshots), "16M")
        if self.spec.disk:
            qemu_img("create", "-f", "qcow2", "-F", "raw", "-b",
                     str(self.spec.image.rootfs), str(self.paths.disk))

    @property
    def args(self) -> list[str]:
        args = command_line(self.spec, self.role, self.paths, self.rrfile, self.loadvm,
                            self.rrsnapshot, self.paused)
        return ["ip", "netns", "exec", self.netns, *args] if self.netns else args

    async def launch(self) -> None:
        self.prepare()
        with open(self.paths.qemu_log, "wb") as qlog:
            self.process = await asyncio.create_subprocess_exec(
                *self.args, stdin=subprocess.DEVNULL, stdout=qlog, stderr=qlog,
                preexec_fn=die_with_parent)
        self.ps = psutil.Process(self.process.pid)
        log.info("qemu started", extra={"event": "qemu-started", "role": self.role.value,
                                        "pid": self.process.pid})

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def wait(self) -> int:
        assert self.process is not None
        return await self.process.wait()

    async def qmp(self, timeout: float = 30.0) -> QMPClient:
        """A connected QMP client (the socket appears once QEMU is set up)."""
        if self._qmp is None:
            async with asyncio.timeout(timeout):
                while True:
                    if not self.running():
                        raise RuntimeError(f"QEMU is not running: {self.stderr_tail()}")
                    if self.paths.qmp.exists():
                        client = QMPClient(f"{self.spec.name}-{self.role.value}")
                        try:
                            await client.connect(str(self.paths.qmp))
                            break
                        except ConnectError as e:  # seen: the greeting raced QEMU's start
                            log.info("qmp connect failed, retrying: %s", e)
                    await asyncio.sleep(0.1)
            self._qmp = client
        return self._qmp

    @property
    def log_file(self) -> Path:
        """Where QEMU's stderr goes."""
        return self.paths.qemu_log

    def stderr_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_file.read_text(errors="replace").strip()
        except OSError:
            return ""
        return " | ".join(text.splitlines()[-lines:])

    def cpu_percent(self) -> float:
        try:
            return self.ps.cpu_percent() if self.ps else 0.0
        except psutil.Error:
            return 0.0

    def _signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def terminate(self) -> None:
        """Ask QEMU to shut down (SIGTERM: under record it logs the shutdown)."""
        if self.running():
            self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """Stop QEMU at once (SIGKILL): this side must not run the guest any more."""
        if self.running():
            self._signal(signal.SIGKILL)

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; always reaps the process."""
        if self._qmp is not None:
            try:
                await asyncio.wait_for(self._qmp.disconnect(), 1.0)
            except Exception:  # QEMU may be gone or unresponsive
                pass
            self._qmp = None
        if not self.running():
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                self._signal(sig)
            except ProcessLookupError:
                break
            try:
                await asyncio.wait_for(self.wait(), timeout)
                return
            except TimeoutError:
                continue


def for_config(config: FTConfig, image: GuestImage, role: Role, run_dir: Path, rrfile: Path,
               loadvm: str | None = None, rrsnapshot: str | None = None,
               paused: bool = False) -> Machine:
    """A controller's QEMU, started as `vm.launcher` says: by the controller or by libvirt."""
    spec = VMSpec.from_config(config, image)
    if config.vm.launcher == "libvirt":
        from .libvirt_domain import LibvirtMachine   # it builds on this module
        return LibvirtMachine(spec, role, run_dir, rrfile=rrfile, loadvm=loadvm,
                              rrsnapshot=rrsnapshot, paused=paused, uri=config.vm.libvirt_uri)
    return Machine(spec, role, run_dir, rrfile=rrfile, loadvm=loadvm, rrsnapshot=rrsnapshot,
                   paused=paused)
