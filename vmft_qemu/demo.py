"""`vmft demo`: a real guest under FT, its primary's host killed, the backup taking over.

Builds a small network (a LAN bridge, two FT hosts, a client, each a network
namespace), starts the backup on host b and the primary on host a, and shows
both sides while a client on the LAN increments the guest's counter through
the output gate.  Then it pulls the plug on host a (links down, every process
SIGKILLed), shows the backup detect it, win the go-live lock, stop its replay
at the end of the log and run the guest on, and reports whether the client's
acknowledged increments all survived, how long the guest was gone from the
LAN, and whether the backup's console carried on the primary's.  It ends by
writing `vmft report` of the run (plots and a summary) and printing where.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from .images import locate
from .lan_watch import LanWatch
from .pair import LocalPair, lan_with_storage, pull_the_plug
from .report import write_report
from .topology import GUEST_IP, GUEST_MAC, STORAGE_IP
from .waiting import wait_for

AFTER_KILL_S = 15  # how long the client goes on after the kill
TAKEOVER_EVENTS = ("partner-failed", "go-live-lock", "going-live", "replay-frozen-and-saved",
                   "recording")


def _status_line(elapsed: float, p: dict[str, Any], b: dict[str, Any]) -> str:
    if not p:
        return f"[{elapsed:5.1f}s] starting ..."
    ack, gate = p.get("ack_delay_ms"), p.get("gate") or {}
    return (f"[{elapsed:5.1f}s] icount primary {p['recorded']['icount']:>14,} "
            f"backup {b.get('replayed', {}).get('icount', 0):>14,}  "
            f"lag {p['lag_ms']:6.0f} ms  log {p['log_bytes_per_s'] / 1024:6.1f} KiB/s  "
            f"ACK {f'{ack:.1f} ms' if ack is not None else '-':>8}  "
            f"gate held {gate.get('held', 0)} released {gate.get('released', 0)}")


def _timeline(pair: LocalPair, killed_wall: float) -> list[str]:
    lines = []
    for event in pair.events("backup"):
        if event["event"] in TAKEOVER_EVENTS and event["time"] >= killed_wall:
            detail = {k: v for k, v in event.items()
                      if k in ("reason", "won", "icount", "consume_s", "save_s", "resumed")}
            lines.append(f"  +{(event['time'] - killed_wall) * 1000:6.0f} ms  {event['event']:<24} "
                         f"{json.dumps(detail)}")
    return lines


def run_demo(seconds: float, workdir: Path) -> int:
    image = locate()
    logging.getLogger("vmft_qemu.topology").setLevel(logging.WARNING)  # the demo shows its own
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"vmft demo: Debian kernel {image.kernel.name} + busybox guest; files in {workdir}")
    with lan_with_storage(workdir) as (topo, nfs):
        pair = LocalPair(workdir / "pair", name="demo", network=topo, nfs=nfs)
        watch = LanWatch(topo.lan, topo.hosts["b"].lan_port, GUEST_MAC)
        print(f"hosts: primary on {topo.hosts['a'].name}, backup on {topo.hosts['b'].name}, "
              f"client {topo.client.name} ({topo.client.ip}); guest {GUEST_IP}; "
              f"go-live lock on nfs-ganesha at {STORAGE_IP}:{nfs.pseudo} (NFSv4)")
        print(f"watch it: `vmft status --scan {workdir}`; the primary's metrics: "
              f"http://127.0.0.1:{pair.metrics_port['primary']}/metrics in netns "
              f"{topo.hosts['a'].name}")
        try:
            pair.start_both()
            print("booting the guest under record (primary) and replay (backup) ...")
            pair.wait_protected()
            client = pair.client("counter", "--count", "1000000", "--retries", "3",
                                 "--duration", str(seconds + AFTER_KILL_S))
            start = time.monotonic()
            while (elapsed := time.monotonic() - start) < seconds:
                print(_status_line(elapsed, pair.status("primary"), pair.status("backup")))
                for role in ("primary", "backup"):
                    pair.alive(role)
                time.sleep(1)  # the demo's display rate
            before = pair.console("primary")
            print(f"\n*** pulling the plug on host a ({topo.hosts['a'].name}): links down, "
                  "every process SIGKILLed ***")
            killed_wall = time.time()
            killed = pull_the_plug(topo.hosts["a"])
            live = wait_for(lambda: (s := pair.status("backup")).get("state") == "alone" and s,
                            60, "the backup to go live")
            first = wait_for(lambda: watch.first(killed, garp=False), 30,
                             "the guest's first frame from host b")
            print("takeover on host b:")
            print("\n".join(_timeline(pair, killed_wall)))
            print(f"  +{(first['t'] - killed) * 1000:6.0f} ms  first frame of the guest on the "
                  "LAN from host b")
            ticks = sum(line.startswith("tick ") for line in pair.console("backup"))
            wait_for(lambda: sum(line.startswith("tick ") for line in pair.console("backup"))
                     >= ticks + 3, 30, "the guest to keep ticking on host b")
            out, _ = client.communicate(timeout=AFTER_KILL_S + 120)
            result = json.loads(out)
            counted = pair.counted()
            after = pair.console("backup")
            lock = sorted(p.name for p in nfs.export_dir.iterdir())
            print("shutting the guest down on its new host ...")
            pair.procs["backup"].terminate()
            code = pair.procs["backup"].wait(60)
        finally:
            watch.close()
            pair.stop()
    answers = result["answers"]
    kept = bool(answers) and counted >= answers[-1] and answers == list(range(1, len(answers) + 1))
    # The backup replayed the primary's console up to its last safe point (the
    # primary's last line or two may have come later), then went on live.
    carried_on = after[: len(before) - 2] == before[:-2] and len(after) > len(before)
    gone_ms = (first["t"] - killed) * 1000
    print("\n=== vmft demo report ===")
    print(f"client:               {len(answers)} increments acknowledged, the last {answers[-1] if answers else '-'}; "
          f"counter afterwards {counted}: {'none lost' if kept else 'LOST WORK'}; "
          f"connection {'survived' if not result['reconnects'] else 'was re-made'}")
    if result["latency_ms"]:
        print(f"request latency:      p50 {statistics.median(result['latency_ms']):.1f} ms, "
              f"max {max(result['latency_ms']):.0f} ms (the max spans the takeover)")
    print(f"takeover:             guest back on the LAN {gone_ms:.0f} ms after the kill, "
          f"now {live['state']} on host b")
    print(f"console:              backup's console carries on the primary's: "
          f"{'YES' if carried_on else 'NO'} ({len(before)} lines before the kill, {len(after)} after)")
    print(f"go-live lock:         {', '.join(lock)} on the NFS share, created by the backup")
    print(f"new primary exited:   {code} after a clean guest shutdown")
    if result["error"]:
        print(f"client error:         {result['error']}")
    written = write_report(pair.root)
    print(f"report:               {written.markdown} (plots: {written.png})")
    return 0 if kept and carried_on and code == 0 and not result["error"] else 1
