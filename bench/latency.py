"""Benchmark: what the output rule costs a client.

A client on the LAN (its own network namespace) sends counter increments one
at a time (INC: the guest's shell runs five busybox applets and syncs the disk
twice per request), then counter reads (GET: a shell builtin reads a file,
nothing forks or touches the disk), first one client and then 4 at once
(throughput: one client waiting for each answer measures only 1 / latency),
and fetches a 5 KiB page, against:

    plain-net  the same guest and QEMU (icount, no record/replay) with its NIC
               straight on a TAP of host a: no FT
    record-bare the same, but recording (rr=record into a file) as QEMU ships
               it: QEMU's own record cost, without any FT machinery
    record-net the same with the logflush plugin the FT primary runs (it
               delivers queued disk completions without waiting for the
               guest's next timer): record cost without FT, as FT records
    ft         the FT pair: primary on host a, backup on host b, every reply
               held by the output gate until the backup's ACK covers it
    ft-alone   the same primary once its backup's host is gone (gate open):
               FT's path through the controller, without the backup
    ft-replay-apart  a new FT pair whose backup QEMU is stopped while the load
               runs (lag control off): the log is received and acknowledged as
               always, the replay comes after.  The output rule's cost when the
               replay does not share this machine's 2 cores with the primary, as
               with two real hosts

and writes bench/results/latency.json and latency.md: request latency p50/p99,
throughput, the log bandwidth under that load and the CPU time each counter
request costs QEMU, in one run.  Each host's
QEMU is pinned to a core of its own (host a: core 0, host b: core 1), as if
the hosts were separate machines; otherwise the backup's replay competes with
the primary for this machine's 2 cores (measured: +30 ms p50).
Targets: added p50 latency <= 5 ms; FT throughput >= 80 % of non-FT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import report as report_file
from vmft_qemu.config import from_dict
from vmft_qemu.events import read_jsonl
from vmft_qemu.images import locate
from vmft_qemu.machine import Machine, Role, VMSpec
from vmft_qemu.pair import LocalPair, pull_the_plug
from vmft_qemu.topology import GUEST_IP, GUEST_MAC, LAN_PREFIX, Topology
from vmft_qemu.waiting import wait_for



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


def _cpu_s(pid: int) -> float:
    """CPU seconds process `pid` has used (all its threads, user + system)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


READERS = 4  # clients reading the counter at once, for the read throughput


def _percentiles(prefix: str, latencies: list[float]) -> dict[str, float]:
    """p50 and p99 of `latencies` (ms), as PREFIXp50_ms and PREFIXp99_ms."""
    ordered = sorted(latencies)
    return {f"{prefix}p50_ms": statistics.median(ordered),
            f"{prefix}p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def _rate(clients: list[dict[str, Any]]) -> float:
    """Answers per second over the clients' common span, first request to last
    answer (not counting each client process's start)."""
    span = max(c["ended"] for c in clients) - min(c["started"] for c in clients)
    return sum(len(c["answers"]) for c in clients) / span


def _load(topo: Topology, requests: int, pages: int, qemu_pid: int,
          counted_before: int = 0) -> dict[str, Any]:
    """`requests` counter increments, as many counter reads, then `pages` page
    fetches; the guest's counter stood at `counted_before`.  Also what each
    increment cost the (primary's) QEMU `qemu_pid` in CPU time."""
    cpu_start = _cpu_s(qemu_pid)
    counted = _client(topo, "counter", "--count", str(requests))
    qemu_cpu_ms = (_cpu_s(qemu_pid) - cpu_start) * 1000 / requests
    read = _client(topo, "counter", "--get", "--count", str(requests))
    # Throughput proper: READERS clients at once, each on its own connection.
    with ThreadPoolExecutor(READERS) as pool:
        together = list(pool.map(lambda _: _client(topo, "counter", "--get", "--count",
                                                    str(requests)), range(READERS)))
    start = time.monotonic()
    fetched = _client(topo, "http", "--path", "/ft.html", "--count", str(pages))
    http_s = time.monotonic() - start
    return {
        **_percentiles("", counted["latency_ms"]),
        "requests_per_s": _rate([counted]),
        "qemu_cpu_ms_per_request": qemu_cpu_ms,
        **_percentiles("read_", read["latency_ms"]),
        "reads_per_s": _rate([read]),
        "reads_per_s_together": _rate(together),
        "pages_per_s": pages / http_s,
        "answers_right": counted["answers"] == list(range(counted_before + 1,
                                                          counted_before + requests + 1))
        and all(answer == counted_before + requests
                for answers in [read["answers"], *(r["answers"] for r in together)]
                for answer in answers),
        "pages_right": all(page["status"] == 200 for page in fetched["pages"]),
    }


def run_alone(image, role: Role, requests: int, pages: int, work: Path,
              log_flush_us: int = 0) -> dict[str, Any]:
    """One QEMU, no FT, its NIC straight on a TAP of host a."""
    with Topology() as topo:
        host = topo.hosts["a"]
        spec = VMSpec("bench-net", 256, image, mac=GUEST_MAC, ip=f"{GUEST_IP}/{LAN_PREFIX}",
                      tap=host.add_tap("vmft0"), log_flush_us=log_flush_us)
        rrfile = work / "record.bin" if role is Role.RECORD else None
        machine = Machine(spec, role, work, rrfile=rrfile, netns=host.name)

        async def go() -> dict[str, Any]:
            await machine.launch()
            assert machine.pid is not None
            _pin(machine.pid, 0)
            try:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, _wait_net, lambda: machine.paths.console, 180)
                return await loop.run_in_executor(None, _load, topo, requests, pages, machine.pid)
            finally:
                await machine.stop()

        return asyncio.run(go())


def _wait_net(console: Callable[[], Path], timeout: float) -> None:
    wait_for(lambda: console().exists() and f"VMFT-NET-UP {GUEST_IP}" in console().read_text(
        errors="replace"), timeout, "the guest's network")


def run_ft(requests: int, pages: int, work: Path, log_flush_us: int,
           replay_apart: bool = False) -> dict[str, dict[str, Any]]:
    """The FT pair's load ("ft"), then the same load on its primary once the
    backup is gone ("ft_alone").  The primary's QEMU pushes its log out every
    `log_flush_us` (primary.log_flush_us) and wakes its vCPU as inputs are
    queued; the backup's wakes its replay whenever it has halted (logflush.c).

    `replay_apart` ("ft_replay_apart"): the backup's QEMU is stopped (SIGSTOP)
    while the load runs and lag control is off, so the backup's controller
    receives and acknowledges the log as always but the replay waits: the output
    rule's cost when the replay has a CPU of its own, as on two real hosts.  The
    replay then catches up, and the backup's console must match the primary's."""
    with Topology() as topo:
        pair = LocalPair(work, name="bench", network=topo,
                         primary=f"log_flush_us = {log_flush_us}\n",
                         extra_config="[lag]\ncontrol = false\n" if replay_apart else "")
        try:
            pair.start_both()
            pair.wait_protected()  # steady state: the backup has caught up with the boot
            for core, role in enumerate(("primary", "backup")):
                _pin(pair.status(role)["qemu_pid"], core)
            before = pair.status("primary")
            released_before = before["gate"]["released"]
            pids = {f"{role} {part}": pair.status(role)[f"{part}_pid"]
                    for role in ("primary", "backup") for part in ("qemu", "controller")}
            cpu_before = {name: _cpu_s(pid) for name, pid in pids.items()}
            t0, wall0 = time.monotonic(), time.time()
            if replay_apart:
                os.kill(pids["backup qemu"], signal.SIGSTOP)
            try:
                result = _load(topo, requests, pages, pids["primary qemu"])
            except RuntimeError as e:  # say where every side stood when the client gave up
                raise RuntimeError(f"{e}; " + pair.standing(
                    "state", "recorded", "acked", "backup_replayed", "lag_ms", "gate",
                    "errors")) from None
            finally:
                if replay_apart:
                    os.kill(pids["backup qemu"], signal.SIGCONT)
            after = pair.status("primary")
            took = time.monotonic() - t0
            result["log_bytes_per_s"] = (after["recorded"]["offset"] - before["recorded"]["offset"]) / took
            result["cpu_share"] = {name: (_cpu_s(pid) - cpu_before[name]) / took
                                   for name, pid in pids.items()}
            # Lag control during the load: how much the primary's vCPU was made to sleep.
            result["throttle_slept_share"] = (after["throttle_slept_s"] - before["throttle_slept_s"]) / took
            samples = [s for s in read_jsonl(pair.run_dir("primary") / "metrics.jsonl")
                       if s["time"] >= wall0]
            result["throttle_share_mean"] = statistics.mean(s["throttle_share"] for s in samples)
            result["lag_ms_p50"] = statistics.median(s["lag_ms"] for s in samples)
            result["ack_delay_ms_p50"] = statistics.median(
                s["ack_delay_ms"] for s in samples if s["ack_delay_ms"] is not None)
            result["gate_max_hold_ms"] = after["gate"]["max_hold_ms"]
            # The gate's share: frame reached the controller -> stamped (a log
            # flush on request per batch) -> released (the backup's ACK covers it).
            trail = read_jsonl(pair.run_dir("primary") / "gate.jsonl")[released_before:]
            result["gate_stamp_ms_p50"] = statistics.median(t["stamp_ms"] for t in trail)
            result["gate_hold_ms_p50"] = statistics.median(t["hold_ms"] for t in trail)
            if replay_apart:
                started = time.monotonic()
                wait_for(lambda: pair.status("primary")["lag_ms"] < 500, 600,
                         "the backup's replay to catch up after the load")
                result["catch_up_s"] = time.monotonic() - started
                result["load_s"] = took
                replayed = pair.console("backup")[:-1]  # its last line may be half written
                result["backup_console_is_prefix"] = \
                    replayed == pair.console("primary")[:len(replayed)]
                return {"ft_replay_apart": result}
            # The same primary once its backup is gone (gate open, nobody to
            # replay): FT's path through the controller without the backup.
            pull_the_plug(pair.hosts["backup"])
            wait_for(lambda: pair.status("primary").get("alone"), 60, "the primary to go on alone")
            return {"ft": result, "ft_alone": _load(topo, requests, pages, pids["primary qemu"],
                                                    counted_before=requests)}
        finally:
            pair.stop()


def _breakdown(plain: dict[str, Any], record: dict[str, Any], ft: dict[str, Any],
               alone: dict[str, Any]) -> list[str]:
    """Where FT's added p50 goes: recording, the controller's path, the gate, the backup."""
    request_ms = 1000 / ft["requests_per_s"]
    throttled_ms = ft["throttle_slept_share"] * request_ms
    gate_ms = ft["gate_hold_ms_p50"]
    backup_ms = ft["p50_ms"] - alone["p50_ms"] - gate_ms - throttled_ms
    cpu = ", ".join(f"{name} {share:.2f}" for name, share in ft["cpu_share"].items())
    return [
        "Where FT's added INC p50 goes (ms per increment; medians, so they add up only roughly):",
        "", "| part | ms |", "|---|---|",
        f"| recording (record-net - plain-net) | {record['p50_ms'] - plain['p50_ms']:.2f} |",
        "| the primary's path without a backup: NIC through the controller, filter-replay, "
        f"log into the controller, throttle plugin (ft-alone - record-net) "
        f"| {alone['p50_ms'] - record['p50_ms']:.2f} |",
        f"| output gate: reply held, p50 (stamp {ft['gate_stamp_ms_p50']:.2f} ms of it; "
        f"the backup's ACK delay p50 {ft['ack_delay_ms_p50']:.2f} ms) | {gate_ms:.2f} |",
        f"| lag control: primary's vCPU made to sleep {100 * ft['throttle_slept_share']:.1f} % of "
        f"the load (lag p50 {ft['lag_ms_p50']:.0f} ms, share mean {ft['throttle_share_mean']:.2f}) "
        f"| {throttled_ms:.2f} |",
        f"| the rest (ft - ft-alone - gate - lag control): the backup running beside the "
        f"primary on 2 cores | {backup_ms:.2f} |",
        "", f"CPU use during the FT load (cores): {cpu}.",
        "", "The counter service is CPU-bound in the guest (an increment runs five busybox "
        "applets), so "
        "QEMU's CPU time per request sets the pace: "
        f"{plain['qemu_cpu_ms_per_request']:.1f} ms plain, "
        f"{record['qemu_cpu_ms_per_request']:.1f} ms recording, "
        f"{ft['qemu_cpu_ms_per_request']:.1f} ms as FT's primary "
        f"({alone['qemu_cpu_ms_per_request']:.1f} ms once alone)."]


def _median_of(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's rounds as one result: each number's median, each flag all true."""
    merged: dict[str, Any] = {}
    for key, first in results[0].items():
        values = [r[key] for r in results]
        if isinstance(first, bool):
            merged[key] = all(values)
        elif isinstance(first, dict):
            merged[key] = _median_of(values)
        else:
            merged[key] = statistics.median(values)
    return merged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--pages", type=int, default=50)
    default_flush_us = from_dict({}).primary.log_flush_us  # what the FT primary runs with
    parser.add_argument("--log-flush-us", type=int, default=default_flush_us,
                        metavar="US", help="how often record-net and the FT primary push their "
                        "log out (primary.log_flush_us; default: the configuration's, %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, metavar="N",
                        help="run every mode N times, in turn, and report each figure's median "
                        "(single runs on this machine differ by up to 20 ms; default %(default)s)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    image = locate()
    flush_us = args.log_flush_us
    rounds: list[dict[str, dict[str, Any]]] = []
    for n in range(args.rounds):
        one: dict[str, dict[str, Any]] = {}
        with tempfile.TemporaryDirectory(prefix="vmft-bench-lat-") as tmp:
            for mode, role, flush in (("plain_net", Role.ICOUNT, 0),
                                      ("record_bare", Role.RECORD, 0),
                                      ("record_net", Role.RECORD, flush_us)):
                one[mode] = run_alone(image, role, args.requests, args.pages,
                                      Path(tmp) / mode, flush)
                print(f"round {n + 1}/{args.rounds} {mode}: {one[mode]}", flush=True)
            for replay_apart in (False, True):
                ran = run_ft(args.requests, args.pages, Path(tmp) / f"ft{int(replay_apart)}",
                             flush_us, replay_apart)
                for mode, result in ran.items():
                    print(f"round {n + 1}/{args.rounds} {mode}: {result}", flush=True)
                one.update(ran)
        rounds.append(one)
    runs = {mode: _median_of([one[mode] for one in rounds]) for mode in rounds[0]}
    plain, record, ft = runs["plain_net"], runs["record_net"], runs["ft"]
    added = ft["p50_ms"] - plain["p50_ms"]
    added_rec = ft["p50_ms"] - record["p50_ms"]
    ratio = ft["requests_per_s"] / plain["requests_per_s"]
    ratio_rec = ft["requests_per_s"] / record["requests_per_s"]
    added_read = ft["read_p50_ms"] - plain["read_p50_ms"]
    read_ratio = ft["reads_per_s_together"] / plain["reads_per_s_together"]
    apart = runs["ft_replay_apart"]
    # The output rule with the replay on a CPU of its own, against plain-net.
    two_hosts = {"added_p50_ms": apart["p50_ms"] - plain["p50_ms"],
                 "throughput_ratio": apart["requests_per_s"] / plain["requests_per_s"],
                 "added_read_p50_ms": apart["read_p50_ms"] - plain["read_p50_ms"],
                 "read_throughput_ratio": apart["reads_per_s_together"]
                 / plain["reads_per_s_together"]}
    report = {
        "benchmark": "latency", "requests": args.requests, "pages": args.pages,
        "log_flush_us": flush_us, "rounds": len(rounds), **runs,
        "p50_ms_by_round": {mode: [one[mode]["p50_ms"] for one in rounds] for mode in runs},
        "added_p50_ms": added, "added_p50_ms_over_record": added_rec,
        "throughput_ratio": ratio, "throughput_ratio_over_record": ratio_rec,
        "added_read_p50_ms": added_read, "read_throughput_ratio": read_ratio,
        "page_rate_ratio": ft["pages_per_s"] / plain["pages_per_s"],
        "replay_apart": two_hosts,
        "targets": {"added_p50_ms <= 5": added <= 5, "throughput_ratio >= 0.8": ratio >= 0.8,
                    "added_p50_ms_over_record <= 5": added_rec <= 5,
                    "throughput_ratio_over_record >= 0.8": ratio_rec >= 0.8,
                    "added_read_p50_ms <= 5": added_read <= 5,
                    "read_throughput_ratio >= 0.8": read_ratio >= 0.8},
    }
    md = [f"# Output rule cost: {args.requests} counter increments, {args.requests} counter "
          f"reads, {args.pages} pages of 5 KiB", "",
          f"Each figure is the median of {len(rounds)} rounds (every mode once per round, in "
          "turn); p50 ms by round: " + "; ".join(
              f"{mode} {', '.join(f'{p:.1f}' for p in report['p50_ms_by_round'][mode])}"
              for mode in runs) + ".", "",
          "| mode | INC p50 ms | INC p99 ms | INC/s | GET p50 ms | GET p99 ms | GET/s "
          f"| GET/s, {READERS} clients | pages/s | log KiB/s | QEMU CPU ms/INC |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in (("plain-net (icount, no FT)", plain),
                    ("record-bare (rr=record as QEMU ships it, no FT)", runs["record_bare"]),
                    (f"record-net (rr=record + logflush: inputs at once, log every {flush_us} us; "
                     "no FT)", record),
                    ("ft", ft),
                    ("ft-alone (the FT primary after its backup is gone: gate open)",
                     runs["ft_alone"]),
                    ("ft-replay-apart (ft with the backup's QEMU stopped during the load: log "
                     "received and acknowledged, replayed after; lag control off)", apart)):
        log_rate = f"{r['log_bytes_per_s'] / 1024:.1f}" if "log_bytes_per_s" in r else "-"
        md.append(f"| {name} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['requests_per_s']:.1f} "
                  f"| {r['read_p50_ms']:.2f} | {r['read_p99_ms']:.2f} | {r['reads_per_s']:.0f} "
                  f"| {r['reads_per_s_together']:.0f} "
                  f"| {r['pages_per_s']:.1f} | {log_rate} | {r['qemu_cpu_ms_per_request']:.1f} |")
    md += ["", f"Increments (INC), added p50 latency: {added:.2f} ms over plain-net, "
               f"{added_rec:.2f} ms over record-net (target <= 5). Throughput FT / plain-net "
               f"{ratio:.2f}, FT / record-net {ratio_rec:.2f} (target >= 0.80).",
           "", f"Reads (GET), which cost the guest almost nothing, so what is left is FT's "
               f"path (recording, the controllers, the gate): added p50 latency "
               f"{added_read:.2f} ms over plain-net (target <= 5); throughput with {READERS} "
               f"clients at once, FT / plain-net {read_ratio:.2f} (target >= 0.80; with one "
               f"client, one request at a time, it is 1 / latency: "
               f"{ft['reads_per_s'] / plain['reads_per_s']:.2f}).",
           "", f"With the backup's replay on a CPU of its own (ft-replay-apart), against "
               f"plain-net: INC added p50 {two_hosts['added_p50_ms']:.2f} ms, throughput "
               f"{two_hosts['throughput_ratio']:.2f}; GET added p50 "
               f"{two_hosts['added_read_p50_ms']:.2f} ms, throughput with {READERS} clients "
               f"{two_hosts['read_throughput_ratio']:.2f}.  Afterwards the replay, now running, "
               f"took {apart['catch_up_s']:.1f} s for the load's {apart['load_s']:.1f} s (its "
               f"console a prefix of the primary's: {apart['backup_console_is_prefix']}): a "
               "backup on a host no faster than the primary's falls behind under a load that "
               "keeps the guest busy, and lag control then slows the primary to its pace.",
           "", f"Gate, p50: stamped {ft['gate_stamp_ms_p50']:.2f} ms and released "
               f"{ft['gate_hold_ms_p50']:.2f} ms after a frame reached the primary's controller."]
    md += ["", *_breakdown(plain, record, ft, runs["ft_alone"])]
    report_file.write("latency" if flush_us == default_flush_us else f"latency-logflush-{flush_us}us",
                      report, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
