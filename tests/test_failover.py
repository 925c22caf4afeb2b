"""Pull the plug: the backup takes over where the primary was, and no split brain.

Hosts are network namespaces on a LAN bridge with a client; "pulling the plug"
on a host takes all of its links down and SIGKILLs every process in it.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from vmft_qemu.pair import LocalPair, pull_the_plug, wait_for
from vmft_qemu.topology import Topology

pytestmark = pytest.mark.qemu

INCREMENTS = 300


@pytest.fixture
def ft_lan(tmp_path: Path, image) -> Iterator[LocalPair]:
    with Topology() as topo:
        pair = LocalPair(tmp_path / "pair", network=topo)
        try:
            pair.start_both()
            pair.wait_protected()
            yield pair
        finally:
            pair.stop()


def check_increments(result: dict[str, Any], counted_after: int) -> None:
    """Every increment the client saw acknowledged is counted, once."""
    answers = result["answers"]
    assert result["error"] is None, result
    assert len(answers) == INCREMENTS
    if not result["reconnects"]:
        # One TCP connection survived the takeover: the answers are exactly 1..N.
        assert answers == list(range(1, INCREMENTS + 1))
    else:
        # A new connection: the request in flight when the old one broke may
        # or may not have been counted, but nothing acknowledged was lost.
        for before, after in zip(answers, answers[1:]):
            assert after in (before + 1, before + 2), (before, after, result["reconnects"])
    assert counted_after == answers[-1]


def test_pull_the_plug_on_the_primary_at_random_moments(tmp_path: Path, image) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"random seed {seed}")
    for round_ in range(3):
        with Topology() as topo:
            lan = LocalPair(tmp_path / f"round{round_}", network=topo)
            try:
                lan.start_both()
                lan.wait_protected()
                client = lan.client("counter", "--count", str(INCREMENTS), "--retries", "3")
                lan.wait_released(10)
                time.sleep(rng.uniform(0, 3))  # the random moment of the failure, not a sync
                killed = pull_the_plug(topo.hosts["a"])
                backup = wait_for(lambda: (s := lan.status("backup")).get("state") == "alone"
                                  and s, 60, "the backup to go live")
                took = time.monotonic() - killed
                out, _ = client.communicate(timeout=300)
                result = json.loads(out)
                print(f"round {round_}: live {took:.2f} s after the kill, reconnects "
                      f"{result['reconnects']}, max latency {max(result['latency_ms']):.0f} ms")
                check_increments(result, lan.counted())
                assert backup["role"] == "primary" and backup["alone"]
                events = [e["event"] for e in lan.events("backup")]
                assert "going-live" in events and "replay-frozen-and-saved" in events
                # The guest runs on: its console goes on ticking on the new host.
                ticks = sum(line.startswith("tick ") for line in lan.console("backup"))
                wait_for(lambda: sum(line.startswith("tick ") for line in
                                     lan.console("backup")) >= ticks + 2, 30,
                         "the guest to keep ticking after the takeover")
            finally:
                lan.stop()


def test_kill_the_backup_host_and_the_primary_goes_on(ft_lan: LocalPair) -> None:
    client = ft_lan.client("counter", "--count", str(INCREMENTS))
    ft_lan.wait_released(10)
    pull_the_plug(ft_lan.hosts["backup"])
    out, _ = client.communicate(timeout=300)
    result = json.loads(out)
    assert result["error"] is None and result["reconnects"] == []
    assert result["answers"] == list(range(1, INCREMENTS + 1))
    primary = ft_lan.status("primary")
    assert primary["state"] == "alone" and primary["alone"]
    assert ft_lan.counted() == INCREMENTS


def test_partition_exactly_one_side_goes_on(ft_lan: LocalPair) -> None:
    client = ft_lan.client("counter", "--count", str(INCREMENTS), "--retries", "3")
    ft_lan.wait_released(10)
    ft_lan.hosts["primary"].cut_ft_link()  # both stay on the LAN and reach the lock
    pair = ft_lan
    loser = wait_for(lambda: next((r for r in ("primary", "backup")
                                   if pair.procs[r].poll() is not None), None), 60,
                     "the side that lost the go-live lock to stop")
    assert pair.procs[loser].returncode == 3, pair.output(loser)[-2000:]
    winner = "backup" if loser == "primary" else "primary"
    live = wait_for(lambda: (s := pair.status(winner)).get("state") == "alone" and s, 60,
                    f"the {winner}'s host to run the VM alone")
    assert live["alone"]
    out, _ = client.communicate(timeout=300)
    check_increments(json.loads(out), ft_lan.counted())
    assert "the go-live lock" in pair.output(loser)
