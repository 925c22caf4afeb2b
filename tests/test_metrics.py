"""The event log's state changes, the metrics endpoint and `vmft status`, without QEMU.

The same checks against real running controllers are in test_ft_pair.py
(metrics endpoint, status) and test_failover.py (state changes of a failover).
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from vmft_qemu import config as cfg
from vmft_qemu import events, metrics, status
from vmft_qemu.images import GuestImage
from vmft_qemu.output_gate import HOLD_BOUNDS_MS
from vmft_qemu.pair import free_port
from vmft_qemu.primary import PrimaryController


def primary_snapshot(**changes: Any) -> dict[str, Any]:
    """A primary's status snapshot as `PrimaryController.snapshot()` makes it."""
    hold = status.Histogram(HOLD_BOUNDS_MS)
    for ms in (0.7, 2.5, 2.9, 40.0):
        hold.add(ms)
    snap = {
        "role": "primary", "vm": "vm1", "host": "a", "state": "protected",
        "state_since": 1000.0, "qemu_pid": 10, "controller_pid": 11,
        "recorded": {"offset": 5_000_000, "icount": 900_000_000},
        "acked": {"offset": 4_990_000, "icount": 899_000_000},
        "backup_replayed": {"offset": 4_900_000, "icount": 880_000_000},
        "lag_insns": 20_000_000, "lag_ms": 120.5, "lag_target_ms": 100,
        "icount_per_s": 1e8, "log_bytes_per_s": 40_960.0, "ack_delay_ms": 3.5,
        "retained_bytes": 10_000, "paused_retained_full": False,
        "throttle_share": 0.25, "throttle_reason": "lag 120 ms over target",
        "connected": True, "shutdown_cause": None, "alone": False,
        "partner": {"heartbeats_in": 42, "last_heard_ms": 12.0, "channel_up": True},
        "gate": {"held": 2, "released": 4, "last_hold_ms": 40.0, "max_hold_ms": 40.0,
                 "hold_ms": hold.json()},
        "errors": [],
    }
    return {**snap, **changes}


def backup_snapshot() -> dict[str, Any]:
    return {
        "role": "backup", "vm": "vm1", "host": "b", "state": "replaying", "state_since": 1000.0,
        "qemu_pid": 20, "controller_pid": 21,
        "received": {"offset": 4_990_000, "icount": 899_000_000},
        "replayed": {"offset": 4_900_000, "icount": 880_000_000}, "backlog_bytes": 90_000,
        "connected": True, "refused_frames": 1, "shutdown_cause": None,
        "divergence": {"compared": 7, "divergences": 0, "last": None, "backup_frames": 7},
        "partner": {"heartbeats_in": 40, "last_heard_ms": 30.0, "channel_up": True},
        "errors": ["refused: checksum"],
    }


def parse(text: str) -> dict[str, list[Any]]:
    """Metric families by name -> their samples (prometheus-client's own parser)."""
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(families: dict[str, list[Any]], sample: str, **labels: str) -> float:
    for family in families.values():
        for s in family:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(sample)


def states(events_: list[dict[str, Any]]) -> list[str]:
    """The states a controller went through, from its event log; each change
    must start where the one before it ended (one process may run two
    controllers one after the other: the backup, then the primary it became)."""
    changes = [e for e in events_ if e["event"] == "state-change"]
    for before, after in zip(changes, changes[1:]):
        assert after["from"] in (before["to"], None), (before, after)
        assert after["time"] >= before["time"] and after["reason"]
    return [e["to"] for e in changes]


def test_controller_state_changes_reach_the_event_log(tmp_path: Path) -> None:
    config = cfg.from_dict({"lag": {"target_ms": 100},
                            "primary": {"run_dir": str(tmp_path / "p")},
                            "backup": {"run_dir": str(tmp_path / "b")}})
    handler = events.to_jsonl(tmp_path / "events.jsonl", "vm1", "primary")
    try:
        fake = GuestImage(Path("/k"), Path("/i"), Path("/r"))
        controller = PrimaryController(config, fake)
        controller.set_state("protected", "backup connected")
        controller.set_state("protected", "no change: no event")
        # Lagging with hysteresis: in at over 2 x the target, out at 1.5 x.
        for lag in (150, 250, 180, 140, 260):
            controller._watch_lag({"lag_ms": lag})
    finally:
        logging.getLogger("vmft_qemu").removeHandler(handler)
        handler.close()
    changes = [e for e in events.read_jsonl(tmp_path / "events.jsonl")
               if e["event"] == "state-change"]
    assert [(e["from"], e["to"]) for e in changes] == [
        (None, "starting"), ("starting", "protected"), ("protected", "lagging"),
        ("lagging", "protected"), ("protected", "lagging")]
    assert [e.get("lag_ms") for e in changes[2:]] == [250, 140, 260]
    for e in changes:
        assert e["vm"] == "vm1" and e["host"] and e["time"] > 0
        assert e["icount"] == 0 and e["reason"] and e["controller"] == "primary"


def test_histogram_counts_are_cumulative() -> None:
    h = status.Histogram([1, 10])
    for v in (0.5, 1, 3, 30):
        h.add(v)
    assert h.json() == {"le": [1, 10], "counts": [2, 3, 4], "sum": 34.5}


def test_primary_metrics_parse_and_carry_the_snapshot() -> None:
    families = parse(metrics.exposition(primary_snapshot).decode())
    labels = {"vm": "vm1", "role": "primary"}
    assert value(families, "vmft_state", state="protected", **labels) == 1
    assert value(families, "vmft_lag_seconds", **labels) == pytest.approx(0.1205)
    assert value(families, "vmft_lag_instructions", **labels) == 20_000_000
    assert value(families, "vmft_log_bytes_per_second", **labels) == 40_960
    assert value(families, "vmft_log_bytes_total", **labels) == 5_000_000
    assert value(families, "vmft_ack_delay_seconds", **labels) == pytest.approx(0.0035)
    assert value(families, "vmft_gate_held_frames", **labels) == 2
    assert value(families, "vmft_gate_released_frames_total", **labels) == 4
    assert value(families, "vmft_heartbeat_age_seconds", **labels) == pytest.approx(0.012)
    assert value(families, "vmft_throttle_share", **labels) == 0.25
    # The hold-time histogram, in seconds: 0.7 ms <= 1 ms, 2.5 and 2.9 ms <= 5 ms, 40 <= 50.
    assert value(families, "vmft_gate_hold_seconds_bucket", le="0.001") == 1
    assert value(families, "vmft_gate_hold_seconds_bucket", le="0.005") == 3
    assert value(families, "vmft_gate_hold_seconds_bucket", le="+Inf") == 4
    assert value(families, "vmft_gate_hold_seconds_count") == 4
    assert value(families, "vmft_gate_hold_seconds_sum") == pytest.approx(0.0461)
    # No ACK yet: no ACK-delay sample rather than a made-up value.
    assert "vmft_ack_delay_seconds" not in parse(
        metrics.exposition(lambda: primary_snapshot(ack_delay_ms=None)).decode())


def test_backup_metrics() -> None:
    families = parse(metrics.exposition(backup_snapshot).decode())
    assert value(families, "vmft_icount", role="backup") == 880_000_000
    assert value(families, "vmft_backlog_bytes") == 90_000
    assert value(families, "vmft_refused_frames_total") == 1
    assert value(families, "vmft_divergences_total") == 0
    assert value(families, "vmft_heartbeat_age_seconds") == pytest.approx(0.03)


def test_metrics_endpoint_over_http(tmp_path: Path) -> None:
    port = free_port()

    async def scrape() -> tuple[str, int]:
        published = await metrics.publish(tmp_path, port, primary_snapshot)
        try:
            def get(path: str) -> tuple[str, int]:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                        return r.read().decode(), r.status
                except urllib.error.HTTPError as e:
                    return "", e.code
            text, code = await asyncio.to_thread(get, "/metrics")
            assert (await asyncio.to_thread(get, "/nothing"))[1] == 404
            # The status socket answers the same snapshot.
            assert (await asyncio.to_thread(status.query, tmp_path / status.SOCKET_NAME)) \
                == json.loads(json.dumps(primary_snapshot()))
            return text, code
        finally:
            published.close()

    text, code = asyncio.run(scrape())
    assert code == 200
    assert value(parse(text), "vmft_lag_seconds") == pytest.approx(0.1205)
    # The recorder took its first sample at once, without the errors list.
    sample = events.read_jsonl(tmp_path / metrics.SAMPLES_NAME)[0]
    assert sample["lag_ms"] == 120.5 and "errors" not in sample and sample["time"] > 0


@pytest.mark.parametrize("port", [-1, 65536, "9100", True])
def test_metrics_port_is_checked(port: Any) -> None:
    with pytest.raises(cfg.ConfigError, match=r"primary\.metrics_port"):
        cfg.from_dict({"primary": {"metrics_port": port}})
    assert cfg.from_dict({}).primary.metrics_port == 0  # off unless asked for
    assert cfg.from_dict({"backup": {"metrics_port": 9101}}).backup.metrics_port == 9101


def test_status_table_shows_every_controller_and_who_does_not_answer() -> None:
    console = Console(record=True, width=200)
    gone = {"vm": "vm2", "role": "primary", "state": "not answering", "error": "refused"}
    console.print(status.table([primary_snapshot(), backup_snapshot(), gone]))
    text = console.export_text()
    for shown in ("protected", "120 ms", "40.0", "3.5", "2/4", "12", "25%", "replaying",
                  "88 KiB", "not answering"):
        assert shown in text, (shown, text)
    assert status.render(gone) == "vm2 primary: not answering (refused)"


def test_status_command_without_controllers_says_so(tmp_path: Path) -> None:
    shown = subprocess.run([sys.executable, "-m", "vmft_qemu", "status", "--scan", str(tmp_path)],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 1
    assert "0 controller(s)" in shown.stdout and "none found" in shown.stdout
    as_json = subprocess.run([sys.executable, "-m", "vmft_qemu", "status", "--json", "--scan",
                              str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert json.loads(as_json.stdout) == []


def test_samples_are_bounded_in_two_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "SAMPLE_PERIOD_S", 0)
    taken = []

    def sampled(snap: dict[str, Any]) -> None:
        taken.append(snap)
        if len(taken) == 100:
            raise InterruptedError  # enough: end the recorder

    with pytest.raises(InterruptedError):
        asyncio.run(metrics.record(tmp_path, primary_snapshot, sampled, max_bytes=20_000))
    newer = events.read_jsonl(tmp_path / metrics.SAMPLES_NAME)
    older = events.read_jsonl(tmp_path / metrics.OLDER_SAMPLES_NAME)
    assert (tmp_path / metrics.SAMPLES_NAME).stat().st_size < 20_000
    assert (tmp_path / metrics.OLDER_SAMPLES_NAME).stat().st_size < 21_000
    assert 0 < len(newer) and 0 < len(older) and len(older) + len(newer) < 99
    assert [s["time"] for s in older + newer] == sorted(s["time"] for s in older + newer)
