"""Status of a controller: a JSON snapshot on a unix socket, and its rendering.

A backup QEMU that waits for log bytes does not answer QMP (qemu-rr-facts.md),
so positions come from the controllers' own log readers: each controller
serves its view (`snapshot()`) at `RUN_DIR/status.sock`, and `vmft status`
finds the sockets (`discover`), reads them (`gather`) and shows a table of
every controller (`table`) with the details of each (`render`).  The same
snapshot feeds the metrics endpoint and the recorded samples (`metrics`).
The table takes snapshots from anywhere: a cluster view gathers them from
several hosts (`vmft status --json` on each) and renders them here.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import json
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from rich.table import Table
from rich.text import Text

SOCKET_NAME = "status.sock"
RUN_ROOT = Path("/run/vmft")  # where run_dir lives unless the config says otherwise


class RateMeter:
    """Rate of a growing counter over the last `window` seconds."""

    def __init__(self, window: float = 2.0) -> None:
        self.window = window
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, value: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._samples.append((now, value))
        while len(self._samples) > 2 and now - self._samples[1][0] > self.window:
            self._samples.popleft()

    def rate(self) -> float:
        """Units per second; 0 until two samples are apart in time."""
        if len(self._samples) < 2:
            return 0.0
        (t0, v0), (t1, v1) = self._samples[0], self._samples[-1]
        return (v1 - v0) / (t1 - t0) if t1 > t0 else 0.0


class Histogram:
    """Counts of observed values at or below each bound, cumulative, as
    Prometheus keeps them; the last count is every observation."""

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = sorted(bounds)
        self._counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def add(self, value: float) -> None:
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def json(self) -> dict[str, Any]:
        cumulative, total = [], 0
        for n in self._counts:
            total += n
            cumulative.append(total)
        return {"le": self.bounds, "counts": cumulative, "sum": round(self.sum, 3)}


async def serve(path: Path, snapshot: Callable[[], dict[str, Any]]) -> asyncio.Server:
    """Answer every connection on `path` with one JSON snapshot."""
    path.unlink(missing_ok=True)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(json.dumps(snapshot(), default=str).encode() + b"\n")
        await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(answer, str(path))


def ask(path: Path, timeout: float = 2.0) -> dict[str, Any]:
    """`query`, or {} while the controller does not answer (starting, gone)."""
    try:
        return query(path, timeout)
    except (OSError, ValueError):
        return {}


def query(path: Path, timeout: float = 2.0) -> dict[str, Any]:
    """One controller's snapshot, read from its status socket."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def _num(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.1f}{unit}"
    return f"{v:,}{unit}"


def render(status: dict[str, Any]) -> str:
    """A few human lines for one controller's snapshot."""
    role = status.get("role", "?")
    if not answering(status):
        return f"{status.get('vm', '?')} {role}: {status.get('state')} ({status.get('error')})"
    lines = [f"{status.get('vm', '?')} {role}: {status.get('state', '?')}"
             f"  (qemu pid {status.get('qemu_pid', '-')})"]
    if role == "primary":
        lines += [
            f"  primary icount   {_num(status['recorded']['icount'])}",
            f"  backup icount    {_num(status['backup_replayed']['icount'])} replayed, "
            f"{_num(status['acked']['icount'])} acknowledged",
            f"  lag              {_num(status['lag_insns'])} instructions = "
            f"{_num(status['lag_ms'], ' ms')} of the primary's running time",
            f"  log              {_num(status['log_bytes_per_s'] / 1024, ' KiB/s')}, "
            f"{_num(status['recorded']['offset'])} bytes so far, "
            f"{_num(status['retained_bytes'])} not yet acknowledged",
            f"  ACK delay        {_num(status['ack_delay_ms'], ' ms')}",
            f"  lag control      {status['throttle_reason']}",
            f"  backup           {'connected' if status['connected'] else 'NOT connected'}",
        ]
    else:
        lines += [
            f"  received         {_num(status['received']['icount'])} instructions, "
            f"{_num(status['received']['offset'])} bytes",
            f"  replayed         {_num(status['replayed']['icount'])} instructions "
            f"(to within QEMU's 4 KiB read-ahead)",
            f"  backlog          {_num(status['backlog_bytes'])} bytes received, not yet replayed",
            f"  primary          {'connected' if status['connected'] else 'NOT connected'}",
        ]
    for err in status.get("errors", [])[-3:]:
        lines.append(f"  error            {err}")
    return "\n".join(lines)


# --- many controllers: find them, ask them, show them in one table -------------

def discover(run_dirs: Iterable[tuple[Path, dict[str, str]]] = (),
             root: Path = RUN_ROOT) -> list[tuple[Path, dict[str, str]]]:
    """The status sockets to ask, each with what is known of it beforehand.

    `run_dirs` (from configs: (run dir, {"vm": .., "role": ..})) are asked
    whether or not they answer; without them, every `status.sock` under
    `root` is (a controller's run dir, default /run/vmft/VM/ROLE)."""
    given = [(run_dir / SOCKET_NAME, hints) for run_dir, hints in run_dirs]
    if given:
        return given
    found = sorted(root.rglob(SOCKET_NAME)) if root.is_dir() else []
    return [(sock, {"role": sock.parent.name, "vm": sock.parent.parent.name}) for sock in found]


def gather(targets: Iterable[tuple[Path, dict[str, str]]]) -> list[dict[str, Any]]:
    """Every target's snapshot; one that does not answer is shown as such."""
    snapshots = []
    for sock, hints in targets:
        try:
            snap = query(sock)
        except (OSError, ValueError) as e:
            snap = {**hints, "state": "not answering", "error": f"{sock}: {e}"}
        snapshots.append({**snap, "socket": str(sock)})
    return snapshots


def answering(snapshot: dict[str, Any]) -> bool:
    return "controller_pid" in snapshot


STATE_STYLE = {"protected": "bold green", "alone": "bold cyan", "replaying": "green",
               "lagging": "bold yellow", "unprotected": "yellow", "starting": "yellow",
               "waiting-for-primary": "yellow", "going-live": "bold magenta",
               "standby": "yellow", "joining": "bold magenta",
               "shut-down": "dim", "shutting-down": "dim"}


def _ago(since: float | None) -> str:
    if not since:
        return "-"
    s = max(0.0, time.time() - since)
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.0f}h"


def _row(snap: dict[str, Any]) -> list[str | Text]:
    state = Text(snap.get("state", "?"), style=STATE_STYLE.get(snap.get("state", ""), "bold red"))
    if not answering(snap):
        return [snap.get("vm", "?"), snap.get("role", "?"), "-", state] + ["-"] * 9
    primary = snap["role"] == "primary"
    gate, partner = snap.get("gate") or {}, snap.get("partner") or {}
    icount = snap["recorded"]["icount"] if primary else snap["replayed"]["icount"]
    if not primary:
        lag = f"{snap['backlog_bytes'] / 1024:,.0f} KiB"  # received, not yet replayed
    else:
        lag = "-" if snap["alone"] else f"{snap['lag_ms']:,.0f} ms"
    return [
        snap["vm"], snap["role"], snap.get("host", "-"), state, _ago(snap.get("state_since")),
        f"{icount / 1e6:,.0f}", lag,
        _num(snap["log_bytes_per_s"] / 1024) if primary else "-",
        _num(snap.get("ack_delay_ms")) if primary else "-",
        f"{gate['held']}/{gate['released']}" if gate else "-",
        f"{gate['last_hold_ms']:.1f}" if gate else "-",
        f"{partner['last_heard_ms']:.0f}" if partner else "-",
        f"{snap['throttle_share']:.0%}" if primary else "-",
    ]


def table(snapshots: list[dict[str, Any]], title: str | None = None) -> Table:
    """One row per controller, from snapshots gathered here or anywhere else."""
    t = Table(title=title, title_justify="left", header_style="bold underline", box=None,
              pad_edge=False, padding=(0, 0, 0, 1), caption_justify="left",
              caption="Minsn: icount in millions; lag: the primary's, in its running time (a "
                      "backup: log received, not yet replayed); log: KiB/s; ACK: delay in ms; "
                      "gate: frames held/released, the last one's hold in ms; heard: ms since "
                      "the partner was; thr: share of time lag control slows the primary")
    for name in ("VM", "role", "host", "state", "for", "Minsn", "lag", "log", "ACK", "gate",
                 "hold", "heard", "thr"):
        t.add_column(name, justify="left" if name in ("VM", "role", "host", "state") else "right",
                     no_wrap=True)
    for snap in sorted(snapshots, key=lambda s: (s.get("vm", ""), s.get("role", ""))):
        t.add_row(*_row(snap))
    return t
