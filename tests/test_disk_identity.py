"""Disk identity: two qcow2 copies compared by what the guest sees, not by file bytes.

No VM here: the copies are real qcow2 overlays of the real root disk, written
with qemu-io (QEMU's own block layer, as a guest's writes would be).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from vmft_qemu import cli, disk_identity as di, images
from vmft_qemu.machine import MachinePaths, Role, VMSpec, command_line

MIB = 1 << 20


def overlay(image: images.GuestImage, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                    str(image.rootfs), str(path)], check=True)
    return path


def qemu_io(disk: Path, *commands: str) -> None:
    args = [a for c in commands for a in ("-c", c)]
    subprocess.run(["qemu-io", *args, str(disk)], check=True, capture_output=True)


def snapshot(disk: Path, name: str) -> None:
    subprocess.run(["qemu-img", "snapshot", "-c", name, str(disk)], check=True)


@pytest.fixture
def copies(tmp_path: Path, image: images.GuestImage) -> tuple[Path, Path]:
    return (overlay(image, tmp_path / "primary" / "disk.qcow2"),
            overlay(image, tmp_path / "backup" / "disk.qcow2"))


def test_same_writes_in_another_layout_are_identical(copies: tuple[Path, Path],
                                                     image: images.GuestImage) -> None:
    primary, backup = copies
    qemu_io(primary, "write -P 0x55 5M 64k", "write -P 0x66 40M 4k")
    # The backup gets the same writes in the other order, and an internal snapshot
    # in between (go-live's savevm): another cluster layout, other file bytes.
    qemu_io(backup, "write -P 0x66 40M 4k")
    snapshot(backup, "vmft-go-live")
    qemu_io(backup, "write -P 0x55 5M 64k")
    assert primary.read_bytes() != backup.read_bytes()
    a, b = di.digest(primary), di.digest(backup)
    assert a.sha256 == b.sha256 and a.differing(b) == []
    assert a.size == images.DISK_MIB * MIB
    assert a.sha256 != di.digest(image.rootfs).sha256, "the writes are seen"


def test_a_differing_write_is_located(copies: tuple[Path, Path]) -> None:
    primary, backup = copies
    qemu_io(primary, "write -P 0x55 5M 64k", "write -P 0x77 34602496 1k")
    qemu_io(backup, "write -P 0x55 5M 64k")
    a, b = di.digest(primary), di.digest(backup)
    assert a.sha256 != b.sha256
    assert a.differing(b) == [(32 * MIB, 34 * MIB)], "a write across a MiB boundary"


def test_snapshot_is_read_as_of_its_time(copies: tuple[Path, Path]) -> None:
    primary, backup = copies
    qemu_io(backup, "write -P 0x55 5M 64k")
    snapshot(backup, "frozen")
    qemu_io(backup, "write -P 0x99 6M 64k")  # the guest ran on after the snapshot
    qemu_io(primary, "write -P 0x55 5M 64k")
    assert di.digest(primary).sha256 == di.digest(backup, "frozen").sha256
    assert di.digest(primary).sha256 != di.digest(backup).sha256
    with pytest.raises(di.DiskReadError, match="snapshot"):
        di.digest(backup, "no-such-snapshot")


def test_guest_file_reads_the_counter_from_the_root_disk(image: images.GuestImage,
                                                         copies: tuple[Path, Path]) -> None:
    assert di.guest_file(copies[0], "/var/lib/vmft/counter") == b"0\n"
    assert di.guest_file(image.rootfs, "/sbin/init").startswith(b"#!/bin/sh")
    with pytest.raises(di.DiskReadError, match="/nope"):
        di.guest_file(copies[0], "/nope")


def test_vmft_disk_compare(tmp_path: Path, copies: tuple[Path, Path],
                           capsys: pytest.CaptureFixture[str]) -> None:
    primary, backup = copies
    config = tmp_path / "vm.toml"
    config.write_text(f'[vm]\nname = "disks"\n[primary]\nrun_dir = "{primary.parent}"\n'
                      f'[backup]\nrun_dir = "{backup.parent}"\n')
    assert MachinePaths(primary.parent).disk == primary
    qemu_io(primary, "write -P 0x55 5M 64k")
    qemu_io(backup, "write -P 0x55 5M 64k")
    snapshot(backup, "vmft-go-live")
    qemu_io(backup, "write -P 0x99 9M 4k")

    assert cli.main(["disk", "compare", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "disks primary: " in out and "DIFFERENT at 9-10 MiB" in out
    assert cli.main(["disk", "compare", "--config", str(config),
                     "--snapshot", "backup=vmft-go-live", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["identical"] and shown["backup"]["snapshot"] == "vmft-go-live"
    assert shown["primary"]["sha256"] == shown["backup"]["sha256"]
    assert cli.main(["disk", "digest", str(primary)]) == 0
    assert shown["primary"]["sha256"] in capsys.readouterr().out
    primary.unlink()
    assert cli.main(["disk", "compare", "--config", str(config)]) == 2
    assert "no disk copy at" in capsys.readouterr().err


def test_only_the_backups_copy_is_written_without_flushes(tmp_path: Path,
                                                         image: images.GuestImage) -> None:
    """A replay waits at each disk completion until its own request has completed,
    so the backup's QEMU must not wait for the host's disk on a guest flush; its
    copy is made durable when it goes live (go-live's event log: test_failover)."""
    def drive_of_disk(role: Role) -> str:
        argv = command_line(VMSpec(name="d", memory_mib=256, image=image), role,
                            MachinePaths(tmp_path), rrfile=tmp_path / "log")
        return next(a for a in argv if "id=disk0-img" in a)
    assert drive_of_disk(Role.REPLAY).endswith(",cache.no-flush=on")
    for role in (Role.RECORD, Role.ICOUNT, Role.PLAIN):
        assert "no-flush" not in drive_of_disk(role)
