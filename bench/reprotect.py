"""Benchmark: what a join costs the running VM (re-protection, `vmft_qemu/reprotect.py`).

The VM runs alone on host a (its first backup never came: it won the lock
and went on alone) while a client on the LAN keeps incrementing its counter,
each increment synced to the guest's root disk.  Each round starts a standby
(`vmft protect`) on another host, lets the primary join it, and records:

    pause_s          the guest was stopped (stop, savevm, new recording, cont)
    savevm_s         of which savevm
    restart_s        of which the new recording's start from the snapshot
    state_mib        VM state + disk delta shipped over the log channel
    state_s          join start -> the state is on the new host
    protected_s      join start -> output held for the new backup's ACKs again
    lockstep_s       join start -> the new backup's lag under the 100 ms target
    log_kib          log shipped from the join point until protected
    client_max_ms    slowest increment during the round (the join is in it)
    client_p50_ms    the client's median in the same round

Then the plug is pulled on the new backup's host, the primary goes on alone,
and the next round joins a standby on the other spare host.  Results:
bench/results/reprotect.json and reprotect.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import report as report_file
from vmft_qemu.pair import SpareHosts, wait_for
from vmft_qemu.topology import GUEST_IP, Topology


def _last(vm: SpareHosts, host: str, name: str) -> dict[str, Any]:
    found = [e for e in vm.events(host) if e["event"] == name]
    if not found:
        raise RuntimeError(f"no {name!r} event on host {host}")
    return found[-1]


def one_join(vm: SpareHosts, standby: str) -> dict[str, Any]:
    client = vm.client("counter", "--count", "100000", "--duration", "25", "--retries", "3")
    wait_for(lambda: vm.status("a").get("state") == "alone", 60, "the primary to run alone")
    time.sleep(3)  # the client's steady state before the join: a measurement window
    vm.start(standby)
    started = time.time()
    wait_for(lambda: vm.status("a").get("state") in ("protected", "lagging"), 120, "the join")
    joined = _last(vm, "a", "protected-again")
    lockstep = wait_for(lambda: vm.status("a").get("lag_ms", 1e9) < 100 and time.time(), 120,
                        "the new backup in lock-step")
    out, _ = client.communicate(timeout=120)
    result = json.loads(out)
    if result["error"] is not None:
        raise RuntimeError(f"client failed: {result['error']}")
    join_t0 = joined["time"] - joined["protected_s"]
    return {
        "standby": standby, "pause_s": joined["pause_s"], "savevm_s": joined["savevm_s"],
        "restart_s": joined["restart_s"],
        "state_mib": round(joined["state_bytes"] / 2**20, 1), "state_s": joined["state_s"],
        "protected_s": joined["protected_s"], "lockstep_s": round(lockstep - join_t0, 3),
        "log_kib": round((joined.get("log_bytes") or 0) / 1024, 1),
        "client_max_ms": round(max(result["latency_ms"]), 1),
        "client_p50_ms": round(statistics.median(result["latency_ms"]), 1),
        "increments": len(result["answers"]), "started_to_protected_s": round(
            joined["time"] - started, 3)}


def run(rounds: int, work: Path) -> list[dict[str, Any]]:
    results = []
    with Topology(hosts=3) as topo:
        vm = SpareHosts(work / "vm", topo)
        try:
            vm.start("a", "primary")
            wait_for(lambda: f"VMFT-NET-UP {GUEST_IP}" in vm.console("a"), 180,
                     "the guest's network")
            for i in range(rounds):
                standby = "bc"[i % 2]
                results.append(one_join(vm, standby))
                print(json.dumps(results[-1]))
                vm.pull_plug(standby)  # the primary goes on alone: ready for the next join
        finally:
            vm.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmft-bench-reprotect-") as tmp:
        rounds = run(args.rounds, Path(tmp))
    keys = ["pause_s", "savevm_s", "restart_s", "state_mib", "state_s", "protected_s", "lockstep_s",
            "log_kib", "client_p50_ms", "client_max_ms"]
    summary = {k: {"median": statistics.median(r[k] for r in rounds),
                   "max": max(r[k] for r in rounds)} for k in keys}
    table = ["| what | median | max |", "|---|---|---|"]
    table += [f"| {k} | {summary[k]['median']} | {summary[k]['max']} |" for k in keys]
    ratio = summary["client_max_ms"]["median"] / summary["client_p50_ms"]["median"]
    table.append(f"| slowest increment during a join / median increment | {ratio:.1f} | |")
    report_file.write("reprotect", {"rounds": rounds, "summary": summary,
                                    "join_max_over_p50": round(ratio, 2)}, table)


if __name__ == "__main__":
    main()
