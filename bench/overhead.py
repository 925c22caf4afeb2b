"""Benchmark: what fault tolerance costs a CPU-bound guest.

The guest hashes M MiB with SHA-256 between two console markers; the host
times marker to marker.  One run measures, in this order and on this machine:

    plain   TCG without icount
    icount  TCG with icount (what record/replay needs)
    record  icount + rr=record into a file (primary alone)
    ft      the full pair: primary records, log over TCP, backup replays

and writes bench/results/overhead.json and overhead.md with the ratios.
Target: ft / icount <= 1.10.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import report as report_file
from vmft_qemu.images import locate
from vmft_qemu.machine import Machine, Role, VMSpec
from vmft_qemu.pair import LocalPair

START, END = "VMFT-BENCH-START", "VMFT-BENCH-END"


def time_markers(console: Path, done, timeout: float) -> float:
    """Seconds from START to END on `console`, polling every 5 ms."""
    started = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = console.read_text(errors="replace") if console.exists() else ""
        if started is None and START in text:
            started = time.monotonic()
        if started is not None and END in text:
            return time.monotonic() - started
        if done():
            break
        time.sleep(0.005)
    raise RuntimeError(f"no {START}..{END} on {console} within {timeout:.0f} s")


def run_machine(role: Role, spec: VMSpec, work: Path, timeout: float) -> dict:
    rrfile = work / "record.bin" if role is Role.RECORD else None
    machine = Machine(spec, role, work, rrfile=rrfile)

    async def go() -> dict:
        await machine.launch()
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        try:
            seconds = await loop.run_in_executor(
                None, time_markers, machine.paths.console, lambda: not machine.running(), timeout)
            await asyncio.wait_for(machine.wait(), 60)
        finally:
            await machine.stop()
        total = time.monotonic() - t0
        log_bytes = rrfile.stat().st_size if rrfile else 0
        return {"seconds": seconds, "log_bytes": log_bytes, "log_bytes_per_s": log_bytes / total}

    return asyncio.run(go())


def run_ft(spec: VMSpec, work: Path, timeout: float) -> dict:
    pair = LocalPair(work, workload=spec.workload, name="bench")
    try:
        t0 = time.monotonic()
        pair.start_both()
        seconds = time_markers(pair.run_dir("primary") / "console.log",
                               lambda: pair.procs["primary"].poll() is not None, timeout)
        codes = {role: pair.wait_exit(role, 120) for role in ("primary", "backup")}
        total = time.monotonic() - t0
    finally:
        pair.stop()
    exited = [e for e in pair.events("primary") if e["event"] == "qemu-exited"]
    log_bytes = exited[-1]["log_bytes"] if exited else 0
    same = pair.console("primary") == pair.console("backup")
    return {"seconds": seconds, "log_bytes": log_bytes, "log_bytes_per_s": log_bytes / total,
            "consoles_identical": same, "exit_codes": codes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=48, help="MiB the guest hashes (default 48)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per mode (median kept)")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()

    image = locate()
    spec = VMSpec("bench", 256, image, workload=f"sha256:{args.mib}")
    modes = {"plain": Role.PLAIN, "icount": Role.ICOUNT, "record": Role.RECORD, "ft": None}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for i in range(args.repeat):
        for mode, role in modes.items():
            work = Path(tempfile.mkdtemp(prefix=f"vmft-bench-{mode}-"))
            try:
                result = (run_ft(spec, work, args.timeout) if role is None
                          else run_machine(role, spec, work, args.timeout))
            finally:
                shutil.rmtree(work, ignore_errors=True)
            runs[mode].append(result)
            print(f"run {i + 1}/{args.repeat} {mode:7s} {result['seconds']:7.2f} s  "
                  f"log {result['log_bytes_per_s'] / 1024:8.1f} KiB/s", flush=True)

    median = {m: statistics.median(r["seconds"] for r in rs) for m, rs in runs.items()}
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                          text=True).stdout.splitlines()[0]
    report = {
        "benchmark": "overhead", "workload": f"sha256 over {args.mib} MiB in the guest",
        "repeat": args.repeat, "qemu": qemu, "machine": platform.machine(),
        "median_seconds": median,
        "ratio_to_icount": {m: median[m] / median["icount"] for m in modes},
        "ratio_to_plain": {m: median[m] / median["plain"] for m in modes},
        "log_bytes_per_s": {m: statistics.median(r["log_bytes_per_s"] for r in runs[m])
                            for m in ("record", "ft")},
        "ft_consoles_identical": all(r["consoles_identical"] for r in runs["ft"]),
        "target": "ft / icount <= 1.10",
        "target_met": median["ft"] / median["icount"] <= 1.10,
        "runs": runs,
    }
    lines = [f"# Overhead: {report['workload']} ({qemu}, median of {args.repeat})", "",
             "| mode | seconds | / icount | / plain | log KiB/s |", "|---|---|---|---|---|"]
    for m in modes:
        bw = report["log_bytes_per_s"].get(m)
        bw_text = f"{bw / 1024:.1f}" if bw is not None else "-"
        lines.append(f"| {m} | {median[m]:.2f} | {report['ratio_to_icount'][m]:.3f} | "
                     f"{report['ratio_to_plain'][m]:.3f} | {bw_text} |")
    lines += ["", f"Target {report['target']}: {'met' if report['target_met'] else 'NOT met'}; "
              f"FT consoles identical: {report['ft_consoles_identical']}."]
    report_file.write("overhead", report, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
