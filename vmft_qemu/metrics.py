"""Metrics: what the FT pair costs and how close the backup is, as numbers.

One source of truth: a controller's `snapshot()` (the same view `vmft status`
shows).  Each controller publishes it three ways (`publish`):

- on its status socket (`status.serve`), for `vmft status`;
- as a Prometheus text endpoint, `http://HOST:PORT/metrics` with
  `[primary] metrics_port` / `[backup] metrics_port` (0: off), turned into
  metrics at scrape time by `SnapshotCollector`;
- as samples over time, one JSON line every `SAMPLE_PERIOD_S` in
  `RUN_DIR/metrics.jsonl`, which `vmft report` plots.

Metric names follow Prometheus' conventions (base units: seconds, bytes);
every metric carries the labels `vm` and `role`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import status
from .events import CappedJsonLines

log = logging.getLogger(__name__)

SAMPLE_PERIOD_S = 0.5
SAMPLES_NAME = "metrics.jsonl"
# The samples before, once SAMPLES_NAME was full.
OLDER_SAMPLES_NAME = CappedJsonLines.older_name(SAMPLES_NAME)
SAMPLES_MAX_BYTES = 32 << 20  # ~1 KiB a sample: 4 to 8 hours kept, in two files
UNSAMPLED = ("errors",)  # in the status, not worth repeating twice a second

Snapshot = Callable[[], dict[str, Any]]


def _at(*path: str, scale: float = 1.0) -> Callable[[dict[str, Any]], float | None]:
    """The snapshot's value at `path` (times `scale`), or None where it has none."""
    def get(snap: dict[str, Any]) -> float | None:
        value: Any = snap
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return None if value is None else float(value) * scale
    return get


# (name, counter or not, help, value): what each role's snapshot becomes.
COMMON = [
    ("vmft_connected", False, "1 while the log channel is up", _at("connected")),
    ("vmft_heartbeat_age_seconds", False, "time since the partner was last heard (heartbeat "
     "or log frame)", _at("partner", "last_heard_ms", scale=1e-3)),
    ("vmft_heartbeats_received", True, "UDP heartbeats from the partner",
     _at("partner", "heartbeats_in")),
]
PRIMARY = [
    ("vmft_icount", False, "instructions the guest has executed (recorded)",
     _at("recorded", "icount")),
    ("vmft_log_bytes", True, "replay log recorded", _at("recorded", "offset")),
    ("vmft_log_bytes_per_second", False, "replay log rate over the last seconds",
     _at("log_bytes_per_s")),
    ("vmft_lag_instructions", False, "instructions recorded, not yet replayed",
     _at("lag_insns")),
    ("vmft_lag_seconds", False, "how far the backup's replay is behind, in the primary's "
     "running time", _at("lag_ms", scale=1e-3)),
    ("vmft_ack_delay_seconds", False, "LOG frame sent -> its ACK",
     _at("ack_delay_ms", scale=1e-3)),
    ("vmft_retained_log_bytes", False, "log the backup has not acknowledged",
     _at("retained_bytes")),
    ("vmft_throttle_share", False, "share of the time lag control slows the primary (0..1)",
     _at("throttle_share")),
    ("vmft_alone", False, "1 when running without a backup", _at("alone")),
    ("vmft_gate_held_frames", False, "guest frames waiting for an ACK", _at("gate", "held")),
    ("vmft_gate_released_frames", True, "guest frames released to the LAN",
     _at("gate", "released")),
]
BACKUP = [
    ("vmft_icount", False, "instructions replayed (to within QEMU's read-ahead)",
     _at("replayed", "icount")),
    ("vmft_log_bytes", True, "replay log received", _at("received", "offset")),
    ("vmft_backlog_bytes", False, "log received, not yet replayed", _at("backlog_bytes")),
    ("vmft_refused_frames", True, "damaged or out-of-order LOG frames refused",
     _at("refused_frames")),
    ("vmft_compared_frames", True, "guest frames checked against the primary's",
     _at("divergence", "compared")),
    ("vmft_divergences", True, "frames the replay produced differently",
     _at("divergence", "divergences")),
]


class SnapshotCollector:
    """Prometheus metrics from one controller's snapshot, taken at scrape time."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        names, values = ["vm", "role"], [snap["vm"], snap["role"]]
        state = GaugeMetricFamily("vmft_state", "the controller's state (value 1)",
                                  labels=[*names, "state"])
        state.add_metric([*values, snap["state"]], 1)
        yield state
        for name, counter, doc, get in COMMON + (PRIMARY if snap["role"] == "primary"
                                                  else BACKUP):
            value = get(snap)
            if value is not None:  # e.g. no ACK yet: no sample rather than a made-up one
                family = (CounterMetricFamily if counter else GaugeMetricFamily)(
                    name, doc, labels=names)
                family.add_metric(values, value)
                yield family
        hold = (snap.get("gate") or {}).get("hold_ms")
        if hold:
            h = HistogramMetricFamily("vmft_gate_hold_seconds",
                                      "guest frame reached the gate -> released", labels=names)
            buckets = [(repr(le / 1000), n) for le, n in zip(hold["le"], hold["counts"])]
            h.add_metric(values, buckets + [("+Inf", hold["counts"][-1])],
                         sum_value=hold["sum"] / 1000)
            yield h


def exposition(snapshot: Snapshot) -> bytes:
    """The Prometheus text format of the snapshot now."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))  # type: ignore[arg-type]
    return generate_latest(registry)


async def serve(port: int, snapshot: Snapshot, host: str = "0.0.0.0") -> asyncio.Server:
    """HTTP on `port`: GET /metrics answers the exposition.  In the controller's
    event loop, so the snapshot is taken between two steps of the controller."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, path = (request.split(b" ", 2) + [b""])[:2]
            if method == b"GET" and path.split(b"?")[0] in (b"/metrics", b"/"):
                head, body = f"200 OK\r\nContent-Type: {CONTENT_TYPE_LATEST}", exposition(snapshot)
            else:
                head, body = "404 Not Found\r\nContent-Type: text/plain", b"try /metrics\n"
            writer.write(f"HTTP/1.1 {head}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(answer, host, port)


async def record(run_dir: Path, snapshot: Snapshot,
                 on_sample: Callable[[dict[str, Any]], None] | None = None,
                 max_bytes: int = SAMPLES_MAX_BYTES) -> None:
    """Append a sample of the snapshot to RUN_DIR/metrics.jsonl every
    SAMPLE_PERIOD_S, forever (capped: the older samples in metrics.1.jsonl)."""
    out = CappedJsonLines(run_dir / SAMPLES_NAME, max_bytes)
    try:
        while True:
            snap = snapshot()
            if on_sample is not None:
                on_sample(snap)
            out.write({"time": round(time.time(), 3),
                       **{k: v for k, v in snap.items() if k not in UNSAMPLED}})
            await asyncio.sleep(SAMPLE_PERIOD_S)
    finally:
        out.close()


@dataclass
class Publication:
    """A controller's snapshot on its status socket, metrics endpoint and samples."""

    servers: list[asyncio.Server]
    recorder: asyncio.Task[None]

    def close(self) -> None:
        for server in self.servers:
            server.close()
        self.recorder.cancel()


async def publish(run_dir: Path, metrics_port: int, snapshot: Snapshot,
                  on_sample: Callable[[dict[str, Any]], None] | None = None) -> Publication:
    servers = [await status.serve(run_dir / status.SOCKET_NAME, snapshot)]
    if metrics_port:
        servers.append(await serve(metrics_port, snapshot))
    recorder = asyncio.create_task(record(run_dir, snapshot, on_sample),
                                   name="metrics samples")

    def stopped(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("metrics samples stopped: %r", task.exception())

    recorder.add_done_callback(stopped)
    return Publication(servers, recorder)
