"""The replay log reader: event boundaries and icount, on synthetic and real logs."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest

from vmft_qemu import replay_log as rl
from vmft_qemu.machine import Machine, Role, VMSpec


def _ev(kind: int, payload: bytes = b"") -> bytes:
    return bytes([kind]) + payload


def _array(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


SAMPLE = b"".join([
    _ev(rl.CHECKPOINT_FIRST + 7),  # CHECKPOINT_INIT
    _ev(rl.INSTRUCTION, struct.pack(">I", 1000)),
    _ev(rl.CLOCK_FIRST + 1, struct.pack(">q", 123456789)),
    _ev(rl.INTERRUPT),
    _ev(rl.INSTRUCTION, struct.pack(">I", 250)),
    _ev(rl.ASYNC_FIRST + 6, b"\x00" + struct.pack(">I", 0) + _array(b"\xaa" * 60)),  # NET
    _ev(rl.ASYNC_FIRST + 2, struct.pack(">II", 0, 1) + struct.pack(">I", 30) + b"\x01"),  # key
    _ev(rl.CHAR_WRITE, struct.pack(">II", 5, 5)),
    _ev(rl.RANDOM, struct.pack(">I", 0) + _array(b"\x01" * 16)),
    _ev(rl.INSTRUCTION, struct.pack(">I", 7)),
    _ev(rl.SHUTDOWN_FIRST + 6),  # guest-shutdown
    _ev(rl.END),
    struct.pack(">I", rl.REPLAY_VERSION),  # what QEMU appends on a pipe at exit
])


def test_whole_stream_gives_every_event_and_icount() -> None:
    reader = rl.ReplayLogReader()
    events = reader.feed(SAMPLE)
    assert [e.name for e in events] == [
        "CHECKPOINT_INIT", "INSTRUCTION", "CLOCK_VIRTUAL_RT", "INTERRUPT", "INSTRUCTION",
        "ASYNC_NET", "ASYNC_INPUT", "CHAR_WRITE", "RANDOM", "INSTRUCTION",
        "SHUTDOWN_guest-shutdown", "END"]
    assert events[-1].icount == 1257
    assert reader.ended and reader.offset == len(SAMPLE) - 4
    assert [e.end for e in events[:-1]] == [e.offset for e in events[1:]]
    assert reader.shutdown == "guest-shutdown"
    assert reader.clock == (events[2].end, 123456789)


def test_byte_at_a_time_gives_the_same_events() -> None:
    whole = rl.ReplayLogReader().feed(SAMPLE)
    reader = rl.ReplayLogReader()
    pieces = [e for i in range(len(SAMPLE)) for e in reader.feed(SAMPLE[i:i + 1])]
    assert pieces == whole


def test_split_returns_only_complete_events_and_keeps_the_rest() -> None:
    reader = rl.ReplayLogReader()
    cut = 3  # inside the INSTRUCTION event after the checkpoint
    assert reader.split(SAMPLE[:cut]) == SAMPLE[:1]
    assert reader.pending == SAMPLE[1:cut] and reader.events_seen == 1


def test_split_refuses_partial_data_or_wrong_icount_without_changing_state() -> None:
    reader = rl.ReplayLogReader()
    with pytest.raises(rl.LogFormatError, match="ends inside an event"):
        reader.split(SAMPLE[:3], whole=True)
    with pytest.raises(rl.LogFormatError, match="icount 1000, but its frame says 999"):
        reader.split(SAMPLE[:6], whole=True, icount=999)
    assert (reader.offset, reader.icount, reader.pending) == (0, 0, b"")


def test_unknown_event_kind_is_an_error_naming_the_offset() -> None:
    with pytest.raises(rl.LogFormatError, match="unknown replay event kind 200 at log offset 1"):
        rl.ReplayLogReader().feed(b"\x1e\xc8")


def test_unknown_log_version_names_both_versions(tmp_path: Path) -> None:
    log = tmp_path / "old.bin"
    log.write_bytes(struct.pack(">I", 0xE0200B) + bytes(8) + _ev(rl.END))
    with pytest.raises(rl.LogVersionError) as err:
        list(rl.iter_file_events(log))
    assert "0xe0200b" in str(err.value) and "0xe0200c" in str(err.value)


@pytest.mark.qemu
def test_event_boundaries_add_up_to_qemus_icount(tmp_path: Path, image) -> None:
    """Record the real guest, stop it, ask QEMU its icount, compare with the log."""
    rrfile = tmp_path / "record.bin"
    machine = Machine(VMSpec("reader", 256, image), Role.RECORD, tmp_path, rrfile=rrfile)

    async def record() -> int:
        await machine.launch()
        try:
            qmp = await machine.qmp()
            async with asyncio.timeout(120):
                while b"tick 2 " not in machine.paths.console.read_bytes():
                    await asyncio.sleep(0.2)
            await qmp.execute("stop")
            icount = (await qmp.execute("query-replay"))["icount"]
            await qmp.execute("quit")
            await asyncio.wait_for(machine.wait(), 30)
            return icount
        finally:
            await machine.stop()

    qemu_icount = asyncio.run(record())
    events = list(rl.iter_file_events(rrfile))
    instructions = sum(e.value for e in events if e.kind == rl.INSTRUCTION)
    assert events[-1].name == "END"
    assert instructions == events[-1].icount == qemu_icount > 10_000_000


def test_safe_point_is_just_past_the_last_warp_account_checkpoint() -> None:
    reader = rl.ReplayLogReader()
    head = (_ev(rl.INSTRUCTION, struct.pack(">I", 10)) + _ev(rl.ASYNC_BLOCK, struct.pack(">Q", 3))
            + _ev(rl.CHECKPOINT_CLOCK_WARP_ACCOUNT))
    reader.split(head + _ev(rl.INSTRUCTION, struct.pack(">I", 5)) + _ev(rl.INTERRUPT))
    assert reader.safe_point == (len(head), 10)
    assert reader.icount == 15


def test_the_reader_keeps_the_icount_of_the_last_bottom_half() -> None:
    """The output gate's stamp: virtio-net sends the guest's frames from one."""
    reader = rl.ReplayLogReader(icount=100)
    assert reader.bh_icount == 100  # none yet: where the reader started
    sent = (_ev(rl.INSTRUCTION, struct.pack(">I", 10)) + _ev(rl.ASYNC_BH, struct.pack(">Q", 110))
            + _ev(rl.CHECKPOINT_CLOCK_WARP_ACCOUNT))
    reader.split(sent + _ev(rl.INSTRUCTION, struct.pack(">I", 5))
                 + _ev(rl.ASYNC_BH, b"\x00\x00"))  # the next one still incomplete
    assert (reader.bh_icount, reader.safe_point, reader.icount) == (110, (len(sent), 110), 115)


def test_the_reader_knows_which_disk_requests_completed_as_of_the_safe_point() -> None:
    reader = rl.ReplayLogReader()
    done = b"".join(_ev(rl.ASYNC_BLOCK, struct.pack(">Q", i)) for i in (0, 1, 3, 5))
    reader.split(done + _ev(rl.CHECKPOINT_CLOCK_WARP_ACCOUNT)
                 + _ev(rl.ASYNC_BLOCK, struct.pack(">Q", 2)))
    assert reader.disk_at_safe_point == rl.DiskCompletions(2, frozenset({3, 5}))
    assert reader.disk == rl.DiskCompletions(4, frozenset({5}))
    # In flight at the safe point: 2 and 4 (issued before 3 and 5), then maybe 6, 7, ...
    assert reader.disk_at_safe_point.outstanding(3) == [2, 4, 6, 7, 8]
    assert rl.DiskCompletions().outstanding(2) == [0, 1]


def test_stop_tail_names_each_request_that_may_be_in_flight_then_freezes() -> None:
    from vmft_qemu.go_live import MAX_DRAINED, stop_tail

    # Requests 0 to 6 and 9 completed: 7 and 8 were issued before 9 and are in
    # flight; past 9, some may have been issued.
    tail = stop_tail(rl.DiskCompletions(7, frozenset({9})))
    events = rl.ReplayLogReader().feed(tail)
    assert [e.name for e in events] == ["ASYNC_BLOCK"] * (2 + MAX_DRAINED) + ["INSTRUCTION"]
    ids = [struct.unpack(">Q", tail[e.offset + 1:e.end])[0] for e in events[:-1]]
    assert ids == [7, 8] + list(range(10, 10 + MAX_DRAINED))
    assert events[-1].value == 0


def _replay_section(section_id: int, fields: tuple) -> bytes:
    sid = struct.pack(">I", section_id)
    return (b"\x04" + sid + b"\x06replay" + struct.pack(">II", 0, 3)
            + struct.pack(">qqQiIIBQQq", *fields) + b"\x7e" + sid)


def test_forget_read_ahead_rewrites_a_replays_state_as_a_recordings(tmp_path: Path) -> None:
    # As go-live's replay saved it: a disk completion read ahead, waiting for
    # request id 0x08ff.. (a wildcard's kind byte read as part of an id).
    replays = (0, 14581139172, 6752181250, 0, 3142996, rl.ASYNC_BLOCK, 1, 2**64 - 1, 40,
               0x08FFFFFFFFFFFFFF)
    decoy = b"\x06replay" + struct.pack(">II", 0, 3) + bytes(70)  # no section header
    path = tmp_path / "snapshots.qcow2"
    path.write_bytes(bytes(1000) + _replay_section(1, replays) + decoy + bytes(100))
    assert rl.forget_read_ahead(path) == 1
    recordings = (0, 0, 6752181250, 0, 0, 0xFFFFFFFF, 0, 2**64 - 1, 40, -1)
    assert path.read_bytes() == bytes(1000) + _replay_section(1, recordings) + decoy + bytes(100)
    assert rl.forget_read_ahead(path) == 1  # the same again: nothing left to change
    assert path.read_bytes() == bytes(1000) + _replay_section(1, recordings) + decoy + bytes(100)
