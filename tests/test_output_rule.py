"""The output rule with real hosts: netns hosts, a LAN bridge, TAPs, a client."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from vmft_qemu.pair import LocalPair
from vmft_qemu.topology import GUEST_IP, Topology
from vmft_qemu.waiting import wait_for

from .test_metrics import parse, value

pytestmark = pytest.mark.qemu

# Failure detection that never fires during a test (its own tests are elsewhere).
PATIENT = "timeout_ms = 600000\nchannel_grace_ms = 600000\n"
PROXY_PORT = 7499  # a log-channel proxy's, in the primary's host
FT_PAGE = Path(__file__).resolve().parent.parent / "images" / "rootfs" / "www" / "ft.html"


@pytest.fixture
def lan_pair(tmp_path: Path, image) -> Iterator[tuple[Topology, LocalPair]]:
    with Topology() as topo:
        # A backup stalled on purpose must not count as failed here.
        pair = LocalPair(tmp_path / "pair", network=topo, failure=PATIENT)
        try:
            pair.start_both()
            wait_for(lambda: "VMFT-NET-UP " + GUEST_IP in pair.console("primary"), 180,
                     "the guest's network to come up")
            yield topo, pair
        finally:
            pair.stop()


def client(topo: Topology, *args: str, timeout: float = 120) -> dict[str, Any]:
    done = topo.client.run([sys.executable, "-m", "vmft_qemu.client", *args, "--host", GUEST_IP],
                           capture_output=True, text=True, timeout=timeout)
    return json.loads(done.stdout)


def gate_trail(pair: LocalPair) -> list[dict[str, Any]]:
    path = pair.run_dir("primary") / "gate.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_client_gets_every_answer_right_and_nothing_leaves_early(lan_pair) -> None:
    topo, pair = lan_pair
    counted = client(topo, "counter", "--count", "200")
    assert counted["error"] is None and counted["answers"] == list(range(1, 201))
    pages = client(topo, "http", "--path", "/ft.html", "--count", "20")
    want = hashlib.sha256(FT_PAGE.read_bytes()).hexdigest()
    assert pages["error"] is None
    assert [(p["status"], p["sha256"]) for p in pages["pages"]] == [(200, want)] * 20
    # The audit trail: every frame left only once the backup's ACK covered it.
    trail = gate_trail(pair)
    # At least a frame per answer, and a SYN-ACK, the page and a FIN per page
    # (how many pure ACKs the guest sends besides depends on timing).
    assert len(trail) >= 200 + 3 * 20
    early = [t for t in trail if t["acked"] < t["stamp"]]
    assert early == []
    assert [t["seq"] for t in trail] == sorted(t["seq"] for t in trail)
    # The gate's metrics, scraped in host a's network, count what the trail shows.
    families = parse(pair.metrics("primary"))
    released = value(families, "vmft_gate_released_frames_total")
    assert released >= len(trail) and value(families, "vmft_gate_hold_seconds_count") == released
    within_1s = value(families, "vmft_gate_hold_seconds_bucket", le="1.0")
    assert within_1s >= sum(t["hold_ms"] <= 1000 for t in trail)
    assert 0 <= value(families, "vmft_gate_held_frames") < 50
    # The backup replayed the same guest: its console is the primary's so far,
    # and every frame its replay produced is the one the primary sent.
    backup = pair.console("backup")[:-1]
    assert backup == pair.console("primary")[: len(backup)]
    released = pair.status("primary")["gate"]["released"]
    try:
        check = wait_for(lambda: (d := pair.status("backup")["divergence"])["compared"]
                         >= released and d, 120, "the backup to replay every released frame")
    except TimeoutError as e:  # say where both sides stood (seen once in CI, cause unknown)
        raise AssertionError(f"{e}; released {released}; " + pair.standing(
            "state", "recorded", "acked", "replayed", "backup_replayed", "lag_ms", "gate",
            "divergence", "errors")) from None
    assert check["divergences"] == 0, check["last"]


@contextlib.contextmanager
def proxied_pair(tmp_path: Path, proxy: str, *proxy_args: str, primary: str = "",
                 ) -> Iterator[tuple[Topology, LocalPair, subprocess.Popen[str]]]:
    """A pair whose log channel runs through `python -m tests.PROXY` on host a,
    which the heartbeats do not take (a starved proxy must not look like a
    failed primary), its guest's network up.  The proxy's arguments: its port,
    the backup's address and port, then `proxy_args`, in which {primary} and
    {backup} stand for the sides' run directories."""
    repo = Path(__file__).resolve().parent.parent
    with Topology() as topo:
        pair = LocalPair(tmp_path / "pair", network=topo, primary_target_address="127.0.0.1",
                         primary_target_port=PROXY_PORT, failure=PATIENT, primary=primary)
        dirs = {role: str(pair.run_dir(role)) for role in ("primary", "backup")}
        process = topo.hosts["a"].popen(
            [sys.executable, "-m", f"tests.{proxy}", str(PROXY_PORT), topo.hosts["b"].ft_ip,
             str(pair.log_port), *(arg.format(**dirs) for arg in proxy_args)],
            cwd=repo, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert process.stdout is not None and process.stdout.readline().strip() == "listening"
            pair.start_both()
            wait_for(lambda: "VMFT-NET-UP " + GUEST_IP in pair.console("primary"), 180,
                     "the guest's network to come up")
            yield topo, pair, process
        finally:
            process.kill()
            process.wait(10)
            pair.stop()


def test_divergence_check_fires_when_the_backup_gets_a_different_input(
        tmp_path: Path, image) -> None:
    with proxied_pair(tmp_path, "faults", "tamper") as (topo, pair, proxy):
        answered = client(topo, "counter", "--count", "5")
        assert answered["answers"] == [1, 2, 3, 4, 5]  # the primary is fine
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == "injected"
        found = wait_for(lambda: (d := pair.status("backup")["divergence"])["divergences"]
                         and d, 120, "the backup to report the divergence")
        assert "outbound frame" in found["last"]
        assert any(e["event"] == "divergence" and e["level"] == "error"
                   for e in pair.events("backup"))


def test_backup_replays_every_released_frame_from_the_log_acknowledged(
        tmp_path: Path, image) -> None:
    """Each frame's stamp is no earlier than its emission: handed the log one
    LOG frame at a time, the backup's replay produces every frame the gate
    released, with no more log than the ACK that released it covered."""
    # The idle guest's log flushed every 20 ms, not 2: the stepping keeps up.
    with proxied_pair(tmp_path, "stepper", "{primary}", "{backup}",
                      primary="log_flush_us = 20000\n") as (topo, pair, proxy):
        assert proxy.stdin is not None and proxy.stdout is not None
        pair.wait_protected()
        lines: queue.Queue[str] = queue.Queue()

        def read_steps() -> None:  # the proxy's report, one line per check
            assert proxy.stdout is not None
            for line in proxy.stdout:
                lines.put(line)

        threading.Thread(target=read_steps, daemon=True).start()
        before = pair.status("primary")["gate"]["released"]
        proxy.stdin.write("on\n")
        proxy.stdin.flush()
        counted = client(topo, "counter", "--count", "5", timeout=300)
        pages = client(topo, "http", "--path", "/ft.html", "--count", "3", timeout=300)
        # Every frame the answers took was released during the stepping; go
        # on until a step has checked them all (or found one too early).
        answered = pair.status("primary")["gate"]["released"]
        steps: list[dict[str, Any]] = []
        while not steps or ("violation" not in steps[-1] and steps[-1]["released"] < answered):
            steps.append(json.loads(lines.get(timeout=120)))
        proxy.stdin.write("off\n")
        proxy.stdin.flush()
        assert "violation" not in steps[-1], steps[-1]
        assert counted["error"] is None and counted["answers"] == [1, 2, 3, 4, 5]
        assert pages["error"] is None and len(pages["pages"]) == 3
        assert answered - before >= 5 + 3 * 3
        print(f"{sum(s['when'] == 'acked' for s in steps)} LOG frames stepped, "
              f"{answered - before} released frames checked")


def test_stalled_backup_holds_every_reply_until_it_resumes(lan_pair) -> None:
    topo, pair = lan_pair
    warm = client(topo, "counter", "--count", "5")
    assert warm["answers"] == [1, 2, 3, 4, 5]
    backup = pair.procs["backup"]
    os.kill(backup.pid, signal.SIGSTOP)
    try:
        released = pair.status("primary")["gate"]["released"]
        running = topo.client.popen(
            [sys.executable, "-m", "vmft_qemu.client", "counter", "--count", "20",
             "--host", GUEST_IP], stdout=subprocess.PIPE, text=True)
        # The guest answers, but its frames wait at the gate for an ACK.
        wait_for(lambda: pair.status("primary")["gate"]["held"] >= 1, 60,
                 "the guest's reply to be held at the gate")
        with pytest.raises(subprocess.TimeoutExpired):
            running.wait(timeout=3)  # bounded: nothing may arrive while the backup is stopped
        assert pair.status("primary")["gate"]["released"] == released
    finally:
        os.kill(backup.pid, signal.SIGCONT)
    out, _ = running.communicate(timeout=120)
    result = json.loads(out)
    assert result["error"] is None and result["answers"] == list(range(6, 26))
    assert all(t["acked"] >= t["stamp"] for t in gate_trail(pair))
