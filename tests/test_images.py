"""The guest image: built from Debian packages, cached, reproducible, and it boots.

The boot tests run real QEMU (plain TCG) and read the serial console through a
pipe with a deadline; every QEMU is killed by its PID at the end.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import select
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from vmft_qemu import disk_identity, images

TICK = re.compile(r"^tick (\d+) uptime=(\d+\.\d+) rnd=([0-9a-f]{16})$", re.M)


@pytest.fixture(scope="module")
def guest() -> images.GuestImage:
    return images.build(images.DEFAULT_CACHE)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cpio_names(initrd: Path) -> dict[str, int]:
    """name -> mode of every member of a gzip newc archive."""
    data = gzip.decompress(initrd.read_bytes())
    names: dict[str, int] = {}
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701", f"bad newc header at {pos}"
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        pos += size + (-size % 4)
        if name == "TRAILER!!!":
            return names
        names[name] = mode


# ------------------------------------------------------------ build/cache


def test_outputs(guest: images.GuestImage) -> None:
    assert guest.kernel.read_bytes()[0x202:0x206] == b"HdrS", "vmlinuz is a bzImage"
    members = _cpio_names(guest.initrd)
    for name in ("init", "bin/busybox", "bin/sh", "sbin/insmod", "sbin/switch_root",
                 "lib/modules/ext4.ko", "lib/modules/virtio_blk.ko",
                 "lib/modules/virtio_net.ko", "etc/vmft/modules", "dev/console"):
        assert name in members, f"{name} missing from the initramfs"
    assert members["init"] & 0o111, "init is executable"
    assert "bin/counterd" not in members, "the guest's services live on its root disk"
    assert list(members) == sorted(members), "cpio members are sorted"
    rootfs = guest.rootfs.read_bytes()
    assert len(rootfs) == images.DISK_MIB * 2**20
    assert rootfs[0x438:0x43A] == b"\x53\xef", "root.ext4 is ext2/3/4"


def test_root_disk_holds_the_guest(guest: images.GuestImage) -> None:
    on_disk = {rel: disk_identity.guest_file(guest.rootfs, "/" + rel)
               for rel in ("sbin/init", "bin/counterd", "www/index.html", "var/lib/vmft/counter")}
    for rel, data in on_disk.items():
        assert data == (images.GUEST_FILES / "rootfs" / rel).read_bytes(), rel
    busybox = disk_identity.guest_file(guest.rootfs, "/bin/busybox")
    assert busybox[:4] == b"\x7fELF" and len(busybox) > 1 << 20


def test_modules_load_after_their_dependencies(guest: images.GuestImage) -> None:
    manifest = json.loads((guest.initrd.parent / images.MANIFEST).read_text())
    order = manifest["modules"]
    for dep, module in (("virtio_ring", "virtio_blk"), ("virtio_pci_modern_dev", "virtio_pci"),
                        ("jbd2", "ext4"), ("net_failover", "virtio_net")):
        assert order.index(dep) < order.index(module)
    assert "crc32c_generic" in order, "ext4 needs a crc32c that runs on qemu64"


def test_cache_hit_is_fast(guest: images.GuestImage) -> None:
    started = time.monotonic()
    again = images.build(images.DEFAULT_CACHE)
    assert time.monotonic() - started < 1.0
    assert again == guest
    assert images.locate(images.DEFAULT_CACHE) == guest


def test_locate_without_build_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(images.ImageMissing, match="vmft image build"):
        images.locate(tmp_path)


def test_build_is_reproducible(guest: images.GuestImage, tmp_path: Path) -> None:
    """A second build in a fresh cache gives the same bytes (the .debs are shared)."""
    debs = tmp_path / "debs"
    debs.mkdir()
    for deb in (images.DEFAULT_CACHE / "debs").glob("*.deb"):
        try:
            os.link(deb, debs / deb.name)
        except OSError:
            shutil.copyfile(deb, debs / deb.name)
    other = images.build(tmp_path, progress=lambda message: None)
    assert other.rootfs.parent.name == guest.rootfs.parent.name, "same cache key"
    for mine, theirs in ((guest.kernel, other.kernel), (guest.initrd, other.initrd),
                         (guest.rootfs, other.rootfs)):
        assert _sha256(mine) == _sha256(theirs), f"{mine.name} differs between builds"


# ------------------------------------------------------------------ boots


class Guest:
    """One plain-TCG QEMU running the image; serial console on a pipe."""

    def __init__(self, image: images.GuestImage, workdir: Path, append: str,
                 disk: bool = True, nic_port: int | None = None) -> None:
        args = ["qemu-system-x86_64", "-machine", "q35", "-cpu", "qemu64", "-m", "256",
                "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
                "-kernel", str(image.kernel), "-initrd", str(image.initrd),
                "-append", f"console=ttyS0 panic=-1 quiet {append}"]
        self.disk = workdir / "disk.qcow2"
        if disk:
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",
                            "-b", str(image.rootfs), str(self.disk)], check=True)
            args += ["-drive", f"file={self.disk},if=none,id=d0,format=qcow2",
                     "-device", "virtio-blk-pci,drive=d0"]
        if nic_port is not None:
            args += ["-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{nic_port}-:7000",
                     "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,romfile="]
        self.output = ""
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def expect(self, pattern: str, timeout: float, count: int = 1) -> list[re.Match[str]]:
        """Read the console until `pattern` matched `count` times, or fail at the deadline."""
        regex = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while len(found := list(regex.finditer(self.output))) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no {count}x {pattern!r} within {timeout:.0f} s; "
                            f"console:\n{self.output}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    pytest.fail(f"QEMU exited before {pattern!r}; console:\n{self.output}")
                self.output += chunk.decode(errors="replace").replace("\r", "")
        return found

    def exit_code(self, timeout: float) -> int:
        assert self.process.stdout is not None
        self.output += self.process.stdout.read().decode(errors="replace").replace("\r", "")
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        if self.process.stdout:
            self.process.stdout.close()


@pytest.fixture
def boot(guest: images.GuestImage, tmp_path: Path) -> Iterator[Callable[..., Guest]]:
    started: list[Guest] = []

    def start(append: str, **kwargs: Any) -> Guest:
        vm = Guest(guest, tmp_path, append, **kwargs)
        started.append(vm)
        return vm

    yield start
    for vm in started:
        vm.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.qemu
def test_boots_and_ticks(boot: Callable[..., Guest]) -> None:
    vm = boot("vmft.workload=ticks")
    vm.expect(r"^vmft: root is /dev/vda \(ext4\)$", 60)
    vm.expect(r"^VMFT-BOOT-OK$", 30)
    ticks = vm.expect(TICK.pattern, 30, count=3)
    assert [int(m[1]) for m in ticks] == [1, 2, 3]
    assert len({m[3] for m in ticks}) == 3, "rnd comes from /dev/urandom"
    assert float(ticks[0][2]) < float(ticks[2][2])
    assert not re.search(r"not found|failed", vm.output), "every boot step worked"


@pytest.mark.qemu
def test_without_a_root_disk_it_says_so_and_powers_off(boot: Callable[..., Guest]) -> None:
    vm = boot("vmft.workload=ticks", disk=False)
    vm.expect(r"^vmft: no root disk \(/dev/vda with ext4\): powering off$", 60)
    assert vm.exit_code(60) == 0, "poweroff -f ends QEMU"


@pytest.mark.qemu
def test_sha256_workload_powers_off(boot: Callable[..., Guest]) -> None:
    vm = boot("vmft.workload=sha256:4")
    (end,) = vm.expect(r"^VMFT-BENCH-END ([0-9a-f]{64})$", 60)
    assert end[1] == hashlib.sha256(bytes(4 * 2**20)).hexdigest()
    assert vm.exit_code(60) == 0, "poweroff -f ends QEMU"


@pytest.mark.qemu
def test_counter_service(boot: Callable[..., Guest]) -> None:
    port = _free_port()
    vm = boot("vmft.workload=ticks vmft.ip=10.0.2.15/24 vmft.gw=10.0.2.2", nic_port=port)
    vm.expect(r"^VMFT-NET-UP 10\.0\.2\.15$", 90)

    def session(*commands: str) -> list[str]:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
            stream = conn.makefile("rwb")
            answers = []
            for command in commands:
                stream.write(command.encode() + b"\r\n")
                stream.flush()
                answers.append(stream.readline().decode().strip())
            return answers

    assert session("GET", "INC", "INC") == ["0", "1", "2"]
    assert session("INC", "GET", "INC") == ["3", "3", "4"], "state outlives the connection"
    assert session("FOO")[0].startswith("ERR")
    # Each INC is synced: the value is on the root disk while the guest runs.
    assert disk_identity.guest_file(vm.disk, "/var/lib/vmft/counter") == b"4\n"
