"""Status of a controller: a JSON snapshot on a unix socket, and its rendering.

A backup QEMU that waits for log bytes does not answer QMP (qemu-rr-facts.md),
so positions come from the controllers' own log readers: each controller
serves its view at `RUN_DIR/status.sock`, and `vmft status` reads and shows it.
"""

from __future__ import annotations

import asyncio
import collections
import json
import socket
import time
from pathlib import Path
from typing import Any, Callable

SOCKET_NAME = "status.sock"


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


async def serve(path: Path, snapshot: Callable[[], dict[str, Any]]) -> asyncio.Server:
    """Answer every connection on `path` with one JSON snapshot."""
    path.unlink(missing_ok=True)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(json.dumps(snapshot(), default=str).encode() + b"\n")
        await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(answer, str(path))


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
    lines = [f"{status.get('vm', '?')} {role}: {status.get('state', '?')}"
             f"  (qemu pid {status.get('qemu_pid', '-')})"]
    if role == "primary":
        lines += [
            f"  primary icount   {_num(status['recorded']['icount'])}",
            f"  backup icount    {_num(status['backup_replayed']['icount'])} replayed, "
            f"{_num(status['acked']['icount'])} acknowledged",
            f"  lag              {_num(status['lag_insns'])} instructions = "
            f"{_num(status['lag_ms'], ' ms')} of guest time",
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
