"""`vmft report`: what happened in a run, as plots and a summary.

Reads what every controller left in its run dir: `metrics.jsonl` (its status
snapshot sampled over time, see `metrics`), `events.jsonl` (its state changes,
see `events.Stateful`) and `gate.jsonl` (every frame the output gate held,
see `output_gate`).  Draws, on one time axis, the backup's lag, the log
channel's bandwidth and how long each output frame was held, with the
failovers marked, into `report.png`, and writes `report.md`: the state
timeline, each failover (partner lost -> running alone) and the figures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .events import read_jsonl
from .metrics import OLDER_SAMPLES_NAME, SAMPLES_NAME

EVENTS_NAME, GATE_NAME = "events.jsonl", "gate.jsonl"
# State changes worth a line across every plot: (style, colour).
MARKED = {"partner-lost": ("dotted", "tab:red"), "going-live": ("dashed", "tab:red"),
          "alone": ("solid", "tab:red")}


class NoRunData(Exception):
    """Nothing to report: no controller run dir found."""


@dataclass
class RunDir:
    """One controller's run dir (a host's side; after a go-live it holds the
    backup's record and then the new primary's)."""

    name: str
    samples: list[dict[str, Any]]
    events: list[dict[str, Any]]
    gate: list[dict[str, Any]]


@dataclass
class Series:
    label: str
    t: list[float]  # seconds from the run's start
    y: list[float]


@dataclass
class Report:
    start: float  # time.time() of the run's first record
    panels: dict[str, list[Series]]
    marks: list[tuple[float, str, str]]  # (t, state, run dir)
    figure: Figure
    markdown: str


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return read_jsonl(path) if path.exists() else []


def load(rundir: Path) -> list[RunDir]:
    """Every controller run dir at or under `rundir`."""
    if not rundir.is_dir():
        raise NoRunData(f"{rundir}: not a directory")
    found = sorted({p.parent for name in (SAMPLES_NAME, EVENTS_NAME)
                    for p in [rundir / name, *rundir.glob(f"*/{name}"),
                              *rundir.glob(f"*/*/{name}")] if p.exists()})
    if not found:
        raise NoRunData(f"{rundir}: no {SAMPLES_NAME} or {EVENTS_NAME} in it or two levels "
                        "below: not a run dir of a vmft controller")
    return [RunDir(str(d.relative_to(rundir)) if d != rundir else d.name,
                   _jsonl(d / OLDER_SAMPLES_NAME) + _jsonl(d / SAMPLES_NAME),
                   _jsonl(d / EVENTS_NAME), _jsonl(d / GATE_NAME))
            for d in found]


def _series(runs: list[RunDir], start: float) -> dict[str, list[Series]]:
    """What each panel plots, straight from the records."""
    panels: dict[str, list[Series]] = {"lag": [], "log": [], "hold": []}
    for run in runs:
        primary = [s for s in run.samples if s.get("role") == "primary"]
        protected = [s for s in primary if not s.get("alone")]
        held = [g for g in run.gate if "time" in g]
        for panel, rows, t_key, value in (
                ("lag", protected, "time", lambda s: s["lag_ms"]),
                ("log", primary, "time", lambda s: s["log_bytes_per_s"] / 1024),
                ("hold", held, "time", lambda g: g["hold_ms"])):
            if rows:
                panels[panel].append(Series(run.name, [r[t_key] - start for r in rows],
                                            [value(r) for r in rows]))
    return panels


def _marks(runs: list[RunDir], start: float) -> list[tuple[float, str, str]]:
    return sorted((e["time"] - start, e["to"], run.name) for run in runs for e in run.events
                  if e["event"] == "state-change" and e["to"] in MARKED)


def _draw(panels: dict[str, list[Series]], marks: list[tuple[float, str, str]],
          title: str, lag_target_ms: float | None) -> Figure:
    fig = Figure(figsize=(11, 8.5), dpi=100, layout="constrained")
    fig.suptitle(title, fontsize=11)
    axes = fig.subplots(3, 1, sharex=True)
    labels = sorted({s.label for series in panels.values() for s in series})
    colour = {label: f"C{i % 10}" for i, label in enumerate(labels)}  # a run dir's, everywhere
    # Log-like scales: a boot's seconds of lag and MiB/s of log next to the
    # steady state's tens of ms and KiB/s.
    titles = {"lag": ("backup's lag (primary's running time)", "ms", 10),
              "log": ("log channel bandwidth (replay log recorded)", "KiB/s", 10),
              "hold": ("output hold time per guest frame (output gate)", "ms", 0.1)}
    for ax, (panel, (title, unit, linear_below)) in zip(axes, titles.items()):
        for s in panels[panel]:
            style = dict(linestyle="none", marker=".", markersize=3) if panel == "hold" else {}
            ax.plot(s.t, s.y, label=s.label, color=colour[s.label], **style)
        if not panels[panel]:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", color="grey")
        else:
            ax.set_yscale("symlog", linthresh=linear_below)
            ax.set_ylim(bottom=0)
        if panel == "lag" and lag_target_ms:
            ax.axhline(lag_target_ms, color="grey", linestyle="dashed", linewidth=1, gid="target",
                       label=f"target {lag_target_ms:g} ms")
        ax.set_title(title, loc="left", fontsize=10)
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        shown: set[str] = set()
        for t, state, _ in marks:
            ax.axvline(t, linestyle=MARKED[state][0], color=MARKED[state][1], linewidth=1,
                       gid="mark", label=None if state in shown else f"state: {state}")
            shown.add(state)
        if panels[panel] or marks:
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    axes[-1].set_xlabel("seconds since the run's first record")
    return fig


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _figures_row(what: str, values: list[float]) -> str:
    if not values:
        return f"| {what} | - | - | - | 0 |"
    return (f"| {what} | {_pct(values, 0.5):,.1f} | {_pct(values, 0.99):,.1f} | "
            f"{max(values):,.1f} | {len(values):,} |")


def _failovers(runs: list[RunDir], start: float) -> list[str]:
    """Each partner-lost and what it came to in the same run dir."""
    lines = []
    for run in runs:
        changes = [e for e in run.events if e["event"] == "state-change"]
        for i, lost in enumerate(changes):
            if lost["to"] != "partner-lost":
                continue
            end = next((e for e in changes[i + 1:] if e["to"] in ("alone", "stopped", "failed")),
                       None)
            outcome = "undecided at the end of the record" if end is None else (
                f"**{end['to']}** at {end['time'] - start:.2f} s, "
                f"{(end['time'] - lost['time']) * 1000:.0f} ms later ({end['reason']})")
            lines.append(f"- {run.name}: partner lost at {lost['time'] - start:.2f} s, icount "
                         f"{lost['icount']:,} ({lost['reason']}); {outcome}")
    return lines or ["- none"]


def _markdown(rundir: Path, runs: list[RunDir], start: float,
              panels: dict[str, list[Series]], png: str) -> str:
    out = [f"# vmft run report: {rundir}", "",
           f"Started {_clock(start)}.  Plots: [{png}]({png})", "", f"![lag, log, hold]({png})",
           "", "| run dir | samples | events | gate frames |", "|---|---|---|---|"]
    out += [f"| {r.name} | {len(r.samples)} | {len(r.events)} | {len(r.gate)} |" for r in runs]
    out += ["", "## Failovers", "", *_failovers(runs, start), "", "## Figures", "",
            "| what | median | p99 | max | samples |", "|---|---|---|---|---|",
            _figures_row("lag, ms (primary protected)", [y for s in panels["lag"] for y in s.y]),
            _figures_row("log bandwidth, KiB/s", [y for s in panels["log"] for y in s.y]),
            _figures_row("output hold, ms per frame", [y for s in panels["hold"] for y in s.y]),
            "", "## State changes", "", "| t (s) | run dir | controller | from | to | icount "
            "| reason |", "|---|---|---|---|---|---|---|"]
    changes = sorted(((e, run.name) for run in runs for e in run.events
                      if e["event"] == "state-change"), key=lambda c: c[0]["time"])
    for e, name in changes:
        out.append(f"| {e['time'] - start:.2f} | {name} | {e.get('controller', '')} "
                   f"| {e['from'] or ''} | {e['to']} | {e['icount']:,} "
                   f"| {str(e['reason']).replace('|', '/')} |")
    return "\n".join(out) + "\n"


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


def build(rundir: Path, png_name: str = "report.png") -> Report:
    runs = load(rundir)
    times = [r[0]["time"] for run in runs for r in (run.samples, run.events, run.gate) if r]
    start = min(times) if times else 0.0
    panels, marks = _series(runs, start), _marks(runs, start)
    title = f"vmft run {rundir}, from {_clock(start)}: failovers marked in red"
    target = next((s["lag_target_ms"] for run in runs for s in run.samples
                   if "lag_target_ms" in s), None)
    return Report(start, panels, marks, _draw(panels, marks, title, target),
                  _markdown(rundir, runs, start, panels, png_name))


@dataclass
class Written:
    png: Path
    markdown: Path
    report: Report


def write_report(rundir: Path, out: Path | None = None) -> Written:
    """`report.png` and `report.md` for the run under `rundir`, into `out`."""
    out = out or rundir
    out.mkdir(parents=True, exist_ok=True)
    report = build(rundir)
    png, md = out / "report.png", out / "report.md"
    report.figure.savefig(png)
    md.write_text(report.markdown)
    return Written(png, md, report)
