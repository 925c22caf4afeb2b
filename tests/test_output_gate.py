"""The output rule, in isolation: nothing leaves before the ACK that covers it."""

from __future__ import annotations

import asyncio
import json
import socket
import tempfile
from pathlib import Path

import pytest

from vmft_qemu.events import read_jsonl
from vmft_qemu.log_flush import REQUEST, FlushRequests
from vmft_qemu.output_gate import OutputGate


def test_frames_wait_for_the_ack_that_covers_them_and_leave_in_order(tmp_path: Path) -> None:
    out: list[bytes] = []
    gate = OutputGate(out.append, audit=tmp_path / "gate.jsonl")
    gate.hold(b"a", stamp=100, held_at=0.0)
    gate.hold(b"b", stamp=200, held_at=0.0)
    gate.hold(b"c", stamp=200, held_at=0.0)
    assert out == [] and gate.held == 3
    gate.acknowledged(150)
    assert out == [b"a"]
    gate.acknowledged(120)  # an older ACK changes nothing
    assert out == [b"a"] and gate.acked == 150
    gate.acknowledged(200)
    assert out == [b"a", b"b", b"c"] and gate.held == 0
    gate.close()
    trail = [json.loads(line) for line in (tmp_path / "gate.jsonl").read_text().splitlines()]
    assert [t["seq"] for t in trail] == [1, 2, 3]
    assert all(t["acked"] >= t["stamp"] for t in trail)


def test_the_audit_trail_is_capped_and_keeps_the_newest_releases(tmp_path: Path) -> None:
    gate = OutputGate(lambda frame: None, audit=tmp_path / "gate.jsonl", audit_max_bytes=4000)
    gate.acknowledged(10**9)
    for stamp in range(200):
        gate.hold(b"x", stamp=stamp, held_at=0.0)
    gate.close()
    older, newest = (read_jsonl(tmp_path / name) for name in ("gate.1.jsonl", "gate.jsonl"))
    assert (tmp_path / "gate.1.jsonl").stat().st_size < 4200
    assert [t["seq"] for t in older + newest] == list(range(201 - len(older) - len(newest), 201))


def test_a_frame_already_covered_leaves_at_once() -> None:
    out: list[bytes] = []
    gate = OutputGate(out.append)
    gate.acknowledged(500)
    gate.hold(b"x", stamp=400, held_at=0.0)
    assert out == [b"x"]


def test_stamps_must_not_go_backwards() -> None:
    gate = OutputGate(lambda frame: None)
    gate.hold(b"x", stamp=400, held_at=0.0)
    with pytest.raises(ValueError, match="older"):
        gate.hold(b"y", stamp=300, held_at=0.0)


def test_a_flush_request_ends_only_with_the_answer_to_it_and_asks_again() -> None:
    """The stamp's flush (log_flush.py): an answer counts only for the request
    it echoes; with no plugin listening yet, or no answer, it asks again."""
    async def main(tmp: Path) -> None:
        loop = asyncio.get_running_loop()
        plugin_at = tmp / "plugin.sock"
        requests = FlushRequests(plugin_at, tmp / "controller.sock", retry_s=0.3)
        flushed = asyncio.create_task(requests.flush())  # nobody listens yet
        await asyncio.sleep(0)
        plugin = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        plugin.bind(str(plugin_at))
        plugin.setblocking(False)

        async def next_request() -> tuple[int, str]:
            data, sender = await asyncio.wait_for(loop.sock_recvfrom(plugin, 64), 5)
            return REQUEST.unpack(data)[0], sender

        first, sender = await next_request()  # not answered: asked again
        second, _ = await next_request()
        assert second > first
        plugin.sendto(REQUEST.pack(first), sender)  # a late answer to the first: no use
        third, _ = await next_request()
        assert third > second and not flushed.done()
        plugin.sendto(REQUEST.pack(third), sender)
        await asyncio.wait_for(flushed, 5)
        assert requests.retries == 3  # before the plugin listened, then twice
        requests.close()
        plugin.close()

    with tempfile.TemporaryDirectory() as tmp:  # unix socket paths must be short
        asyncio.run(main(Path(tmp)))
