"""`vmft demo`: a real guest under FT on this machine, watched live.

Starts a backup and a primary controller (each a `vmft` process, as on two
hosts), shows both sides' status every second, then shuts the primary down
cleanly, lets the backup replay the shutdown, and reports whether the two
consoles are identical.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from .images import locate
from .pair import LocalPair


def _status_line(elapsed: float, p: dict[str, Any], b: dict[str, Any]) -> str:
    if not p:
        return f"[{elapsed:5.1f}s] starting ..."
    lag_ms, ack = p.get("lag_ms"), p.get("ack_delay_ms")
    return (f"[{elapsed:5.1f}s] primary icount {p['recorded']['icount']:>14,}  "
            f"backup {b.get('replayed', {}).get('icount', 0):>14,}  "
            f"lag {p['lag_insns']:>11,} insns{f' ({lag_ms:.0f} ms)' if lag_ms else ''}  "
            f"log {p['log_bytes_per_s'] / 1024:6.1f} KiB/s  "
            f"ACK {f'{ack:.1f} ms' if ack is not None else '-'}")


def _last(lines: list[str]) -> str:
    return lines[-1] if lines else ""


def run_demo(seconds: float, workdir: Path) -> int:
    image = locate()
    shutil.rmtree(workdir, ignore_errors=True)
    pair = LocalPair(workdir, name="demo")
    print(f"vmft demo: Debian kernel {image.kernel.name} + busybox guest; files in {workdir}")
    print("starting the backup (replay) and the primary (record) ...")
    start = time.monotonic()
    max_lag_ms, last = 0.0, {}
    try:
        pair.start_both()
        while (elapsed := time.monotonic() - start) < seconds:
            p, b = pair.status("primary"), pair.status("backup")
            last = p or last
            max_lag_ms = max(max_lag_ms, p.get("lag_ms") or 0.0)
            print(_status_line(elapsed, p, b))
            print(f"          primary console: {_last(pair.console('primary'))}")
            print(f"          backup  console: {_last(pair.console('backup'))}")
            for role in ("primary", "backup"):
                pair.alive(role)
            time.sleep(1)
        print("shutting the primary's guest down (SIGTERM: QEMU logs the shutdown) ...")
        codes = pair.shutdown()
    finally:
        pair.stop()
    primary, backup = pair.console("primary"), pair.console("backup")
    same = primary == backup
    print("\n=== vmft demo report ===")
    print(f"controllers exited:   primary {codes['primary']}, backup {codes['backup']}")
    print(f"console lines:        primary {len(primary)}, backup {len(backup)}")
    print(f"consoles identical:   {'YES' if same else 'NO'}")
    print(f"instructions:         {last.get('recorded', {}).get('icount', 0):,} recorded")
    print(f"replay log shipped:   {last.get('recorded', {}).get('offset', 0):,} bytes")
    print(f"largest lag seen:     {max_lag_ms:.0f} ms of guest time")
    return 0 if same and codes == {"primary": 0, "backup": 0} else 1
