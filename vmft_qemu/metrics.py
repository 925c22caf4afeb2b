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
import json
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

log = logging.getLogger(__name__)

SAMPLE_PERIOD_S = 0.5
SAMPLES_NAME = "metrics.jsonl"
UNSAMPLED = ("errors",)  # in the status, not worth repeating twice a second

Snapshot = Callable[[], dict[str, Any]]


def _ms(v: float | None) -> float | None:
    return None if v is None else v / 1000


class SnapshotCollector:
    """Prometheus metrics from one controller's snapshot, taken at scrape time."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        labels = {"vm": snap["vm"], "role": snap["role"]}

        def gauge(name: str, doc: str, value: float | None, **extra: str) -> Iterator[Metric]:
            if value is not None:
                g = GaugeMetricFamily(name, doc, labels=[*labels, *extra])
                g.add_metric([*labels.values(), *extra.values()], float(value))
                yield g

        def counter(name: str, doc: str, value: float) -> Iterator[Metric]:
            c = CounterMetricFamily(name, doc, labels=list(labels))
            c.add_metric(list(labels.values()), float(value))
            yield c

        yield from gauge("vmft_state", "the controller's state (value 1)", 1, state=snap["state"])
        yield from gauge("vmft_connected", "1 while the log channel is up", snap["connected"])
        partner = snap.get("partner")
        if partner:
            yield from gauge("vmft_heartbeat_age_seconds",
                             "time since the partner was last heard (heartbeat or log frame)",
                             partner["last_heard_ms"] / 1000)
            yield from counter("vmft_heartbeats_received", "UDP heartbeats from the partner",
                               partner["heartbeats_in"])
        if snap["role"] == "primary":
            yield from self._primary(snap, gauge, counter)
        else:
            yield from self._backup(snap, gauge, counter)

    @staticmethod
    def _primary(snap: dict[str, Any], gauge: Any, counter: Any) -> Iterator[Metric]:
        yield from gauge("vmft_icount", "instructions the guest has executed (recorded)",
                         snap["recorded"]["icount"])
        yield from counter("vmft_log_bytes", "replay log recorded", snap["recorded"]["offset"])
        yield from gauge("vmft_log_bytes_per_second", "replay log rate over the last seconds",
                         snap["log_bytes_per_s"])
        yield from gauge("vmft_lag_instructions", "instructions recorded, not yet replayed",
                         snap["lag_insns"])
        yield from gauge("vmft_lag_seconds", "how far the backup's replay is behind, in the "
                         "primary's guest clock", snap["lag_ms"] / 1000)
        yield from gauge("vmft_ack_delay_seconds", "LOG frame sent -> its ACK",
                         _ms(snap["ack_delay_ms"]))
        yield from gauge("vmft_retained_log_bytes", "log the backup has not acknowledged",
                         snap["retained_bytes"])
        yield from gauge("vmft_throttle_share", "share of the time lag control slows the "
                         "primary (0..1)", snap["throttle_share"])
        yield from gauge("vmft_alone", "1 when running without a backup", snap["alone"])
        gate = snap.get("gate")
        if gate:
            yield from gauge("vmft_gate_held_frames", "guest frames waiting for an ACK",
                             gate["held"])
            yield from counter("vmft_gate_released_frames", "guest frames released to the LAN",
                               gate["released"])
            hold = gate["hold_ms"]
            h = HistogramMetricFamily("vmft_gate_hold_seconds",
                                      "guest frame reached the gate -> released",
                                      labels=["vm", "role"])
            buckets = [(repr(le / 1000), n) for le, n in zip(hold["le"], hold["counts"])]
            h.add_metric([snap["vm"], snap["role"]], buckets + [("+Inf", hold["counts"][-1])],
                         sum_value=hold["sum"] / 1000)
            yield h

    @staticmethod
    def _backup(snap: dict[str, Any], gauge: Any, counter: Any) -> Iterator[Metric]:
        yield from gauge("vmft_icount", "instructions replayed (to within QEMU's read-ahead)",
                         snap["replayed"]["icount"])
        yield from counter("vmft_log_bytes", "replay log received", snap["received"]["offset"])
        yield from gauge("vmft_backlog_bytes", "log received, not yet replayed",
                         snap["backlog_bytes"])
        yield from counter("vmft_refused_frames", "damaged or out-of-order LOG frames refused",
                           snap["refused_frames"])
        yield from counter("vmft_compared_frames", "guest frames checked against the primary's",
                           snap["divergence"]["compared"])
        yield from counter("vmft_divergences", "frames the replay produced differently",
                           snap["divergence"]["divergences"])


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


async def record(path: Path, snapshot: Snapshot,
                 on_sample: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Append a sample of the snapshot to `path` every SAMPLE_PERIOD_S, forever."""
    with open(path, "a", buffering=1) as out:
        while True:
            snap = snapshot()
            if on_sample is not None:
                on_sample(snap)
            sample = {"time": round(time.time(), 3),
                      **{k: v for k, v in snap.items() if k not in UNSAMPLED}}
            out.write(json.dumps(sample, default=str) + "\n")
            await asyncio.sleep(SAMPLE_PERIOD_S)


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
    recorder = asyncio.create_task(record(run_dir / SAMPLES_NAME, snapshot, on_sample),
                                   name="metrics samples")

    def stopped(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("metrics samples stopped: %r", task.exception())

    recorder.add_done_callback(stopped)
    return Publication(servers, recorder)
