"""Benchmark: what the output rule costs a client.

A client on the LAN (its own network namespace) sends counter increments one
at a time and fetches a 5 KiB page, against:

    plain-net  the same guest and QEMU (icount, no record/replay) with its NIC
               straight on a TAP of host a: no FT
    record-net the same, but recording (rr=record into a file): QEMU's own
               record cost, without any FT machinery
    ft         the FT pair: primary on host a, backup on host b, every reply
               held by the output gate until the backup's ACK covers it

and writes bench/results/latency.json and latency.md: request latency p50/p99,
throughput, and the log bandwidth under that load, in one run.  Each host's
QEMU is pinned to a core of its own (host a: core 0, host b: core 1), as if
the hosts were separate machines; otherwise the backup's replay competes with
the primary for this machine's 2 cores (measured: +30 ms p50).
Targets: added p50 latency <= 5 ms; FT throughput >= 80 % of non-FT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import report as report_file
from vmft_qemu.images import locate
from vmft_qemu.machine import Machine, Role, VMSpec
from vmft_qemu.pair import LocalPair, wait_for
from vmft_qemu.topology import GUEST_IP, GUEST_MAC, LAN_PREFIX, Topology



def _client(topo: Topology, *args: str) -> dict[str, Any]:
    done = topo.client.run([sys.executable, "-m", "vmft_qemu.client", *args, "--host", GUEST_IP],
                           capture_output=True, text=True, timeout=600)
    result = json.loads(done.stdout)
    if result["error"]:
        raise RuntimeError(f"client failed: {result['error']}")
    return result


def _pin(pid: int, core: int) -> None:
    """Every thread of QEMU `pid` onto `core`: one core per simulated host."""
    subprocess.run(["taskset", "-a", "-p", "-c", str(core), str(pid)], check=True,
                   capture_output=True)


def _load(topo: Topology, requests: int, pages: int) -> dict[str, Any]:
    start = time.monotonic()
    counted = _client(topo, "counter", "--count", str(requests))
    counter_s = time.monotonic() - start
    start = time.monotonic()
    fetched = _client(topo, "http", "--path", "/ft.html", "--count", str(pages))
    http_s = time.monotonic() - start
    lat = sorted(counted["latency_ms"])
    return {
        "p50_ms": statistics.median(lat),
        "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "requests_per_s": requests / counter_s,
        "pages_per_s": pages / http_s,
        "answers_right": counted["answers"] == list(range(1, requests + 1)),
        "pages_right": all(page["status"] == 200 for page in fetched["pages"]),
    }


def run_alone(image, role: Role, requests: int, pages: int, work: Path) -> dict[str, Any]:
    """One QEMU, no FT, its NIC straight on a TAP of host a."""
    with Topology() as topo:
        host = topo.hosts["a"]
        spec = VMSpec("bench-net", 256, image, mac=GUEST_MAC, ip=f"{GUEST_IP}/{LAN_PREFIX}",
                      tap=host.add_tap("vmft0"))
        rrfile = work / "record.bin" if role is Role.RECORD else None
        machine = Machine(spec, role, work, rrfile=rrfile, netns=host.name)

        async def go() -> dict[str, Any]:
            await machine.launch()
            assert machine.pid is not None
            _pin(machine.pid, 0)
            try:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, _wait_net, lambda: machine.paths.console, 180)
                return await loop.run_in_executor(None, _load, topo, requests, pages)
            finally:
                await machine.stop()

        return asyncio.run(go())


def _wait_net(console: Callable[[], Path], timeout: float) -> None:
    wait_for(lambda: console().exists() and f"VMFT-NET-UP {GUEST_IP}" in console().read_text(
        errors="replace"), timeout, "the guest's network")


def run_ft(requests: int, pages: int, work: Path) -> dict[str, Any]:
    with Topology() as topo:
        pair = LocalPair(work, name="bench", network=topo)
        try:
            pair.start_both()
            pair.wait_protected()  # steady state: the backup has caught up with the boot
            for core, role in enumerate(("primary", "backup")):
                _pin(pair.status(role)["qemu_pid"], core)
            before = pair.status("primary")
            t0 = time.monotonic()
            result = _load(topo, requests, pages)
            after = pair.status("primary")
            result["log_bytes_per_s"] = ((after["recorded"]["offset"] - before["recorded"]["offset"])
                                         / (time.monotonic() - t0))
            result["gate_max_hold_ms"] = after["gate"]["max_hold_ms"]
            return result
        finally:
            pair.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--pages", type=int, default=50)
    args = parser.parse_args()
    image = locate()
    with tempfile.TemporaryDirectory(prefix="vmft-bench-lat-") as tmp:
        plain = run_alone(image, Role.ICOUNT, args.requests, args.pages, Path(tmp) / "plain")
        print(f"plain-net: {plain}", flush=True)
        record = run_alone(image, Role.RECORD, args.requests, args.pages, Path(tmp) / "record")
        print(f"record-net: {record}", flush=True)
        ft = run_ft(args.requests, args.pages, Path(tmp) / "ft")
        print(f"ft:        {ft}", flush=True)
    added = ft["p50_ms"] - plain["p50_ms"]
    ratio = ft["requests_per_s"] / plain["requests_per_s"]
    report = {
        "benchmark": "latency", "requests": args.requests, "pages": args.pages,
        "plain_net": plain, "record_net": record, "ft": ft, "added_p50_ms": added,
        "added_p50_ms_over_record": ft["p50_ms"] - record["p50_ms"], "throughput_ratio": ratio,
        "page_rate_ratio": ft["pages_per_s"] / plain["pages_per_s"],
        "targets": {"added_p50_ms <= 5": added <= 5, "throughput_ratio >= 0.8": ratio >= 0.8},
    }
    md = [f"# Output rule cost: {args.requests} counter requests, {args.pages} pages of 5 KiB", "",
          "| mode | p50 ms | p99 ms | requests/s | pages/s | log KiB/s |", "|---|---|---|---|---|---|"]
    for name, r in (("plain-net (no FT)", plain), ("record-net (rr=record, no FT)", record),
                    ("ft", ft)):
        log_rate = f"{r['log_bytes_per_s'] / 1024:.1f}" if "log_bytes_per_s" in r else "-"
        md.append(f"| {name} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['requests_per_s']:.1f} "
                  f"| {r['pages_per_s']:.1f} | {log_rate} |")
    md += ["", f"Added p50 latency: {added:.2f} ms (target <= 5); "
               f"{report['added_p50_ms_over_record']:.2f} ms over record-net. "
               f"Throughput FT / non-FT: {ratio:.2f} (target >= 0.80)."]
    report_file.write("latency", report, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
