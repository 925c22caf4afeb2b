"""vmft's QEMU as a libvirt domain: made from the same command line, run by a real libvirtd.

The unit tests parse the domain XML back and check that it describes exactly
`machine.command_line()`'s QEMU for every role (plus the pinned guest UUID),
and that `vm.launcher` picks who starts QEMU.  The live test starts
libvirtd (and virtlogd) itself unless one already answers, runs an FT pair
whose two QEMUs are libvirt domains (`vm.launcher = "libvirt"`), sees both
in `virsh list`, the backup's console follow the primary's, and a failover
when the primary's controller is killed: libvirt destroys its domain and
the backup's recording QEMU, from the go-live snapshot, is the new
vmft-VM-primary, which a SIGTERM then shuts down cleanly (exit status 0).
It stops everything it started by PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from vmft_qemu import config as cfg
from vmft_qemu import images
from vmft_qemu import libvirt_domain as lv
from vmft_qemu import machine
from vmft_qemu.go_live import SNAPSHOT
from vmft_qemu.machine import MachinePaths, Role, VMSpec, command_line
from vmft_qemu.pair import LocalPair
from vmft_qemu.waiting import wait_for

GUEST = dict(name="lvt", memory_mib=256, mac="52:54:00:77:00:10", ip="192.168.77.10/24")


def spec(image: images.GuestImage) -> VMSpec:
    return VMSpec(image=image, **GUEST)


def argv_of(xml: str) -> list[str]:
    """The QEMU options a domain describes: its native elements as options, then the rest."""
    root = ET.fromstring(xml)
    argv = ["-name", root.findtext("name").removeprefix("vmft-").rsplit("-", 1)[0],
            "-machine", root.find("os/type").get("machine"),
            "-cpu", root.findtext("cpu/model"),
            "-m", root.findtext("memory"),
            "-kernel", root.findtext("os/kernel"), "-initrd", root.findtext("os/initrd"),
            "-append", root.findtext("os/cmdline")]
    return argv + pinned_uuid(xml)[0]


def pinned_uuid(xml: str) -> tuple[list[str], str]:
    """The passthrough arguments without the guest UUID libvirt's -uuid is overridden with,
    and that UUID."""
    rest = lv.passthrough(xml)
    assert rest[-2] == "-smbios" and rest[-1].startswith("type=1,uuid=")
    return rest[:-2], rest[-1].removeprefix("type=1,uuid=")


def options(argv: list[str]) -> list[tuple[str, ...]]:
    """argv as sorted (option, value) pairs, without what libvirt adds by itself."""
    native, rest = lv.split_args(argv)
    return sorted(list(native.items()) + [tuple(rest[i:i + 2]) for i in range(0, len(rest), 2)])


@pytest.mark.parametrize("role", [Role.RECORD, Role.REPLAY])
def test_the_domain_describes_exactly_the_command_line(tmp_path: Path, image, role) -> None:
    paths = MachinePaths(tmp_path)
    rrfile = tmp_path / "log.fifo"
    xml = lv.domain_xml(spec(image), role, paths, rrfile)
    root = ET.fromstring(xml)
    side = "primary" if role is Role.RECORD else "backup"
    assert root.get("type") == "qemu" and root.findtext("name") == f"vmft-lvt-{side}"
    assert root.find("features/acpi") is not None           # as QEMU's own default
    assert root.find("devices/memballoon").get("model") == "none"
    assert root.find("seclabel/label").text == "+0:+0"
    qemu_argv = command_line(spec(image), role, paths, rrfile)
    assert options(argv_of(xml)) == options(qemu_argv[1:])
    # The record/replay options go through verbatim.
    icount = qemu_argv[qemu_argv.index("-icount") + 1]
    assert f"rr={role.value}" in icount and icount in lv.passthrough(xml)


def test_primary_and_backup_domains_differ_only_where_the_command_lines_do(tmp_path, image):
    record, record_uuid = pinned_uuid(lv.domain_xml(spec(image), Role.RECORD,
                                                    MachinePaths(tmp_path), tmp_path / "log"))
    replay, replay_uuid = pinned_uuid(lv.domain_xml(spec(image), Role.REPLAY,
                                                    MachinePaths(tmp_path), tmp_path / "log"))
    # libvirt gives each domain a UUID of its own; the guest sees one per VM.
    assert record_uuid == replay_uuid
    other = VMSpec(image=image, **{**GUEST, "name": "other"})
    assert pinned_uuid(lv.domain_xml(other, Role.RECORD, MachinePaths(tmp_path),
                                     tmp_path / "log"))[1] != record_uuid
    devices = [a for a in record if a.startswith(("virtio-", "dgram", "filter-replay"))]
    assert devices and devices == [a for a in replay if a.startswith(("virtio-", "dgram",
                                                                      "filter-replay"))]


def test_options_without_a_libvirt_element_are_refused() -> None:
    with pytest.raises(ValueError, match="-machine q35,accel=kvm"):
        lv.split_args(["-machine", "q35,accel=kvm"])


def test_the_launcher_picks_who_starts_qemu(tmp_path: Path, image) -> None:
    mine = machine.for_config(cfg.from_dict({"vm": {"name": "lvt"}}), image, Role.RECORD,
                              tmp_path, tmp_path / "record.fifo")
    assert type(mine) is machine.Machine
    config = cfg.from_dict({"vm": {"name": "lvt", "launcher": "libvirt",
                                   "libvirt_uri": "qemu:///system"}})
    theirs = machine.for_config(config, image, Role.REPLAY, tmp_path, tmp_path / "replay.fifo")
    assert isinstance(theirs, lv.LibvirtMachine) and theirs.name == "vmft-lvt-backup"
    assert theirs.pid is None and not theirs.running()


@pytest.mark.parametrize("vm, message", [
    ({"launcher": "virsh"}, "vm.launcher = 'virsh': must be qemu or libvirt"),
    ({"launcher": "libvirt", "libvirt_uri": "qemu+ssh://b/system"},
     "vm.libvirt_uri = 'qemu+ssh://b/system': must be a local system URI"),
    ({"libvirt_uri": "xen:///system"}, "QEMU must run where its controller does"),
])
def test_bad_launcher_settings_are_refused(vm: dict, message: str) -> None:
    with pytest.raises(cfg.ConfigError, match=message.replace("+", r"\+").replace("(", r"\(")):
        cfg.from_dict({"vm": vm}, "pair.toml")


# --- a real libvirtd ------------------------------------------------------------------

def _answers() -> bool:
    try:
        lv.virsh("version", timeout=10)
        return True
    except lv.LibvirtError:
        return False


@pytest.fixture
def libvirtd(tmp_path: Path) -> Iterator[None]:
    """libvirtd with virtlogd, started here (and stopped by PID) unless one answers."""
    if _answers():
        yield
        return
    started = []
    try:
        for daemon in ("virtlogd", "libvirtd"):
            pid_file = tmp_path / f"{daemon}.pid"
            subprocess.run([daemon, "--daemon", "--pid-file", str(pid_file)], check=True,
                           timeout=30)
            started.append(int(wait_for(lambda: pid_file.exists() and pid_file.read_text(),
                                        10, f"{daemon}'s PID file", every=0.05)))
        wait_for(_answers, 30, "libvirtd to answer")
        yield
    finally:
        for pid in reversed(started):
            proc = psutil.Process(pid)
            proc.terminate()
            proc.wait(15)


def domains() -> list[str]:
    return lv.virsh("list", "--name").split()


def qemu_of(pair: LocalPair, role: str) -> psutil.Process:
    """The QEMU a side's controller drives, as its status names it."""
    return psutil.Process(wait_for(lambda: pair.status(role).get("qemu_pid"), 60,
                                   f"the {role}'s QEMU"))


def ticks(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("tick ")]


def consoles(pair: LocalPair) -> str:
    """Both consoles' files and the primary's controller output, for a failure message
    (once, a primary's console read empty while the backup had replayed three ticks)."""
    def tail(path: Path) -> str:
        try:
            return f"{path}: {path.stat().st_size} bytes, ends {path.read_text()[-300:]!r}"
        except OSError as e:
            return f"{path}: {e}"
    return "\n".join([*(tail(pair.run_dir(role) / "console.log") for role in ("primary", "backup")),
                      pair.output("primary")[-2000:]])


@pytest.mark.qemu
def test_an_ft_pair_under_libvirt_shows_in_virsh_and_fails_over(tmp_path: Path, image,
                                                                 libvirtd) -> None:
    pair = LocalPair(tmp_path / "pair", launcher="libvirt")
    primary, backup = (f"vmft-{pair.name}-{side}" for side in ("primary", "backup"))
    try:
        pair.start_both()
        wait_for(lambda: {primary, backup} <= set(domains()), 120, "both domains in virsh list")
        recording = qemu_of(pair, "primary")
        assert int((lv.PID_DIR / f"{primary}.pid").read_text()) == recording.pid
        # vmft's own arguments reach QEMU verbatim and in order, after libvirt's.
        ours = lv.passthrough((pair.run_dir("primary") / "domain.xml").read_text())
        cmdline = recording.cmdline()
        assert any(cmdline[i:i + len(ours)] == ours for i in range(len(cmdline)))
        assert any(a.startswith("shift=3,rr=record,rrfile=") for a in ours)
        # The backup's replay shows what the primary's guest printed.
        wait_for(lambda: len(ticks(pair.console("backup"))) >= 3, 150,
                 "the backup to replay three ticks")
        replayed = ticks(pair.console("backup"))
        assert replayed == ticks(pair.console("primary"))[:len(replayed)], consoles(pair)

        # The primary's controller dies: libvirt destroys its domain, the backup goes live.
        os.killpg(pair.procs["primary"].pid, signal.SIGKILL)
        pair.procs["primary"].wait(10)
        wait_for(lambda: not psutil.pid_exists(recording.pid), 30,
                 "libvirt to destroy the old primary's domain")
        wait_for(lambda: pair.status("backup").get("state") == "alone", 60,
                 "the backup to go live")
        live = qemu_of(pair, "backup")
        assert live.pid != recording.pid and "-loadvm" in live.cmdline()
        assert SNAPSHOT in live.cmdline() and primary in domains() and backup not in domains()
        before = len(ticks(pair.console("backup")))
        wait_for(lambda: len(ticks(pair.console("backup"))) > before + 1, 60,
                 "the guest to tick on under the new primary")

        # A clean stop of the VM running alone: libvirt's reason "shutdown" is exit status 0.
        pair.procs["backup"].send_signal(signal.SIGTERM)
        assert pair.wait_exit("backup", 60) == 0, pair.output("backup")[-2000:]
        assert primary not in domains()
    finally:
        pair.stop()
    assert not {primary, backup} & set(lv.virsh("list", "--all", "--name").split())
