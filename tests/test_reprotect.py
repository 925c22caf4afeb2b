"""Re-protection: a new backup joins a VM that runs alone (`vmft_qemu/reprotect.py`).

The state transfer over a real TCP log channel, the disk as of the join
snapshot, and where the join point lies in a stopped recording's log.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from vmft_qemu import disk_identity, reprotect
from vmft_qemu import log_channel as lc
from vmft_qemu.replay_log import CLOCK_VIRTUAL_RT, INSTRUCTION, version_bytes


def _qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True,
                          text=True).stdout


def test_the_state_travels_the_log_channel_and_the_disk_is_the_snapshots(tmp_path: Path) -> None:
    """No QEMU VM: a disk with a join snapshot (and writes after it) and a
    snapshot drive go over a real TCP log channel; the receiver holds the
    disk as of the snapshot, with the snapshot `-loadvm` looks for."""
    base = tmp_path / "base.raw"
    base.write_bytes(b"\xaa" * (4 << 20))
    disk = tmp_path / "disk.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(disk))
    subprocess.run(["qemu-io", "-c", "write -P 0x11 1M 64k", str(disk)], check=True,
                   capture_output=True)
    _qemu_img("snapshot", "-c", reprotect.JOIN_SNAPSHOT, str(disk))
    subprocess.run(["qemu-io", "-c", "write -P 0x22 1M 64k", str(disk)], check=True,
                   capture_output=True)  # the guest ran on after the snapshot
    vmstate = tmp_path / "snapshots.qcow2"
    vmstate.write_bytes(bytes(range(256)) * 9000)  # any bytes: it travels as it is
    files = reprotect.state_files(vmstate, disk, tmp_path / "export.qcow2")
    point = reprotect.JoinPoint(offset=1234, icount=5678, pause_s=0.1, savevm_s=0.05,
                                savevm_attempts=1)
    received = tmp_path / "backup"
    received.mkdir()

    async def transfer() -> reprotect.StateReceiver:
        got: list[reprotect.StateReceiver] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            order = lc.FrameOrder()
            join = await lc.read_frame(reader)
            order.check(join)
            receiver = reprotect.StateReceiver(received, join)
            while not receiver.complete:
                frame = await lc.read_frame(reader)
                order.check(frame)
                receiver.take(frame)
            got.append(receiver)
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        progress: list[int] = []
        sent = await reprotect.ship_state(lc.Sender(writer), point, 7, files,
                                          lambda done, total: progress.append(done))
        await reader.read()  # the receiver closes once it has everything
        writer.close()
        server.close()
        assert sent == sum(f.size for f in files) == progress[-1]
        return got[0]

    receiver = asyncio.run(transfer())
    assert (receiver.epoch, receiver.offset, receiver.icount) == (7, 1234, 5678)
    assert (received / "snapshots.qcow2").read_bytes() == vmstate.read_bytes()
    copy = received / "disk.qcow2"
    assert reprotect.JOIN_SNAPSHOT in _qemu_img("snapshot", "-l", str(copy))
    # The copy holds the disk as of the snapshot: the write after it is not there,
    # and only the clusters that differ from the backing file travelled.
    as_of_join = disk_identity.digest(disk, reprotect.JOIN_SNAPSHOT)
    assert disk_identity.digest(copy).differing(as_of_join) == []
    assert disk_identity.digest(copy).differing(disk_identity.digest(disk)) != []
    assert files[1].size < (1 << 20)


def test_a_damaged_state_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    join = lc.Frame(lc.FrameType.JOIN, 0, 10, 20, lc.json_payload(
        {"epoch": 2, "files": [{"name": "snapshots.qcow2", "size": 4, "sha256": "0" * 64}]}))
    receiver = reprotect.StateReceiver(tmp_path / "out", join)
    with pytest.raises(lc.CorruptFrame, match="SHA-256"):
        receiver.take(lc.Frame(lc.FrameType.STATE, 1, 0, 0, b"abcd"))
    with pytest.raises(lc.ProtocolMismatch, match="outside the run dir"):
        reprotect.StateReceiver(tmp_path / "out", lc.Frame(lc.FrameType.JOIN, 0, 0, 0, lc.json_payload(
            {"epoch": 2, "files": [{"name": "../x", "size": 1, "sha256": ""}]})))


def test_the_join_point_is_the_start_of_a_main_loop_clock_group() -> None:
    def clock(kind: int, value: int) -> bytes:
        return bytes([kind]) + value.to_bytes(8, "big")

    group = (bytes([reprotect.CHECKPOINT_CLOCK_HOST]) + clock(28, 5)
             + bytes([reprotect.CHECKPOINT_CLOCK_VIRTUAL_RT]) + clock(CLOCK_VIRTUAL_RT, 7))
    tail_of_last = clock(28, 4) + clock(CLOCK_VIRTUAL_RT, 6)  # the tap starts mid-group
    tap = reprotect.LogTap(1000, 42)
    tap.take(1000, tail_of_last)
    assert tap.group_start() is None
    tap.take(1000 + len(tail_of_last), group + group)
    start = 1000 + len(tail_of_last)
    assert tap.group_start() == start
    assert tap.since(start) == group + group
    # Without host-clock timers a group starts at the virtual RT checkpoint.
    vrt_only = bytes([reprotect.CHECKPOINT_CLOCK_VIRTUAL_RT]) + clock(CLOCK_VIRTUAL_RT, 7)
    tap = reprotect.LogTap(0, 0)
    tap.take(0, clock(CLOCK_VIRTUAL_RT, 1) + vrt_only)
    assert tap.group_start() is None  # one is not yet a pattern
    tap.take(9 + len(vrt_only), vrt_only)
    assert tap.group_start() == 9


def test_the_replay_reads_the_placeholder_before_the_snapshot_is_loaded() -> None:
    prefix = reprotect.feed_prefix()
    assert prefix[:4] == version_bytes() and len(prefix) == 5
    # One event kind with no payload to read and that nothing consumes at start-up.
    assert prefix[4] not in (INSTRUCTION, CLOCK_VIRTUAL_RT)
