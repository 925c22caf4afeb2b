"""`vmft demo`: a real guest under FT on two netns hosts, with a client.

Builds a small network (a LAN bridge, two FT hosts, a client, each a network
namespace), starts the backup on host b and the primary on host a, and shows
both sides every second while a client on the LAN increments the guest's
counter through the output gate.  Then it shuts the primary down cleanly, lets
the backup replay the shutdown, and reports whether the consoles are identical
and every answer the client saw was right.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from .images import locate
from .pair import LocalPair, wait_for
from .topology import GUEST_IP, Topology


def _status_line(elapsed: float, p: dict[str, Any], b: dict[str, Any]) -> str:
    if not p:
        return f"[{elapsed:5.1f}s] starting ..."
    ack, gate = p.get("ack_delay_ms"), p.get("gate") or {}
    return (f"[{elapsed:5.1f}s] icount primary {p['recorded']['icount']:>14,} "
            f"backup {b.get('replayed', {}).get('icount', 0):>14,}  "
            f"lag {p['lag_ms']:6.0f} ms  log {p['log_bytes_per_s'] / 1024:6.1f} KiB/s  "
            f"ACK {f'{ack:.1f} ms' if ack is not None else '-':>8}  "
            f"gate held {gate.get('held', 0)} released {gate.get('released', 0)}")


def _client_round(topo: Topology, count: int) -> dict[str, Any]:
    done = topo.client.run([sys.executable, "-m", "vmft_qemu.client", "counter",
                            "--host", GUEST_IP, "--count", str(count), "--timeout", "20"],
                           capture_output=True, text=True, timeout=60)
    return json.loads(done.stdout)


def run_demo(seconds: float, workdir: Path) -> int:
    image = locate()
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"vmft demo: Debian kernel {image.kernel.name} + busybox guest; files in {workdir}")
    answers: list[int] = []
    latencies: list[float] = []
    errors: list[str] = []
    with Topology() as topo:
        pair = LocalPair(workdir, name="demo", network=topo)
        print(f"hosts: primary on {topo.hosts['a'].name}, backup on {topo.hosts['b'].name}, "
              f"client {topo.client.name} ({topo.client.ip}); guest {GUEST_IP}")
        try:
            pair.start_both()
            print("booting the guest under record (primary) and replay (backup) ...")
            wait_for(lambda: f"VMFT-NET-UP {GUEST_IP}" in pair.console("primary"), 180,
                     "the guest's network")
            start = time.monotonic()
            while (elapsed := time.monotonic() - start) < seconds:
                round_ = _client_round(topo, 5)
                answers += round_["answers"]
                latencies += round_["latency_ms"]
                if round_["error"]:
                    errors.append(round_["error"])
                print(_status_line(elapsed, pair.status("primary"), pair.status("backup")))
                print(f"          client: INC x5 -> {round_['answers']}  "
                      f"latency {statistics.median(round_['latency_ms'] or [0]):.1f} ms")
                for role in ("primary", "backup"):
                    pair.alive(role)
            print("shutting the primary's guest down (SIGTERM: QEMU logs the shutdown) ...")
            codes = pair.shutdown()
        finally:
            pair.stop()
    primary, backup = pair.console("primary"), pair.console("backup")
    same = primary == backup
    right = answers == list(range(1, len(answers) + 1))
    print("\n=== vmft demo report ===")
    print(f"controllers exited:   primary {codes['primary']}, backup {codes['backup']}")
    print(f"consoles identical:   {'YES' if same else 'NO'} ({len(primary)} lines)")
    print(f"client answers:       {len(answers)} increments acknowledged, "
          f"{'all right' if right else 'WRONG'}{'; errors: ' + '; '.join(errors) if errors else ''}")
    if latencies:
        print(f"request latency:      p50 {statistics.median(latencies):.1f} ms, "
              f"max {max(latencies):.1f} ms (each reply waited for the backup's ACK)")
    return 0 if same and right and not errors and codes == {"primary": 0, "backup": 0} else 1
