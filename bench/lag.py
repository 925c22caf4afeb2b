"""Benchmark: lag control against a slow backup, and what it costs the primary.

Each measurement runs once with the loop on ([lag] control = true, target
100 ms) and once with it off, on an FT pair over loopback:

    starved   the guest hashes zeros (CPU-bound for minutes); once it does,
              the backup's QEMU may use only --backup-cpu of one CPU (a
              cgroup).  For --window seconds the primary's status samples
              (metrics.jsonl, every 0.5 s) give the lag, the throttle share
              and the primary's instruction rate.  Then the primary is
              SIGKILLed and the limit lifted: failover = kill -> the backup
              runs the VM (state "alone"), and the backlog it had to replay.
    cost      sha256 over --mib MiB with the backup NOT starved: seconds from
              VMFT-BENCH-START to -END on the primary's console.  The loop
              slows the primary down to the backup's replay speed, which is
              below its record speed even on an idle host.

Writes bench/results/lag.json, lag.md and lag.png (lag and throttle over time).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

import report as report_file
from overhead import time_markers
from vmft_qemu.cpu_limit import CpuLimit
from vmft_qemu.events import read_jsonl
from vmft_qemu.metrics import SAMPLES_NAME
from vmft_qemu.pair import LocalPair
from vmft_qemu.waiting import wait_for

LOOPS = {"on": True, "off": False}


def pair_for(work: Path, workload: str, control: bool) -> LocalPair:
    return LocalPair(work, workload=workload, name="bench",
                     extra_config=f"[lag]\ncontrol = {str(control).lower()}\n")


def starved(work: Path, control: bool, backup_cpu: float, window: float) -> dict[str, Any]:
    pair = pair_for(work, "sha256:20000", control)
    try:
        pair.start_both()
        wait_for(lambda: "VMFT-BENCH-START" in pair.console("primary"), 120,
                 "the guest's CPU-bound workload to start")
        pid = pair.status("backup")["qemu_pid"]
        with CpuLimit(f"vmft-bench-{pid}", backup_cpu, pid) as limit:
            since = time.time()
            samples_path = pair.run_dir("primary") / SAMPLES_NAME
            wait_for(lambda: read_jsonl(samples_path)[-1]["time"] > since + window, window + 30,
                     f"{window:.0f} s of the primary's status samples")
            before = pair.status("backup")["replayed"]["icount"]
            primary = pair.status("primary")
            killed = time.monotonic()
            os.killpg(pair.procs["primary"].pid, signal.SIGKILL)
            limit.close()
            wait_for(lambda: pair.status("backup").get("state") == "alone", 300,
                     "the backup to go live", every=0.02)
            failover_s = time.monotonic() - killed
        going_live = next(e for e in pair.events("backup") if e["event"] == "going-live")
        samples = [s for s in read_jsonl(samples_path) if since <= s["time"] <= since + window]
    finally:
        pair.stop()
    icounts = [s["recorded"]["icount"] for s in samples]
    seconds = samples[-1]["time"] - samples[0]["time"]
    return {
        "samples": [{"t": round(s["time"] - since, 2), "lag_ms": s["lag_ms"],
                     "throttle_share": s["throttle_share"],
                     "throttle_slept_s": s["throttle_slept_s"]} for s in samples],
        "lag_ms": {"start": samples[0]["lag_ms"], "end": samples[-1]["lag_ms"],
                   "median": statistics.median(s["lag_ms"] for s in samples),
                   "max": max(s["lag_ms"] for s in samples)},
        "primary_insns_per_s": (icounts[-1] - icounts[0]) / seconds,
        "slept_share": (samples[-1]["throttle_slept_s"] - samples[0]["throttle_slept_s"]) / seconds,
        "lag_at_kill_ms": primary["lag_ms"],
        "failover_s": failover_s,
        "backlog_insns": going_live["icount"] - before,
    }


def cost(work: Path, control: bool, mib: int) -> float:
    pair = pair_for(work, f"sha256:{mib}", control)
    try:
        pair.start_both()
        return time_markers(pair.run_dir("primary") / "console.log",
                            lambda: pair.procs["primary"].poll() is not None, 600)
    finally:
        pair.stop()


def plot(runs: dict[str, dict[str, Any]], backup_cpu: float, png: Path) -> None:
    fig = Figure(figsize=(10, 7), dpi=100, layout="constrained")
    fig.suptitle(f"Backup's QEMU limited to {backup_cpu:.0%} of a CPU, guest CPU-bound "
                 "(sha256); target 100 ms", fontsize=11)
    lag_ax, share_ax = fig.subplots(2, 1, sharex=True)
    for loop, run in runs.items():
        t = [s["t"] for s in run["samples"]]
        lag_ax.plot(t, [max(s["lag_ms"], 1) for s in run["samples"]], marker=".",
                    label=f"lag control {loop}")
        share_ax.plot(t, [s["throttle_share"] for s in run["samples"]], marker=".",
                      label=f"lag control {loop}")
    lag_ax.axhline(100, color="tab:red", linestyle="dashed", label="target")
    lag_ax.set_yscale("log")
    lag_ax.set_ylabel("backup's lag (ms, primary's time)")
    lag_ax.legend()
    lag_ax.grid(True, which="both", alpha=0.3)
    share_ax.set_ylabel("throttle share\n(primary's vCPU asleep)")
    share_ax.set_xlabel("seconds since the backup was starved")
    share_ax.set_ylim(-0.05, 1)
    share_ax.legend()
    share_ax.grid(True, alpha=0.3)
    fig.savefig(png)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backup-cpu", type=float, default=0.4,
                        help="share of one CPU the starved backup's QEMU may use (default 0.4)")
    parser.add_argument("--window", type=float, default=20,
                        help="seconds of lag sampled while starved (default 20)")
    parser.add_argument("--mib", type=int, default=48, help="MiB hashed for the cost (default 48)")
    args = parser.parse_args()
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="vmft-bench-lag-") as tmp:
        for loop, control in LOOPS.items():
            runs[loop] = starved(Path(tmp) / f"starved-{loop}", control, args.backup_cpu,
                                 args.window)
            runs[loop]["sha256_s"] = cost(Path(tmp) / f"cost-{loop}", control, args.mib)
            print(f"loop {loop}: {({k: v for k, v in runs[loop].items() if k != 'samples'})}",
                  flush=True)
    on, off = runs["on"], runs["off"]
    report = {
        "benchmark": "lag", "backup_cpu": args.backup_cpu, "window_s": args.window,
        "target_ms": 100, "sha256_mib": args.mib, "runs": runs,
        "ratios": {"sha256_on_over_off": on["sha256_s"] / off["sha256_s"],
                   "starved_primary_speed_on_over_off":
                       on["primary_insns_per_s"] / off["primary_insns_per_s"],
                   "failover_on_over_off": on["failover_s"] / off["failover_s"]},
    }
    report_file.write("lag", report, table(report))
    plot(runs, args.backup_cpu, report_file.RESULTS / "lag.png")
    return 0


def table(report: dict[str, Any]) -> list[str]:
    on, off, r = report["runs"]["on"], report["runs"]["off"], report["ratios"]
    rows = [
        ("lag, median over the window (ms)", on["lag_ms"]["median"], off["lag_ms"]["median"], 0),
        ("lag, max over the window (ms)", on["lag_ms"]["max"], off["lag_ms"]["max"], 0),
        ("lag at the window's end (ms)", on["lag_ms"]["end"], off["lag_ms"]["end"], 0),
        ("primary's speed while starved (M instructions/s)", on["primary_insns_per_s"] / 1e6,
         off["primary_insns_per_s"] / 1e6, 0),
        ("primary's vCPU asleep (share of the window)", on["slept_share"], off["slept_share"], 2),
        ("failover: kill -> backup runs the VM (s)", on["failover_s"], off["failover_s"], 2),
        ("backlog replayed after the kill (M instructions)", on["backlog_insns"] / 1e6,
         off["backlog_insns"] / 1e6, 0),
        (f"sha256 over {report['sha256_mib']} MiB, backup not starved (s)", on["sha256_s"],
         off["sha256_s"], 2),
    ]
    md = [f"# Lag control: backup's QEMU limited to {report['backup_cpu']:.0%} of a CPU, "
          f"{report['window_s']:.0f} s window, target {report['target_ms']} ms", "",
          "| measure | loop on | loop off |", "|---|---|---|"]
    md += [f"| {name} | {a:.{d}f} | {b:.{d}f} |" for name, a, b, d in rows]
    md += ["", f"Primary's cost of the loop: sha256 on/off {r['sha256_on_over_off']:.2f}, "
               f"speed while the backup is starved on/off "
               f"{r['starved_primary_speed_on_over_off']:.2f}; failover on/off "
               f"{r['failover_on_over_off']:.3f}. The CPU limit is lifted at the kill.",
           "", "![lag over time](lag.png)"]
    return md


if __name__ == "__main__":
    raise SystemExit(main())
