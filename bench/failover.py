"""Benchmark: how long the guest is gone when its primary's host dies.

Each round boots an FT pair on netns hosts (primary on a, backup on b, the
go-live lock on nfs-ganesha in a storage namespace), starts
a client incrementing the guest's counter, waits a random moment, and pulls
the plug on host a (links down, every process SIGKILLed).  A watcher on the
LAN bridge's port of host b timestamps the guest's first frame from its new
host.  Per round it records:

    first_frame_s   kill -> first frame of the guest's MAC from host b
                    (the new primary's gratuitous ARP)
    first_guest_s   kill -> first frame the guest itself sent from host b
    detect_s        kill -> the backup declared the primary failed
    replayed_insns  guest instructions the backup replayed after the kill
                    (its backlog: log it had received but not yet replayed)
    client          every acknowledged increment still counted; reconnects

and writes bench/results/failover.json and failover.md with median and max.
Target: median first_frame_s <= 1 s.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import report as report_file
from vmft_qemu.lan_watch import LanWatch
from vmft_qemu.pair import LocalPair, lan_with_storage, pull_the_plug
from vmft_qemu.topology import GUEST_MAC
from vmft_qemu.waiting import wait_for

INCREMENTS = 400


def _event_time(pair: LocalPair, role: str, name: str) -> float:
    """An event's wall time (seconds since the epoch) from the role's event log."""
    for event in pair.events(role):
        if event["event"] == name:
            return event["time"]
    raise RuntimeError(f"no {name!r} event in the {role}'s event log")


def one_kill(work: Path, rng: random.Random) -> dict[str, Any]:
    with lan_with_storage(work) as (topo, nfs):
        pair = LocalPair(work / "pair", name="bench", network=topo, nfs=nfs)
        watch = LanWatch(topo.lan, topo.hosts["b"].lan_port, GUEST_MAC)
        try:
            pair.start_both()
            pair.wait_protected()
            client = pair.client("counter", "--count", str(INCREMENTS), "--retries", "3")
            pair.wait_released(10)
            time.sleep(rng.uniform(0, 3))  # the random moment of the failure
            replayed_before = pair.status("backup")["replayed"]["icount"]
            wall_kill = time.time()
            killed = pull_the_plug(topo.hosts["a"])
            try:
                wait_for(lambda: pair.status("backup").get("state") == "alone", 60,
                         "the backup to go live")
            except TimeoutError as e:
                raise TimeoutError(f"{e}: backup {pair.status('backup')}") from None
            first = wait_for(lambda: watch.first(killed), 30, "the first frame from host b")
            guest = wait_for(lambda: watch.first(killed, garp=False), 30,
                             "the guest's first own frame from host b")
            out, _ = client.communicate(timeout=300)
            result = json.loads(out)
            counted = pair.counted()
            going_live = next(e for e in pair.events("backup") if e["event"] == "going-live")
            answers = result["answers"]
            return {
                "first_frame_s": first["t"] - killed,
                "first_guest_s": guest["t"] - killed,
                "detect_s": _event_time(pair, "backup", "partner-failed") - wall_kill,
                "saved_s": _event_time(pair, "backup", "replay-frozen-and-saved") - wall_kill,
                "replayed_insns": going_live["icount"] - replayed_before,
                "client_error": result["error"], "reconnects": len(result["reconnects"]),
                "client_max_latency_ms": max(result["latency_ms"]),
                "acknowledged_kept": bool(answers) and counted >= answers[-1],
            }
        finally:
            watch.close()
            pair.stop()


def _stats(rounds: list[dict[str, Any]], key: str) -> dict[str, float]:
    values = [r[key] for r in rounds]
    return {"median": statistics.median(values), "max": max(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep each round's files here (default: a temporary directory)")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="vmft-bench-failover-") as tmp:
        work = args.workdir or Path(tmp)
        for i in range(args.kills):
            rounds.append(one_kill(work / f"kill{i}", rng))
            print(f"kill {i + 1}/{args.kills}: {rounds[-1]}", flush=True)
    keys = ("first_frame_s", "first_guest_s", "detect_s", "saved_s", "replayed_insns",
            "client_max_latency_ms")
    summary = {key: _stats(rounds, key) for key in keys}
    kept = all(r["acknowledged_kept"] and r["client_error"] is None for r in rounds)
    report = {"benchmark": "failover", "kills": args.kills, "seed": seed, "rounds": rounds,
              "summary": summary, "every_acknowledged_increment_kept": kept,
              "targets": {"median first_frame_s <= 1": summary["first_frame_s"]["median"] <= 1}}
    md = [f"# Failover: {args.kills} kills of the primary's host (seed {seed})", "",
          "| measure | median | max |", "|---|---|---|"]
    for key in keys:
        md.append(f"| {key} | {summary[key]['median']:.3f} | {summary[key]['max']:.3f} |")
    md += ["", f"Every acknowledged increment kept: {'yes' if kept else 'NO'}; "
               f"client reconnects: {sum(r['reconnects'] for r in rounds)}. "
               f"Target: median first_frame_s <= 1 s: "
               f"{'met' if report['targets']['median first_frame_s <= 1'] else 'NOT met'}."]
    report_file.write("failover", report, md)
    return 0 if kept else 1


if __name__ == "__main__":
    raise SystemExit(main())
