"""`vmft report` on a recorded run: a failover, as the controllers record it.

The run dirs are written here in the controllers' formats (metrics.jsonl,
events.jsonl, gate.jsonl); test_failover.py reports on a real run too.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vmft_qemu import report
from vmft_qemu.events import read_jsonl

T0 = 1_700_000_000.0
KILL = 20.0  # the primary's host dies here


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _change(t: float, before: str | None, to: str, icount: int, reason: str,
            controller: str) -> dict[str, Any]:
    return {"time": T0 + t, "event": "state-change", "level": "info", "host": "h", "vm": "vm1",
            "role": controller, "from": before, "to": to, "reason": reason, "icount": icount,
            "controller": controller}


@pytest.fixture
def failover_run(tmp_path: Path) -> Path:
    """20 s protected, the primary's host dies, the backup goes live and runs alone."""
    run = tmp_path / "run"
    samples = [{"time": T0 + i / 2, "role": "primary", "state": "protected", "alone": False,
                "lag_target_ms": 100,
                "lag_ms": 100 + 40 * math.sin(i), "log_bytes_per_s": 30_000 + 100 * i}
               for i in range(int(KILL * 2))]
    _write(run / "primary" / "metrics.jsonl", samples)
    _write(run / "primary" / "gate.jsonl", [{"time": T0 + i / 5, "seq": i, "hold_ms": 2 + i % 3}
                                            for i in range(int(KILL * 5))])
    _write(run / "primary" / "events.jsonl", [
        _change(0.0, None, "starting", 0, "controller started", "primary"),
        _change(0.5, "starting", "unprotected", 10, "recording", "primary"),
        _change(1.0, "unprotected", "protected", 99, "backup connected", "primary")])
    backup = [{"time": T0 + 0.2 + i / 2, "role": "backup", "state": "replaying"}
              for i in range(int(KILL * 2))]
    alone = [{"time": T0 + 21 + i / 2, "role": "primary", "state": "alone", "alone": True,
              "lag_ms": 0.0, "log_bytes_per_s": 20_000.0} for i in range(10)]
    _write(run / "backup" / "metrics.jsonl", backup + alone)
    _write(run / "backup" / "gate.jsonl", [{"time": T0 + 21 + i, "seq": i, "hold_ms": 0.02}
                                           for i in range(5)])
    _write(run / "backup" / "events.jsonl", [
        _change(0.1, None, "starting", 0, "controller started", "backup"),
        _change(0.3, "starting", "waiting-for-primary", 0, "replay QEMU started", "backup"),
        _change(1.0, "waiting-for-primary", "replaying", 0, "primary connected", "backup"),
        _change(KILL + 0.3, "replaying", "partner-lost", 5000, "partner silent for 260 ms",
                "backup"),
        _change(KILL + 0.31, "partner-lost", "going-live", 5000, "won the go-live lock",
                "backup"),
        _change(KILL + 0.5, None, "starting", 5000, "resuming", "primary"),
        _change(KILL + 0.8, "starting", "alone", 5000, "live on this host", "primary")])
    return run


def plotted(rep: report.Report) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """What the figure really draws: per panel (top to bottom), per legend label."""
    panels = {}
    for name, ax in zip(("lag", "log", "hold"), rep.figure.axes):
        panels[name] = {line.get_label(): [tuple(p) for p in line.get_xydata()]
                        for line in ax.get_lines() if line.get_gid() is None}
    return panels


def test_report_plots_the_recorded_series_and_marks_the_failover(failover_run: Path) -> None:
    written = report.write_report(failover_run)
    png = written.png.read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    drawn = plotted(written.report)
    samples = {d: read_jsonl(failover_run / d / "metrics.jsonl") for d in ("primary", "backup")}
    start = T0  # the first record of the run
    # Lag: the primary's protected samples, exactly; none from the alone new primary.
    assert drawn["lag"] == {"primary": [(s["time"] - start, s["lag_ms"])
                                          for s in samples["primary"]]}
    # Log bandwidth in KiB/s: the primary's, then the new primary's on the backup's host.
    assert drawn["log"]["primary"] == [(s["time"] - start, s["log_bytes_per_s"] / 1024)
                                         for s in samples["primary"]]
    assert drawn["log"]["backup"] == [(s["time"] - start, s["log_bytes_per_s"] / 1024)
                                        for s in samples["backup"] if s["role"] == "primary"]
    # Hold time: every frame of both gate trails.
    gate = read_jsonl(failover_run / "primary" / "gate.jsonl")
    assert drawn["hold"]["primary"] == [(g["time"] - start, g["hold_ms"]) for g in gate]
    assert len(drawn["hold"]["backup"]) == 5
    # The failover is marked on every panel: partner lost, going live, alone.
    assert [(round(t, 2), state) for t, state, _ in written.report.marks] == [
        (20.3, "partner-lost"), (20.31, "going-live"), (20.8, "alone")]
    for ax in written.report.figure.axes:
        assert sorted(round(line.get_xdata()[0], 2) for line in ax.get_lines()
                      if line.get_gid() == "mark") == [20.3, 20.31, 20.8]
    md = written.markdown.read_text()
    assert "- backup: partner lost at 20.30 s, icount 5,000 (partner silent for 260 ms); " \
           "**alone** at 20.80 s, 500 ms later (live on this host)" in md
    assert "| 20.31 | backup | backup | partner-lost | going-live | 5,000 |" in md
    assert "![lag, log, hold](report.png)" in md


def test_report_command(failover_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "vmft_qemu", "report", str(failover_run),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert str(out / "report.png") in done.stdout and (out / "report.md").exists()
    empty = subprocess.run([sys.executable, "-m", "vmft_qemu", "report", str(tmp_path / "out")],
                           capture_output=True, text=True, timeout=120)
    assert empty.returncode == 2 and "not a run dir of a vmft controller" in empty.stderr
