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
monitor, -accel tcg, ...), so their devices still match.

The domain runs QEMU as root without relabelling (a static DAC label), since
its files are the controller's (pipes, sockets, disks in the run directory);
it has no USB controller and no balloon, which libvirt would otherwise add.
libvirt is driven through `virsh` with a fixed argv: the libvirt-python
binding has no wheel on PyPI and would need libvirt-dev and a compiler on
every host.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from .machine import MachinePaths, Role, VMSpec, command_line

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
CONNECT = "qemu:///system"
PID_DIR = Path("/run/libvirt/qemu")          # libvirtd writes NAME.pid here
NATIVE = ("-name", "-m", "-machine", "-cpu", "-kernel", "-initrd", "-append")
LIBVIRT_ADDS = ("-nodefaults", "-no-user-config")   # flags libvirt always passes
LIBVIRT_ADDS_WITH_VALUE = {"-display": "none"}      # without <graphics>: -display none
VIRSH_TIMEOUT = 60.0

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
               loadvm: str | None = None) -> str:
    """The libvirt domain of this VM's QEMU in `role`, from `command_line()`."""
    argv = command_line(spec, role, paths, rrfile, loadvm)
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
    for arg in rest:
        ET.SubElement(commandline, f"{{{QEMU_NS}}}arg", value=arg)
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode") + "\n"


def passthrough(xml: str) -> list[str]:
    """The `<qemu:commandline>` arguments of a domain, in order."""
    root = ET.fromstring(xml)
    return [arg.get("value", "") for arg in root.iterfind(f"{{{QEMU_NS}}}commandline/"
                                                           f"{{{QEMU_NS}}}arg")]


def virsh(*args: str, timeout: float = VIRSH_TIMEOUT) -> str:
    cmd = ["virsh", "-c", CONNECT, *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LibvirtError(f"{' '.join(cmd)}: {e}") from None
    if done.returncode != 0:
        raise LibvirtError(f"{' '.join(cmd)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


class Domain:
    """A transient libvirt domain (`virsh create`): gone from libvirt once QEMU ends."""

    def __init__(self, xml: str, run_dir: Path) -> None:
        self.xml = xml
        self.name = ET.fromstring(xml).findtext("name") or ""
        self.xml_path = run_dir / "domain.xml"

    def create(self) -> None:
        self.xml_path.parent.mkdir(parents=True, exist_ok=True)
        self.xml_path.write_text(self.xml)
        virsh("create", str(self.xml_path))

    def running(self) -> bool:
        return self.name in virsh("list", "--name").split()

    def pid(self) -> int:
        """QEMU's PID, as libvirtd recorded it."""
        return int((PID_DIR / f"{self.name}.pid").read_text())

    def destroy(self) -> None:
        """Stop QEMU at once (libvirt's SIGTERM then SIGKILL); no error if it is gone."""
        if self.running():
            virsh("destroy", self.name)

    def native_argv(self) -> list[str]:
        """The QEMU command line libvirt runs for this domain (`virsh domxml-to-native`)."""
        return virsh("domxml-to-native", "qemu-argv", str(self.xml_path)).split()


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
                    "arguments.  `virsh create` starts it; it then shows in `virsh list`.")
    p.add_argument("action", choices=["xml"])
    p.add_argument("--config", type=Path, required=True, help="the pair's TOML file")
    p.add_argument("--role", choices=["primary", "backup"], required=True)
    p.set_defaults(func=cmd_libvirt)
