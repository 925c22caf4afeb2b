"""One VM, two hosts, through libvirt: the same QEMU command line as a libvirt domain.

Where a host runs libvirtd, vmft's QEMU can be started by libvirt's QEMU
driver, so the FT VMs show up in `virsh list` next to the host's other
guests.  The paper's rule that primary and backup are the same virtual
hardware holds only if nothing is described twice, so the domain is made
from `machine.command_line()` itself: the options libvirt has elements for
(name, memory, machine type, CPU model, kernel, initrd, kernel command line)
become those elements, the ones libvirt always adds itself (-nodefaults,
-no-user-config, -display none) are dropped, and every other argument (the
-icount rr options, the replay drives, the chardevs, QMP, NICs, plugins,
-loadvm) goes through unchanged, in order, as `<qemu:commandline>` arguments.
Both sides started this way get libvirt's additions alike (its own QMP
monitor, -accel tcg, ...), so their devices still match; the one addition
that differs per domain, its UUID, reaches the guest (SMBIOS, fw_cfg), so
the guest's is pinned to one per VM.

With `vm.launcher = "libvirt"` the controllers start their QEMU this way
(`LibvirtMachine`, the same interface as `machine.Machine`): a transient
domain named vmft-VM-primary (the recording) or vmft-VM-backup (the
replay), which the controller still drives through its own QMP socket.
The domain is created with --autodestroy over a `virsh` process that lives
as long as the controller (it gets SIGKILL when the controller dies), so
libvirt destroys the domain whenever its controller goes, as a child QEMU
would die with it.  libvirt reaps QEMU, so its exit status is libvirt's
reason in the domain's log: "shutdown" (the guest's, or a SIGTERM) and
"destroyed" (`virsh destroy`: SIGTERM, a power-off) are 0, anything else
(SIGKILLed, crashed, failed) is 1.

The domain runs QEMU as root without relabelling (a static DAC label), since
its files are the controller's (pipes, sockets, disks in the run directory);
it has no USB controller and no balloon, which libvirt would otherwise add.
libvirt is driven through `virsh` with a fixed argv: the libvirt-python
binding has no wheel on PyPI and would need libvirt-dev and a compiler on
every host.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import re
import shlex
import shutil
import subprocess
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import psutil

from .machine import Machine, MachinePaths, Role, VMSpec, command_line, die_with_parent
from .waiting import wait_until

log = logging.getLogger(__name__)

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
CONNECT = "qemu:///system"
PID_DIR = Path("/run/libvirt/qemu")          # libvirtd writes NAME.pid here
LOG_DIR = Path("/var/log/libvirt/qemu")      # QEMU's stderr and libvirt's notes: NAME.log
STOP_REASON = re.compile(r"shutting down, reason=(\w+)")
CLEAN_STOPS = ("shutdown", "destroyed")     # QEMU ended as asked: exit status 0
NATIVE = ("-name", "-m", "-machine", "-cpu", "-kernel", "-initrd", "-append")
LIBVIRT_ADDS = ("-nodefaults", "-no-user-config")   # flags libvirt always passes
LIBVIRT_ADDS_WITH_VALUE = {"-display": "none"}      # without <graphics>: -display none
VIRSH_TIMEOUT = 60.0
CREATE_TIMEOUT = 300.0   # a replay's QEMU comes up only once its first log has come
GUEST_UUID_NS = uuid.UUID("6c1e8d1e-3f7a-4a8e-9a55-7d3c1e0f5b21")   # vmft's own namespace

ET.register_namespace("qemu", QEMU_NS)


class LibvirtError(RuntimeError):
    """virsh failed; the message has its command and output."""


def domain_name(spec: VMSpec, role: Role) -> str:
    """vmft-VM-primary / vmft-VM-backup (the baselines: vmft-VM-plain, -icount)."""
    side = {Role.RECORD: "primary", Role.REPLAY: "backup"}.get(role, role.value)
    return f"vmft-{spec.name}-{side}"


def split_args(args: list[str]) -> tuple[dict[str, str], list[str]]:
    """QEMU's argv (without the binary) as libvirt's own options and the rest, in order."""
    native: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in LIBVIRT_ADDS:
            i += 1
            continue
        value = args[i + 1] if i + 1 < len(args) else None
        if arg in NATIVE and value is not None and arg not in native:
            if arg in ("-machine", "-cpu") and "," in value:
                raise ValueError(f"{arg} {value}: options after the type have no libvirt element")
            native[arg] = value
            i += 2
        elif arg in LIBVIRT_ADDS_WITH_VALUE and LIBVIRT_ADDS_WITH_VALUE[arg] == value:
            i += 2
        else:
            rest.append(arg)
            i += 1
    return native, rest


def domain_xml(spec: VMSpec, role: Role, paths: MachinePaths, rrfile: Path | None = None,
               loadvm: str | None = None, rrsnapshot: str | None = None,
               paused: bool = False) -> str:
    """The libvirt domain of this VM's QEMU in `role`, from `command_line()`."""
    argv = command_line(spec, role, paths, rrfile, loadvm, rrsnapshot, paused)
    native, rest = split_args(argv[1:])
    emulator = shutil.which(argv[0]) or argv[0]
    domain = ET.Element("domain", type="qemu")
    ET.SubElement(domain, "name").text = domain_name(spec, role)
    ET.SubElement(domain, "title").text = f"vmft {spec.name}, {role.value} side"
    ET.SubElement(domain, "memory", unit="MiB").text = native["-m"]
    ET.SubElement(domain, "vcpu").text = "1"
    os_ = ET.SubElement(domain, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine=native["-machine"]).text = "hvm"
    for option, element in (("-kernel", "kernel"), ("-initrd", "initrd"), ("-append", "cmdline")):
        if option in native:
            ET.SubElement(os_, element).text = native[option]
    ET.SubElement(ET.SubElement(domain, "features"), "acpi")   # QEMU's default; libvirt's is off
    cpu = ET.SubElement(domain, "cpu", mode="custom", match="exact", check="none")
    ET.SubElement(cpu, "model", fallback="forbid").text = native["-cpu"]
    ET.SubElement(domain, "clock", offset="utc")
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(domain, event).text = "destroy"
    devices = ET.SubElement(domain, "devices")
    ET.SubElement(devices, "emulator").text = emulator
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")
    seclabel = ET.SubElement(domain, "seclabel", type="static", model="dac", relabel="no")
    ET.SubElement(seclabel, "label").text = "+0:+0"
    commandline = ET.SubElement(domain, f"{{{QEMU_NS}}}commandline")
    # libvirt gives every domain its own -uuid; the guest must see one per VM.
    guest_uuid = uuid.uuid5(GUEST_UUID_NS, spec.name)
    for arg in [*rest, "-smbios", f"type=1,uuid={guest_uuid}"]:
        ET.SubElement(commandline, f"{{{QEMU_NS}}}arg", value=arg)
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode") + "\n"


def passthrough(xml: str) -> list[str]:
    """The `<qemu:commandline>` arguments of a domain, in order."""
    root = ET.fromstring(xml)
    return [arg.get("value", "") for arg in root.iterfind(f"{{{QEMU_NS}}}commandline/"
                                                           f"{{{QEMU_NS}}}arg")]


def virsh(*args: str, uri: str = CONNECT, timeout: float = VIRSH_TIMEOUT) -> str:
    """One virsh command; its output, or LibvirtError."""
    cmd = ["virsh", "-c", uri, *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LibvirtError(f"{' '.join(cmd)}: {e}") from None
    if done.returncode != 0:
        raise LibvirtError(f"{' '.join(cmd)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


class VirshSession:
    """An interactive `virsh`: one connection to libvirtd, held open until close().

    It runs as the controller's child and gets SIGKILL when the controller
    dies, so the connection (and every --autodestroy domain made over it)
    never outlives the controller."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.proc: asyncio.subprocess.Process | None = None
        self._marks = itertools.count()

    async def open(self) -> None:
        # Only stderr is read: virsh writes it unbuffered, errors and end marks alike.
        self.proc = await asyncio.create_subprocess_exec(
            "virsh", "-q", "-c", self.uri, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            preexec_fn=die_with_parent)

    async def run(self, *args: str, timeout: float = VIRSH_TIMEOUT) -> None:
        """Run one command in the session; LibvirtError with virsh's errors if it failed."""
        assert self.proc is not None and self.proc.stdin and self.proc.stderr
        command = " ".join(shlex.quote(a) for a in args)
        mark = f"vmft-done-{next(self._marks)}"
        # virsh runs one command after the other: the mark comes after the command's errors.
        # Reading a pipe, it runs a line only once the next one has come: an empty one.
        self.proc.stdin.write(f"{command}\necho --err {mark}\n\n".encode())
        mark = f"error: {mark}"   # how virsh prints what goes to stderr
        said = []
        try:
            async with asyncio.timeout(timeout):
                await self.proc.stdin.drain()
                while (line := (await self.proc.stderr.readline()).decode(errors="replace")
                       .strip()) != mark:
                    if not line and self.proc.stderr.at_eof():
                        raise LibvirtError(f"virsh -c {self.uri}: {command}: virsh exited with "
                                           f"{await self.proc.wait()}: {' '.join(said)}")
                    said.append(line)
        except TimeoutError:
            raise LibvirtError(f"virsh -c {self.uri}: {command}: no answer in {timeout:.0f} s"
                               ) from None
        except ConnectionError as e:
            raise LibvirtError(f"virsh -c {self.uri}: {command}: {e}") from None
        if errors := [line for line in said if line.startswith("error:")]:
            raise LibvirtError(f"virsh -c {self.uri}: {command}: {' '.join(errors)}")

    async def close(self, timeout: float = 10.0) -> None:
        """End the session (libvirt then destroys its --autodestroy domains)."""
        if self.proc is None or self.proc.returncode is not None:
            return
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


class LibvirtMachine(Machine):
    """A side's QEMU as a transient libvirt domain; otherwise what `Machine` is."""

    def __init__(self, *args: Any, uri: str = CONNECT, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.uri = uri
        self.name = domain_name(self.spec, self.role)
        self.xml_path = self.paths.run_dir / "domain.xml"
        self.returncode: int | None = None
        self._session: VirshSession | None = None
        self._pid: int | None = None
        self._exited: asyncio.Future[None] | None = None
        self._log_from = 0

    @property
    def log_file(self) -> Path:
        return LOG_DIR / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        return self._pid

    async def launch(self) -> None:
        self.prepare()
        self.xml_path.write_text(domain_xml(self.spec, self.role, self.paths, self.rrfile,
                                            self.loadvm, self.rrsnapshot, self.paused))
        try:
            self._log_from = self.log_file.stat().st_size
        except OSError:
            self._log_from = 0
        self._session = VirshSession(self.uri)
        await self._session.open()
        try:
            await self._session.run("create", "--autodestroy", str(self.xml_path),
                                    timeout=CREATE_TIMEOUT)
            self._pid = int((PID_DIR / f"{self.name}.pid").read_text())
        except (LibvirtError, OSError, ValueError):
            await self._session.close()
            raise
        self.ps = psutil.Process(self._pid)
        self._watch_exit(self._pid)
        log.info("qemu started", extra={"event": "qemu-started", "role": self.role.value,
                                        "pid": self._pid, "domain": self.name})

    def _watch_exit(self, pid: int) -> None:
        """Resolve `_exited` when QEMU ends (a pidfd turns readable; it is not our child)."""
        loop = asyncio.get_running_loop()
        self._exited = loop.create_future()
        pidfd = os.pidfd_open(pid)

        def ended() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            if not self._exited.done():
                self._exited.set_result(None)

        loop.add_reader(pidfd, ended)

    def running(self) -> bool:
        return self._exited is not None and not self._exited.done()

    async def wait(self) -> int:
        """0 when libvirt says QEMU was shut down or destroyed, 1 for any other end."""
        assert self._exited is not None
        await asyncio.shield(self._exited)
        if self.returncode is None:
            reason = await self._stop_reason()
            self.returncode = 0 if reason in CLEAN_STOPS else 1
            log.info("qemu ended", extra={"event": "qemu-ended", "role": self.role.value,
                                          "domain": self.name, "reason": reason})
        return self.returncode

    async def _stop_reason(self, timeout: float = 10.0) -> str:
        """libvirt's reason for the stop, from the domain's log (written as it cleans up)."""
        def reason() -> str | None:
            try:
                with open(self.log_file, errors="replace") as f:
                    f.seek(self._log_from)
                    found = STOP_REASON.findall(f.read())
            except OSError:
                found = []
            return found[-1] if found else None

        try:
            return await wait_until(reason, timeout, f"libvirt's stop reason for {self.name}")
        except TimeoutError:
            return "unknown"

    def _signal(self, sig: int) -> None:
        assert self._pid is not None
        os.kill(self._pid, sig)

    async def stop(self, timeout: float = 5.0) -> None:
        await super().stop(timeout)
        if self._session is not None:
            await self._session.close()


def cmd_libvirt(args: argparse.Namespace) -> int:
    from . import config as cfg
    from .images import ImageMissing, locate

    try:
        config = cfg.load(args.config)
        image = locate(config.vm.image_cache)
    except (cfg.ConfigError, ImageMissing) as e:
        raise SystemExit(f"vmft: {e}") from None
    role = Role.RECORD if args.role == "primary" else Role.REPLAY
    run_dir = config.primary.run_dir if args.role == "primary" else config.backup.run_dir
    # The controller's record or replay pipe in its run directory (primary.py, backup.py).
    rrfile = run_dir / ("record.fifo" if args.role == "primary" else "replay.fifo")
    print(domain_xml(VMSpec.from_config(config, image), role, MachinePaths(run_dir), rrfile),
          end="")
    return 0


def add_cli(sub: Any) -> None:
    """`vmft libvirt xml --config F --role primary|backup`."""
    p = sub.add_parser(
        "libvirt", help="the libvirt domain XML of a side's QEMU",
        description="Print the libvirt domain of one side's QEMU, made from the same command "
                    "line vmft runs itself: libvirt's own elements for name, memory, machine, "
                    "CPU and kernel, everything else (the -icount record/replay options, "
                    "drives, chardevs, QMP, NIC, plugins) unchanged as <qemu:commandline> "
                    "arguments.  With [vm] launcher = \"libvirt\" the controllers create it "
                    "themselves (as vmft-VM-primary / vmft-VM-backup in `virsh list`); this "
                    "prints it to read, or to run by hand with `virsh create`.")
    p.add_argument("action", choices=["xml"])
    p.add_argument("--config", type=Path, required=True, help="the pair's TOML file")
    p.add_argument("--role", choices=["primary", "backup"], required=True)
    p.set_defaults(func=cmd_libvirt)
