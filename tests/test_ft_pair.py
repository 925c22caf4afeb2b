"""A real guest recorded on a primary and replayed live on a backup over TCP."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from vmft_qemu import disk_identity
from vmft_qemu import log_channel as lc
from vmft_qemu.events import read_jsonl
from vmft_qemu.machine import MachinePaths
from vmft_qemu.pair import LocalPair, free_port
from vmft_qemu.replay_log import REPLAY_VERSION
from vmft_qemu.waiting import wait_for

from .faults import MODES, FaultProxy
from .test_metrics import parse, states, value

pytestmark = pytest.mark.qemu


def _ticks(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("tick ")]


def assert_backup_is_prefix(pair: LocalPair) -> tuple[list[str], list[str]]:
    """The backup's console so far is an exact prefix of the primary's."""
    primary, backup = pair.console("primary"), pair.console("backup")
    done = backup[:-1]  # the last line may be half written
    assert done == primary[: len(done)], "backup console diverged from the primary's"
    return primary, backup


def test_pair_runs_60_s_in_lock_step(pair_factory) -> None:
    pair = pair_factory()
    pair.start_both()
    wait_for(lambda: "VMFT-BOOT-OK" in pair.console("backup"), 180, "the backup to replay the boot")
    # Lag control slows the primary until the backup has caught up with the boot.
    wait_for(lambda: pair.status("primary")["lag_ms"] < 500, 120, "the backup to catch up")
    lags: list[float] = []
    start = time.monotonic()
    while time.monotonic() - start < 60:
        snap = pair.status("primary")
        assert snap["connected"], snap["errors"]
        lags.append(snap["lag_ms"])
        primary, backup = assert_backup_is_prefix(pair)
        assert len(primary) - len(backup) <= 3, f"backup {len(primary) - len(backup)} lines behind"
        time.sleep(1)
    final = pair.status("primary")
    assert final["log_bytes_per_s"] > 0 and final["ack_delay_ms"] is not None
    assert pair.status("backup")["refused_frames"] == 0
    check_metrics(pair)
    # What an operator sees: `vmft status` shows both sides.
    shown = subprocess.run([sys.executable, "-m", "vmft_qemu", "status", "--config",
                            str(pair.config("primary"))], capture_output=True, text=True,
                           timeout=30)
    assert shown.returncode == 0, shown.stderr
    for field in ("primary icount", "backup icount", "lag", "ms of the primary's running time", "KiB/s",
                  "ACK delay", f"{pair.name} backup: replaying"):
        assert field in shown.stdout, shown.stdout
    assert max(lags) < 1000, f"lag reached {max(lags):.0f} ms of the primary's running time"
    assert len(_ticks(pair.console("backup"))) >= 50, "the guest prints a tick a second"
    # The end: stop the primary cleanly; the backup replays up to the last line.
    assert pair.shutdown() == {"primary": 0, "backup": 0}
    assert pair.console("backup") == pair.console("primary")
    # The event log tells the same story.
    primary_states, backup_states = states(pair.events("primary")), states(pair.events("backup"))
    assert primary_states[0] == "starting" and "protected" in primary_states
    assert primary_states[-2:] == ["shutting-down", "shut-down"]
    assert backup_states[0] == "starting" and "replaying" in backup_states
    assert backup_states[-1] == "shut-down" and "partner-lost" not in backup_states


def check_metrics(pair: LocalPair) -> None:
    """Both metrics endpoints parse as Prometheus text and agree with the status."""
    before = pair.status("primary")
    primary, backup = parse(pair.metrics("primary")), parse(pair.metrics("backup"))
    after = pair.status("primary")
    assert [s.labels["state"] for s in primary["vmft_state"]] in (["protected"], ["lagging"])
    mine = {"vm": pair.name, "role": "primary"}
    assert value(primary, "vmft_connected", **mine) == 1
    assert before["recorded"]["offset"] <= value(primary, "vmft_log_bytes_total", **mine) \
        <= after["recorded"]["offset"]
    assert before["recorded"]["icount"] <= value(primary, "vmft_icount", **mine) \
        <= after["recorded"]["icount"]
    assert 0 <= value(primary, "vmft_lag_seconds") < 1
    assert 0 <= value(primary, "vmft_lag_instructions") < after["recorded"]["icount"]
    assert value(primary, "vmft_log_bytes_per_second") > 0
    assert 0 < value(primary, "vmft_ack_delay_seconds") < 1
    assert 0 <= value(primary, "vmft_throttle_share") <= 1
    assert value(primary, "vmft_heartbeat_age_seconds") < 1
    assert [s.labels["state"] for s in backup["vmft_state"]] == ["replaying"]
    assert 0 < value(backup, "vmft_icount", role="backup") <= after["recorded"]["icount"]
    assert value(backup, "vmft_refused_frames_total") == 0
    assert value(backup, "vmft_heartbeat_age_seconds") < 1
    # The samples `vmft report` plots: twice a second, from the same snapshot.
    samples = read_jsonl(pair.run_dir("primary") / "metrics.jsonl")
    assert len(samples) >= 100 and samples[-1]["recorded"]["offset"] <= after["recorded"]["offset"]
    gaps = [b["time"] - a["time"] for a, b in zip(samples, samples[1:])]
    assert sorted(gaps)[len(gaps) // 2] == pytest.approx(0.5, abs=0.1)
    # `vmft status --json` for scripts: both sides, answering.
    shown = subprocess.run([sys.executable, "-m", "vmft_qemu", "status", "--json", "--config",
                            str(pair.config("primary"))], capture_output=True, text=True,
                           timeout=30)
    assert shown.returncode == 0, shown.stderr
    assert sorted(s["role"] for s in json.loads(shown.stdout)) == ["backup", "primary"]


@pytest.mark.parametrize("mode", MODES)
def test_damaged_frame_is_refused_and_replay_goes_on(pair_factory, mode: str) -> None:
    backup_port = free_port()
    proxy = FaultProxy(backup_port, mode)
    try:
        pair = pair_factory(log_port=backup_port, primary_target_port=proxy.port)
        pair.start_both()
        wait_for(proxy.injected.is_set, 120, f"the proxy to {mode} a frame")
        expected = {"corrupt": "checksum", "truncate": "connection closed",
                    "duplicate": "duplicate LOG frame", "reorder": "out-of-order LOG frame"}[mode]
        errors = wait_for(lambda: [e for e in pair.status("backup")["errors"] if expected in e],
                          30, f"the backup to report the {mode} fault")
        assert errors
        # The primary reconnects and the replay carries on, still identical.
        wait_for(lambda: proxy.connections >= 2 and pair.status("primary")["connected"], 30,
                 "the primary to reconnect")
        # The fault comes early in the boot: the backup replays the rest of it first.
        wait_for(lambda: "VMFT-BOOT-OK" in pair.console("backup"), 180,
                 "the backup to replay the boot")
        seen = len(_ticks(pair.console("backup")))
        wait_for(lambda: len(_ticks(pair.console("backup"))) >= seen + 3, 60,
                 "the backup to replay three more ticks")
        assert_backup_is_prefix(pair)
        assert pair.status("backup")["refused_frames"] == 1
        assert pair.shutdown() == {"primary": 0, "backup": 0}
        assert pair.console("backup") == pair.console("primary")
    finally:
        proxy.close()


def test_wrong_log_version_is_refused(pair_factory) -> None:
    pair = pair_factory()
    pair.start("backup")
    wait_for(lambda: pair.status("backup"), 30, "the backup to answer")
    with socket.create_connection(("127.0.0.1", pair.log_port), timeout=10) as s:
        hello = lc.Frame(lc.FrameType.HELLO, 0, payload=lc.json_payload(
            {"vm": pair.name, "log_version": REPLAY_VERSION - 1, "protocol": 1}))
        s.sendall(hello.encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    answer = lc.decode(data)
    assert answer.type == lc.FrameType.REFUSE
    reason = answer.json()["reason"]
    assert "0xe0200b" in reason and "0xe0200c" in reason
    # The backup is unharmed: a real primary still gets protected.
    pair.start("primary")
    wait_for(lambda: "VMFT-BOOT-OK" in pair.console("backup"), 180, "replay after the refusal")
    assert_backup_is_prefix(pair)


def test_clean_shutdown_stops_both_and_nobody_goes_live(pair_factory) -> None:
    pair = pair_factory(workload="shutdown:5")
    pair.start_both()
    assert pair.wait_exit("primary", 180) == 0
    assert pair.wait_exit("backup", 60) == 0
    primary, backup = pair.console("primary"), pair.console("backup")
    assert backup == primary and any(line.startswith("tick ") for line in backup)
    backup_events = [e["event"] for e in pair.events("backup")]
    assert "shutdown-replayed" in backup_events
    assert not any("live" in e for e in backup_events)
    assert [e["cause"] for e in pair.events("backup") if e["event"] == "shutdown-replayed"] == [
        "guest-shutdown"]
    # Neither side went for the go-live lock: a shutdown is not a failure.
    assert not any(e["event"] in ("going-alone", "go-live-lock") for e in pair.events("primary"))
    assert list((pair.root / "locks").iterdir()) == []
    # The workload wrote each tick and 64 KiB of random bytes to the root disk: the
    # backup's replay made the same writes to its own copy.
    disk = MachinePaths(pair.run_dir("backup")).disk
    written = disk_identity.guest_file(disk, "/var/log/vmft-ticks").decode().splitlines()
    assert written == _ticks(backup)
    compared = subprocess.run([sys.executable, "-m", "vmft_qemu", "disk", "compare",
                               "--config", str(pair.config("backup"))],
                              capture_output=True, text=True, timeout=60)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert "identical: both copies hold the same guest-visible blocks" in compared.stdout
