"""Benchmark: what a join costs the running VM (re-protection, `vmft_qemu/reprotect.py`).

Two kinds of join, in one run on three netns hosts, while a client on the LAN
keeps incrementing the guest's counter (each increment synced to its root
disk):

    booted          the VM booted on host a and runs there alone (its first
                    backup never came); a standby starts on b or c and a
                    joins it; then the plug is pulled on that standby's host
    after-takeover  the plug is pulled on the primary's host; its backup goes
                    live, alone, and joins a standby started on the third
                    host (the paper's re-protection after a failure)

Each join records:

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

Results: bench/results/reprotect.json and reprotect.md.
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
from vmft_qemu.pair import SpareHosts
from vmft_qemu.topology import GUEST_IP, Topology
from vmft_qemu.waiting import wait_for


def _last(vm: SpareHosts, host: str, name: str) -> dict[str, Any]:
    found = [e for e in vm.events(host) if e["event"] == name]
    if not found:
        raise RuntimeError(f"no {name!r} event on host {host}")
    return found[-1]


def one_join(vm: SpareHosts, primary: str, standby: str, kind: str) -> dict[str, Any]:
    wait_for(lambda: vm.status(primary).get("state") == "alone", 60,
             f"the primary on {primary} to run alone")
    client = vm.client("counter", "--count", "100000", "--duration", "25", "--retries", "3")
    time.sleep(3)  # the client's steady state before the join: a measurement window
    vm.start(standby)
    started = time.time()
    wait_for(lambda: vm.status(primary).get("state") in ("protected", "lagging"), 120, "the join")
    joined = _last(vm, primary, "protected-again")
    lockstep = wait_for(lambda: vm.status(primary).get("lag_ms", 1e9) < 100 and time.time(),
                        120, "the new backup in lock-step")
    out, _ = client.communicate(timeout=120)
    result = json.loads(out)
    if result["error"] is not None:
        raise RuntimeError(f"client failed: {result['error']}")
    join_t0 = joined["time"] - joined["protected_s"]
    return {
        "kind": kind, "primary": primary, "standby": standby,
        "pause_s": joined["pause_s"], "savevm_s": joined["savevm_s"],
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

    def measured(primary: str, standby: str, kind: str) -> None:
        results.append(one_join(vm, primary, standby, kind))
        print(json.dumps(results[-1]), flush=True)

    with Topology(hosts=3) as topo:
        vm = SpareHosts(work / "vm", topo)
        try:
            vm.start("a", "primary")
            wait_for(lambda: f"VMFT-NET-UP {GUEST_IP}" in vm.console("a"), 180,
                     "the guest's network")
            for i in range(rounds):
                standby = "bc"[i % 2]
                measured("a", standby, "booted")
                if i < rounds - 1:
                    vm.pull_plug(standby)  # the primary goes on alone: ready for the next join
            primary, backup = "a", standby
            for _ in range(rounds):
                vm.pull_plug(primary)  # the backup goes live, alone
                spare = next(h for h in vm.hosts if h not in (primary, backup))
                measured(backup, spare, "after-takeover")
                primary, backup = backup, spare
        finally:
            vm.stop()
    return results


KEYS = ["pause_s", "savevm_s", "restart_s", "state_mib", "state_s", "protected_s", "lockstep_s",
        "log_kib", "client_p50_ms", "client_max_ms"]
KINDS = ["booted", "after-takeover"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="joins of each kind")
    parser.add_argument("--workdir", type=Path,
                        help="keep the controllers' run dirs here (for `vmft report`); "
                             "default: a temporary directory, removed afterwards")
    args = parser.parse_args()
    if args.workdir:
        rounds = run(args.rounds, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="vmft-bench-reprotect-") as tmp:
            rounds = run(args.rounds, Path(tmp))
    summary = {kind: {k: {"median": statistics.median(r[k] for r in rounds if r["kind"] == kind),
                          "max": max(r[k] for r in rounds if r["kind"] == kind)} for k in KEYS}
               for kind in KINDS}
    table = ["| what | " + " | ".join(f"{kind} median | {kind} max" for kind in KINDS) + " |",
             "|---|" + "---|---|" * len(KINDS)]
    table += [f"| {k} | " + " | ".join(f"{summary[kind][k]['median']} | {summary[kind][k]['max']}"
                                       for kind in KINDS) + " |" for k in KEYS]
    ratios = {kind: round(summary[kind]["client_max_ms"]["median"]
                          / summary[kind]["client_p50_ms"]["median"], 2) for kind in KINDS}
    table.append("| slowest increment during a join / median increment | "
                 + " | ".join(f"{ratios[kind]:.1f} | " for kind in KINDS) + "|")
    report_file.write("reprotect", {"rounds": rounds, "summary": summary,
                                    "join_max_over_p50": ratios}, table)


if __name__ == "__main__":
    main()
