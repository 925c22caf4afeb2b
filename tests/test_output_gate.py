"""The output rule, in isolation: nothing leaves before the ACK that covers it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmft_qemu.events import read_jsonl
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
