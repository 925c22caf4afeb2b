"""vmft's QEMU as a libvirt domain: made from the same command line, run by a real libvirtd.

The unit tests parse the domain XML back and check that it describes exactly
`machine.command_line()`'s QEMU for every role.  The live test starts
libvirtd (and virtlogd) itself unless one already answers, creates the
domain of a recording primary, sees it in `virsh list`, sees the guest boot
on its console and QMP report record mode at a growing icount, and stops
everything it started by PID.
"""

from __future__ import annotations

import asyncio
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from vmft_qemu import images
from vmft_qemu import libvirt_domain as lv
from vmft_qemu.machine import Machine, MachinePaths, Role, VMSpec, command_line
from vmft_qemu.pair import wait_for

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
    return argv + lv.passthrough(xml)


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
    record = lv.passthrough(lv.domain_xml(spec(image), Role.RECORD, MachinePaths(tmp_path),
                                          tmp_path / "log"))
    replay = lv.passthrough(lv.domain_xml(spec(image), Role.REPLAY, MachinePaths(tmp_path),
                                          tmp_path / "log"))
    devices = [a for a in record if a.startswith(("virtio-", "dgram", "filter-replay"))]
    assert devices and devices == [a for a in replay if a.startswith(("virtio-", "dgram",
                                                                      "filter-replay"))]


def test_options_without_a_libvirt_element_are_refused() -> None:
    with pytest.raises(ValueError, match="-machine q35,accel=kvm"):
        lv.split_args(["-machine", "q35,accel=kvm"])


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


@pytest.mark.qemu
def test_libvirt_runs_the_recording_primary_and_virsh_lists_it(tmp_path: Path, image,
                                                                libvirtd) -> None:
    vm = VMSpec(name="lvt", memory_mib=256, image=image)
    machine = Machine(vm, Role.RECORD, tmp_path / "run", rrfile=tmp_path / "run" / "log.bin")
    machine.prepare()
    domain = lv.Domain(lv.domain_xml(vm, Role.RECORD, machine.paths, machine.rrfile),
                       machine.paths.run_dir)
    domain.create()
    try:
        assert domain.name in lv.virsh("list", "--name").split()
        qemu = psutil.Process(domain.pid())
        # vmft's own arguments reach QEMU verbatim and in order, after libvirt's.
        cmdline, ours = qemu.cmdline(), lv.passthrough(domain.xml)
        assert any(cmdline[i:i + len(ours)] == ours for i in range(len(cmdline)))
        assert f"shift=3,rr=record,rrfile={machine.rrfile}" in ours
        wait_for(lambda: any(line.startswith("tick ") for line in
                             machine.paths.console.read_text(errors="replace").splitlines()),
                 120, "the guest's first tick on the console under libvirt", every=0.5)

        async def replay_state() -> dict:
            from qemu.qmp import QMPClient
            client = QMPClient("test")
            await client.connect(str(machine.paths.qmp))
            try:
                return await client.execute("query-replay")
            finally:
                await client.disconnect()

        first = asyncio.run(replay_state())
        assert first["mode"] == "record"
        wait_for(lambda: asyncio.run(replay_state())["icount"] > first["icount"], 10,
                 "the recording to go on")
        assert machine.rrfile.stat().st_size > 0
    finally:
        domain.destroy()
    assert domain.name not in lv.virsh("list", "--all", "--name").split()   # transient
    assert not psutil.pid_exists(qemu.pid) or qemu.status() == psutil.STATUS_ZOMBIE
