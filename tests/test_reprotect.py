"""Re-protection: a new backup joins a VM that runs alone (`vmft_qemu/reprotect.py`).

Without a VM: the state transfer over a real TCP log channel, the disk as of
the join snapshot, where the replay's placeholder goes.
With real QEMU, the real guest and netns hosts: a standby joins a VM running
alone while the guest writes to disk, and five failures in a row each
followed by automatic re-protection onto the spare host.
"""

from __future__ import annotations

import asyncio
import json
import signal
import struct
import subprocess
from pathlib import Path

import pytest

from vmft_qemu import disk_identity, reprotect
from vmft_qemu import log_channel as lc
from vmft_qemu.replay_log import (CLOCK_VIRTUAL_RT, END, EXCEPTION, INSTRUCTION, SHUTDOWN_FIRST,
                                  ReplayLogReader)
from vmft_qemu.pair import SpareHosts
from vmft_qemu.topology import GUEST_IP, Topology
from vmft_qemu.waiting import wait_for

WRITES = 300  # counter increments, each synced to the guest's root disk


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
    name = reprotect.join_snapshot_name()
    _qemu_img("snapshot", "-c", name, str(disk))
    subprocess.run(["qemu-io", "-c", "write -P 0x22 1M 64k", str(disk)], check=True,
                   capture_output=True)  # the guest ran on after the snapshot
    vmstate = tmp_path / "snapshots.qcow2"  # any bytes: it travels as it is, but for its holes
    with open(vmstate, "wb") as f:
        f.write(bytes(range(256)) * 8192)
        f.seek(8 << 20)  # a hole, as a deleted snapshot leaves one
        f.write(b"\x5a" * 65536)
        f.truncate(12 << 20)  # and one at the end
    files = reprotect.state_files(vmstate, disk, tmp_path / "export.qcow2", name)
    point = reprotect.JoinPoint(snapshot=name, offset=1234, icount=5678, pause_s=0.1, savevm_s=0.05,
                                restart_s=0.04, savevm_attempts=1)
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
        assert sent == sum(f.data for f in files) == progress[-1]
        return got[0]

    receiver = asyncio.run(transfer())
    assert (receiver.epoch, receiver.offset, receiver.icount, receiver.snapshot) == (
        7, 1234, 5678, name)
    assert (received / "snapshots.qcow2").read_bytes() == vmstate.read_bytes()
    assert files[0].data == (2 << 20) + 65536 < files[0].size  # the holes stayed home
    assert reprotect.data_extents(received / "snapshots.qcow2") == files[0].extents
    copy = received / "disk.qcow2"
    assert name in _qemu_img("snapshot", "-l", str(copy))
    # The copy holds the disk as of the snapshot: the write after it is not there,
    # and only the clusters that differ from the backing file travelled.
    as_of_join = disk_identity.digest(disk, name)
    assert disk_identity.digest(copy).differing(as_of_join) == []
    assert disk_identity.digest(copy).differing(disk_identity.digest(disk)) != []
    assert files[1].size < (1 << 20)


def test_a_damaged_state_file_or_a_bad_join_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()

    def join(snapshot: str, name: str = "snapshots.qcow2") -> lc.Frame:
        return lc.Frame(lc.FrameType.JOIN, 0, 10, 20, lc.json_payload(
            {"epoch": 2, "snapshot": snapshot,
             "files": [{"name": name, "size": 4, "sha256": "0" * 64, "data": 4}]}))

    receiver = reprotect.StateReceiver(tmp_path / "out", join("vmft-join-1"))
    with pytest.raises(lc.CorruptFrame, match="SHA-256"):
        receiver.take(lc.Frame(lc.FrameType.STATE, 1, 0, 0, b"abcd"))
    with pytest.raises(lc.ProtocolMismatch, match="outside the run dir"):
        reprotect.StateReceiver(tmp_path / "out", join("vmft-join-1", "../x"))
    # The name goes into the replay's QEMU options: nothing but a join snapshot's.
    with pytest.raises(lc.ProtocolMismatch, match="no join snapshot"):
        reprotect.StateReceiver(tmp_path / "out", join("vmft-join-1,rr=record"))


def test_only_the_join_snapshot_is_kept_between_the_two_recordings(tmp_path: Path) -> None:
    """`drop_snapshots` on QEMU-less files: the go-live snapshot and the last
    join's go, also where a file holds one twice (as a disk QEMU reaches
    through blkreplay does), and the join snapshot stays."""
    disk, drive = tmp_path / "disk.qcow2", tmp_path / "snapshots.qcow2"
    for path in (disk, drive):
        _qemu_img("create", "-q", "-f", "qcow2", str(path), "16M")
    old, new = reprotect.join_snapshot_name(), reprotect.join_snapshot_name()
    assert old != new
    for name in (old, "vmft-go-live", "vmft-go-live", new):
        _qemu_img("snapshot", "-c", name, str(disk))
    _qemu_img("snapshot", "-c", new, str(drive))
    assert reprotect.drop_snapshots([disk, drive], keep=new) == 3
    for path in (disk, drive):
        names = [s["name"] for s in json.loads(
            _qemu_img("info", "--output=json", str(path))).get("snapshots", [])]
        assert names == [new]
    assert reprotect.drop_snapshots([tmp_path / "missing.qcow2"], keep=new) == 0  # logged only


def test_the_placeholder_goes_right_after_the_machines_creation() -> None:
    """The replay drops the event kind it read ahead as it loads the snapshot:
    the placeholder fills that place, after the creation events, however the
    log arrives in pieces."""
    log = reprotect.CREATION_EVENTS + bytes([CLOCK_VIRTUAL_RT]) + (5).to_bytes(8, "big")
    whole = reprotect.LoadSplice()(log)
    assert whole == reprotect.CREATION_EVENTS + bytes([reprotect.PLACEHOLDER_KIND]) + log[2:]
    # One event kind that nothing consumes and that has no payload to read.
    assert reprotect.PLACEHOLDER_KIND not in (INSTRUCTION, CLOCK_VIRTUAL_RT)
    splice = reprotect.LoadSplice()
    pieces = [splice(log[:1]), splice(log[1:2]), splice(log[2:5]), splice(log[5:])]
    assert pieces[0] == log[:1] and b"".join(pieces) == whole


def test_a_log_that_does_not_start_with_the_creation_is_refused() -> None:
    with pytest.raises(reprotect.JoinError, match="machine's creation"):
        reprotect.LoadSplice()(bytes([INSTRUCTION]) + (7).to_bytes(4, "big"))


def contiguous_in(lines: list[str], within: list[str]) -> bool:
    """Is `lines` a run of consecutive lines of `within`?"""
    return any(within[i:i + len(lines)] == lines for i in range(len(within) - len(lines) + 1))


def event(vm: SpareHosts, host: str, name: str) -> dict:
    found = [e for e in vm.events(host) if e["event"] == name]
    assert found, f"no {name} event on host {host}"
    return found[-1]


@pytest.mark.qemu
def test_a_standby_joins_while_the_guest_writes_to_disk(tmp_path: Path, image) -> None:
    with Topology(hosts=2) as topo:
        vm = SpareHosts(tmp_path / "vm", topo)
        try:
            vm.start("a", "primary")
            # No backup comes within the grace time: the primary wins the lock
            # of epoch 1 and runs alone, its output no longer held.
            wait_for(lambda: vm.status("a").get("state") == "alone", 120,
                     "the primary to run alone")
            wait_for(lambda: f"VMFT-NET-UP {GUEST_IP}" in vm.console("a"), 120,
                     "the guest's network")
            client = vm.client("counter", "--count", str(WRITES), "--retries", "3")
            wait_for(lambda: (vm.status("a").get("gate") or {}).get("released", 0) >= 20, 60,
                     "the guest to answer increments")
            vm.start("b")  # a standby: the primary joins it while the client writes
            assert vm.wait_pair(120) == ("a", "b")

            out, _ = client.communicate(timeout=300)
            result = json.loads(out)
            assert result["error"] is None
            assert result["answers"] == list(range(1, WRITES + 1))

            joined = event(vm, "a", "protected-again")
            print(f"join: {joined}")
            assert joined["epoch"] == 2  # the pair races for the epoch after the one won alone
            assert joined["sent_bytes"] == joined["state_bytes"]
            assert event(vm, "b", "join-state-received")["bytes"] == joined["state_bytes"]
            # The new backup's console: the primary's, from the join point on.
            wait_for(lambda: sum(l.startswith("tick ") for l in vm.console("b")) >= 5, 60,
                     "the new backup to replay ticks")
            replayed = vm.console("b")[1:-1]  # the first and last may be partial lines
            assert contiguous_in(replayed, vm.console("a")), (replayed, vm.console("a")[-40:])
            assert vm.status("b")["divergence"]["divergences"] == 0

            # A clean shutdown: the backup replays it to the same end, so both
            # copies of the disk must hold the same guest-visible blocks.
            vm.procs["a"].send_signal(signal.SIGTERM)
            assert vm.procs["a"].wait(60) == 0
            assert vm.procs["b"].wait(120) == 0
            mine, theirs = (disk_identity.digest(vm.root / h / side / "disk.qcow2")
                            for h, side in (("a", "primary"), ("b", "backup")))
            assert mine.differing(theirs) == []
            counted = int(disk_identity.guest_file(vm.root / "b" / "backup" / "disk.qcow2",
                                                   "/var/lib/vmft/counter"))
            assert counted == WRITES
        finally:
            vm.stop()


CYCLES = 5
INCREMENTS = 10  # per cycle, all acknowledged before the plug is pulled


def same_disks(vm: SpareHosts, primary: str, backup: str) -> bool:
    """Do the pair's copies hold the same guest-visible blocks?  (The guest is
    quiet on disk, so the backup's copy converges once it has replayed the
    last write.)"""
    digests = [disk_identity.digest(vm.run_dir(h) / "disk.qcow2") for h in (primary, backup)]
    return digests[0].differing(digests[1]) == []


@pytest.mark.qemu
def test_five_failures_each_followed_by_automatic_reprotection(tmp_path: Path, image) -> None:
    """Three hosts; each cycle pulls the plug on one host of the pair (the
    primary's, then the backup's, alternately): the survivor runs alone, joins
    the standby on the spare host by itself, and the dead host comes back as
    the next standby."""
    with Topology(hosts=3) as topo:
        vm = SpareHosts(tmp_path / "vm", topo)
        try:
            vm.start("b")
            vm.start("c")
            vm.start("a", "primary")
            primary, backup = vm.wait_pair(180)
            wait_for(lambda: f"VMFT-NET-UP {GUEST_IP}" in vm.console(primary), 120,
                     "the guest's network")
            for cycle in range(1, CYCLES + 1):
                out, _ = vm.client("counter", "--count", str(INCREMENTS)).communicate(timeout=120)
                answers = json.loads(out)["answers"]
                assert answers == list(range((cycle - 1) * INCREMENTS + 1,
                                             cycle * INCREMENTS + 1)), answers
                victim = primary if cycle % 2 else backup
                spare = next(h for h in vm.hosts if h not in (primary, backup))
                vm.pull_plug(victim)
                survivor = backup if victim == primary else primary
                assert vm.wait_pair(120) == (survivor, spare)
                new_primary, new_backup = survivor, spare
                vm.start(victim)  # back as the standby for the next generation
                assert vm.counted() == cycle * INCREMENTS
                wait_for(lambda: same_disks(vm, new_primary, new_backup), 60,
                         "the pair's disks to hold the same blocks", every=1)
                joined = event(vm, new_primary, "protected-again")
                print(f"cycle {cycle}: killed {victim}; {new_primary} joined {new_backup}: "
                      f"{joined}")
                assert joined["epoch"] == cycle + 1
                # The log reader counts instructions as QEMU does, also on a primary
                # restarted from the join snapshot (its log counts on from the
                # snapshot's icount): the join point is a few seconds of guest time
                # before the icount QMP gave when output was held again (8 ns each).
                assert 0 <= joined["released_to"] - joined["icount"] < 2_000_000_000
                wait_for(lambda: vm.status(victim).get("state") == "standby", 60,
                         "the dead host back as a standby")
                primary, backup = new_primary, new_backup
        finally:
            vm.stop()


def _events(data: bytes, icount: int) -> list:
    return ReplayLogReader(0, icount).feed(data)


def test_the_new_log_counts_from_the_old_recordings_last_event_not_from_the_stop() -> None:
    # As measured: the guest stopped 8671 instructions after its last event;
    # the shutdown's INSTRUCTION covers them, the snapshot does not.
    stopped_at = 6757968056
    tail = (bytes([EXCEPTION]) + struct.pack(">BI", INSTRUCTION, 8671)
            + bytes([SHUTDOWN_FIRST + 3, END]))
    words = _events(tail, stopped_at - 8671)
    assert reprotect.logged_icount(words, stopped_at) == stopped_at - 8671
    # Stopped right at an event: nothing to cover.
    assert reprotect.logged_icount(_events(bytes([SHUTDOWN_FIRST + 3, END]), stopped_at),
                                   stopped_at) == stopped_at
    with pytest.raises(reprotect.JoinError, match="without logging its shutdown"):
        reprotect.logged_icount(_events(bytes([EXCEPTION]), stopped_at), stopped_at)
