"""Pull the plug: the backup takes over where the primary was, and no split brain.

Hosts are network namespaces on a LAN bridge with a client and a storage
namespace whose nfs-ganesha serves the go-live lock (both controllers speak
NFS to it); "pulling the plug" on a host takes all of its links down and
SIGKILLs every process in it.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from vmft_qemu import disk_identity
from vmft_qemu.events import read_jsonl
from vmft_qemu import test_and_set as tas
from vmft_qemu.go_live import SNAPSHOT
from vmft_qemu.machine import MachinePaths
from vmft_qemu.nfs_server import NfsServer
from vmft_qemu.pair import LocalPair, lan_with_storage, pull_the_plug
from vmft_qemu.report import write_report
from vmft_qemu.waiting import wait_for

from .test_metrics import states
from .test_report import plotted

pytestmark = pytest.mark.qemu

INCREMENTS = 300
COUNTER_FILE = "/var/lib/vmft/counter"  # on the guest's root disk


@pytest.fixture
def ft_lan(tmp_path: Path, image) -> Iterator[tuple[LocalPair, NfsServer]]:
    with lan_with_storage(tmp_path) as (topo, nfs):
        pair = LocalPair(tmp_path / "pair", network=topo, nfs=nfs)
        try:
            pair.start_both()
            pair.wait_protected()
            yield pair, nfs
        finally:
            pair.stop()


def lock_files(nfs: NfsServer) -> list[str]:
    return sorted(p.name for p in nfs.export_dir.iterdir())


def counter_on_disk(pair: LocalPair, role: str, snapshot: str | None = None) -> int | None:
    """The counter in `role`'s disk copy (None while a running QEMU has it mid-write).

    A running QEMU keeps qcow2 metadata of new clusters in memory until the
    guest's next flush, so only a stopped QEMU's copy is sure to show its last write."""
    try:
        return int(disk_identity.guest_file(MachinePaths(pair.run_dir(role)).disk,
                                            COUNTER_FILE, snapshot))
    except (disk_identity.DiskReadError, ValueError):
        return None


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
        with lan_with_storage(tmp_path / f"round{round_}") as (topo, nfs):
            lan = LocalPair(tmp_path / f"round{round_}" / "pair", network=topo, nfs=nfs)
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
                counted = lan.counted()
                check_increments(result, counted)
                assert backup["role"] == "primary" and backup["alone"]
                holder = tas.LockOwner.loads(
                    (nfs.export_dir / tas.lock_name(lan.name, 1)).read_bytes())
                assert holder.role == "backup"
                events = [e["event"] for e in lan.events("backup")]
                assert "going-live" in events and "replay-frozen-and-saved" in events
                check_takeover_story(lan, round_ == 0)
                # The guest runs on: its console goes on ticking on the new host.
                ticks = sum(line.startswith("tick ") for line in lan.console("backup"))
                wait_for(lambda: sum(line.startswith("tick ") for line in
                                     lan.console("backup")) >= ticks + 2, 30,
                         "the guest to keep ticking after the takeover")
                # The count lives on the root disk the new primary runs on.
                lan.stop()
                assert counter_on_disk(lan, "backup") == counted
            finally:
                lan.stop()


def test_the_new_primary_runs_on_the_disk_the_primary_wrote(ft_lan) -> None:
    """Non-shared disks: the backup's replay made every write the primary's guest
    made to its own copy, so the copy it goes live on is the one the primary had."""
    pair, nfs = ft_lan
    out, _ = pair.client("counter", "--count", "50").communicate(timeout=300)
    assert json.loads(out)["answers"] == list(range(1, 51))
    # The guest is quiet on disk now; the plug is pulled once the backup's replay
    # has written the last increment to its copy too.
    wait_for(lambda: counter_on_disk(pair, "backup") == 50, 60,
             "the backup's replay to write the last increment", every=0.5)
    pull_the_plug(pair.hosts["primary"])
    wait_for(lambda: pair.status("backup").get("state") == "alone", 60, "the backup to go live")
    # The old primary's copy (its QEMU is dead) and the new primary's copy as of
    # the moment its replay stopped hold the same guest-visible blocks.
    compared = subprocess.run([sys.executable, "-m", "vmft_qemu", "disk", "compare", "--config",
                               str(pair.config("backup")), "--snapshot", f"backup={SNAPSHOT}"],
                              capture_output=True, text=True, timeout=60)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    # The guest runs on from that disk and keeps writing to it.
    out, _ = pair.client("counter", "--count", "1", "--retries", "3").communicate(timeout=120)
    assert json.loads(out)["answers"] == [51]
    pair.stop()
    assert counter_on_disk(pair, "backup") == 51
    assert counter_on_disk(pair, "backup", SNAPSHOT) == 50


def check_takeover_story(pair: LocalPair, with_report: bool) -> None:
    """The event log of a takeover: the backup protected the VM, lost the primary,
    won the lock, went live; and `vmft report` draws it from the run dirs."""
    backup = pair.events("backup")
    told = states(backup)
    assert told[0] == "starting" and "replaying" in told
    assert told[-4:] == ["partner-lost", "going-live", "starting", "alone"], told
    order = [e["event"] if e["event"] != "state-change" else e["to"] for e in backup]
    lost, won, live = (order.index("partner-lost"), order.index("go-live-lock"),
                       order.index("going-live"))
    assert lost < won < live and backup[won]["won"] is True
    # The replay wrote its disk copy without flushing: durable before it runs live.
    assert live < order.index("disk-made-durable") < len(order) - 1 - order[::-1].index("starting")
    assert states(pair.events("primary"))[-1] in ("protected", "lagging")  # killed while so
    if not with_report:
        return
    written = write_report(pair.root)
    assert written.png.stat().st_size > 20_000
    assert [(m[1], m[2]) for m in written.report.marks] == [
        ("partner-lost", "backup"), ("going-live", "backup"), ("alone", "backup")]
    samples = read_jsonl(pair.run_dir("primary") / "metrics.jsonl")
    start = written.report.start
    assert plotted(written.report)["lag"]["primary"] == [
        (s["time"] - start, s["lag_ms"]) for s in samples if not s["alone"]]
    assert "- backup: partner lost at" in written.markdown.read_text()


def test_kill_the_backup_host_and_the_primary_goes_on(ft_lan) -> None:
    ft_lan, nfs = ft_lan
    client = ft_lan.client("counter", "--count", str(INCREMENTS))
    ft_lan.wait_released(10)
    pull_the_plug(ft_lan.hosts["backup"])
    out, _ = client.communicate(timeout=300)
    result = json.loads(out)
    assert result["error"] is None and result["reconnects"] == []
    assert result["answers"] == list(range(1, INCREMENTS + 1))
    primary = ft_lan.status("primary")
    assert primary["state"] == "alone" and primary["alone"]
    assert states(ft_lan.events("primary"))[-2:] == ["partner-lost", "alone"]
    assert ft_lan.counted() == INCREMENTS
    assert lock_files(nfs) == [tas.lock_name(ft_lan.name, 1)]


def test_partition_exactly_one_side_goes_on(ft_lan) -> None:
    ft_lan, nfs = ft_lan
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


def test_partition_while_the_storage_is_unreachable_never_gives_two_live_copies(ft_lan) -> None:
    pair, nfs = ft_lan
    client = pair.client("counter", "--count", str(INCREMENTS), "--retries", "3")
    pair.wait_released(10)
    pair.network.cut_storage()
    pair.hosts["primary"].cut_ft_link()
    # Both sides declare the other failed, neither reaches the lock: neither goes live.
    wait_for(lambda: pair.status("primary").get("state") == "backup-failed-no-lock"
             and pair.status("backup").get("state") == "primary-failed-no-lock", 60,
             "both sides to find the go-live lock unreachable")
    released = pair.status("primary")["gate"]["released"]
    # The primary holds its output meanwhile; watch it over a few lock retries.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        primary, backup = pair.status("primary"), pair.status("backup")
        assert not primary["alone"] and backup["role"] == "backup"
        assert primary["gate"]["released"] == released, "output left without a backup or lock"
        time.sleep(0.2)
    # The link comes back before the storage does: the pair carries on protected.
    pair.hosts["primary"].restore_ft_link()
    wait_for(lambda: pair.status("primary").get("state") in ("protected", "lagging"), 60,
             "the pair to reconnect")
    pair.network.restore_storage()
    out, _ = client.communicate(timeout=300)
    check_increments(json.loads(out), pair.counted())
    assert lock_files(nfs) == []  # nobody ever won the lock
    for role in ("primary", "backup"):
        assert pair.procs[role].poll() is None
        assert not any(e["event"] in ("going-alone", "going-live") for e in pair.events(role))
