"""Lag control: a backup starved of CPU slows the primary down, not the failover.

The guest runs a CPU-bound workload (sha256 over gigabytes of zeros) while
the backup's QEMU may use only BACKUP_CPU of one CPU (a cgroup bandwidth
limit, `cpu_limit.CpuLimit`).  With the loop on, the throttle plugin in the
primary's QEMU keeps the backup within the target; with it off, the backup
falls further behind every second.  Both end with a failover (the primary
killed); the limit is lifted at the kill, so the takeover replays the backlog
at the backup's full speed.  Failover times are measured by `bench/lag.py`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from vmft_qemu import cpu_limit
from vmft_qemu.cpu_limit import CpuLimit
from vmft_qemu.events import read_jsonl
from vmft_qemu.lag_control import KP, MAX_SHARE, LagControl, Throttle
from vmft_qemu.machine import PLUGIN_DIR, Machine, Role, VMSpec
from vmft_qemu.metrics import SAMPLES_NAME
from vmft_qemu.pair import LocalPair, lan_with_storage, pull_the_plug
from vmft_qemu.waiting import wait_for

starved_backup_test = pytest.mark.skipif(
    cpu_limit.available() is not None, reason=f"cannot starve the backup: {cpu_limit.available()}")

TARGET_MS = 100  # the default [lag] target_ms
BACKUP_CPU = 0.4  # the backup's QEMU gets 40% of one CPU: it replays at ~1/3 of the record speed
WORKLOAD = "sha256:20000"  # CPU-bound for minutes; the tests end long before it does
SETTLE_S = 3.0  # after the backup is starved, the loop's time to find the throttle it needs
WINDOW_S = 15.0  # then the lag is sampled this long
IDLE_WINDOW_S = 5.0  # an idle guest's throttled sleep is measured this long


def starve_backup(pair: LocalPair) -> CpuLimit:
    pid = pair.status("backup")["qemu_pid"]
    return CpuLimit(f"vmft-test-{pid}", BACKUP_CPU, pid)


def lag_samples(pair: LocalPair, start: float, seconds: float) -> list[float]:
    """The primary's lag_ms from its status samples (metrics.jsonl, every 0.5 s)
    over `seconds` from `start` (time.time()); waits until they are all there."""
    path = pair.run_dir("primary") / SAMPLES_NAME
    wait_for(lambda: read_jsonl(path)[-1]["time"] > start + seconds, seconds + 30,
             f"{seconds:.0f} s of the primary's status samples")
    return [s["lag_ms"] for s in read_jsonl(path) if start <= s["time"] <= start + seconds]


def go_live_after_the_kill(pair: LocalPair, kill: Callable[[], object], timeout: float) -> float:
    """Kill the primary (`kill()`), wait for the backup to run the VM; seconds it took."""
    killed = time.monotonic()
    kill()
    wait_for(lambda: pair.status("backup").get("state") == "alone", timeout,
             "the backup to go live")
    return time.monotonic() - killed


def test_the_loop_finds_the_throttle_a_slow_backup_needs_and_lets_go() -> None:
    loop = LagControl(TARGET_MS)
    assert loop.decide(5000, protected=False) == 0 and loop.reason == "no backup to wait for"
    # Far behind: at once the most the primary may be throttled.
    assert loop.decide(10 * TARGET_MS, protected=True) == MAX_SHARE
    assert "over target" in loop.reason
    # A backup that keeps lagging a little over the aim: the share keeps growing.
    shares = [loop.decide(0.6 * TARGET_MS, True) for _ in range(5)]
    assert shares == sorted(shares) and shares[-1] > KP * 0.1
    # Caught up: the share goes back down to nothing, and stays there.
    shares = [loop.decide(0, True) for _ in range(200)]
    assert shares == sorted(shares, reverse=True) and shares[-1] == 0
    assert "full speed" in loop.reason


def test_qemu_loads_the_throttle_plugin_only_with_its_control_file(tmp_path: Path) -> None:
    base = ["qemu-system-x86_64", "-machine", "none", "-display", "none", "-nodefaults"]
    plugin = PLUGIN_DIR / "libthrottle.so"
    control = tmp_path / "throttle.ctl"
    throttle = Throttle(control)
    try:
        throttle.set(0.25)
        assert control.read_bytes()[8:12] == (250_000).to_bytes(4, "little")
        ok = subprocess.run(base + ["-plugin", f"{plugin},control={control}", "-S", "-qmp", "stdio"],
                            input='{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
                            capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
    finally:
        throttle.close()
    for args, error in ((f"control={tmp_path / 'none'}", "cannot open the control file"),
                        (f"control={control},period_us=5", "period_us must be 100 .. 100000"),
                        ("period_us=1000", "control=PATH is required")):
        bad = subprocess.run(base + ["-plugin", f"{plugin},{args}"],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0 and error in bad.stderr, bad.stderr
    control.write_bytes(bytes(24))
    bad = subprocess.run(base + ["-plugin", f"{plugin},control={control}"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "magic 00000000" in bad.stderr, bad.stderr


@pytest.mark.qemu
def test_the_throttle_makes_the_vcpu_sleep_for_its_busy_time_only(tmp_path: Path, image) -> None:
    """At share 0.5 the vCPU sleeps as long as it ran, and not for the time the
    guest spent halted: a guest idle between its ticks hardly sleeps at all,
    so the throttle does not delay it when work comes in."""
    spec = VMSpec("throttled", 256, image, throttle=True)
    machine = Machine(spec, Role.RECORD, tmp_path, rrfile=tmp_path / "record.bin")
    machine.prepare()
    throttle = Throttle(machine.paths.throttle)

    def busy_s() -> dict[str, float]:
        """How long each of QEMU's threads has run or waited to run (the
        kernel's schedstat, which the plugin reads too)."""
        return {task.name: sum(map(int, (task / "schedstat").read_text().split()[:2])) / 1e9
                for task in Path(f"/proc/{machine.pid}/task").iterdir()}

    async def measure() -> tuple[float, float]:
        await machine.launch()
        try:
            await asyncio.to_thread(wait_for, lambda: machine.paths.console.exists() and "tick 2"
                                    in machine.paths.console.read_text(errors="replace"),
                                    120, "the guest to boot and tick")
            throttle.set(0.5)
            slept, busy = throttle.slept_s, busy_s()
            vcpu = max(busy, key=busy.__getitem__)  # the thread that booted the guest
            await asyncio.sleep(IDLE_WINDOW_S)  # a measurement window, not a wait for an event
            return throttle.slept_s - slept, busy_s()[vcpu] - busy[vcpu]
        finally:
            await machine.stop()
    try:
        slept, busy = asyncio.run(measure())
    finally:
        throttle.close()
    # Every sleep is for time the vCPU thread was busy.  The slack: the first
    # sleep in the window may be for time before it, at most max_sleep_us
    # (20 ms).  Measured with the plugin's earlier form (sleeping in the vCPU
    # thread): 0.23-0.24 s slept for 0.24-0.26 s busy; with the wall clock it
    # once used, 0.30-0.37 s for 0.25-0.30 s.
    assert slept <= busy + 0.02, (f"the vCPU slept {slept:.3f} s but was busy only "
                                  f"{busy:.3f} s in {IDLE_WINDOW_S} s")


@pytest.mark.qemu
@starved_backup_test
def test_with_lag_control_a_starved_backup_stays_within_target(tmp_path: Path, image) -> None:
    with lan_with_storage(tmp_path) as (topo, nfs):
        pair = LocalPair(tmp_path / "pair", workload=WORKLOAD, network=topo, nfs=nfs)
        try:
            pair.start_both()
            pair.wait_protected()  # the guest's network is up: the sha256 runs now
            client = pair.client("counter", "--count", "1000000", "--retries", "3",
                                 "--duration", str(SETTLE_S + WINDOW_S + 2))
            with starve_backup(pair) as limit:
                slept_before = pair.status("primary")["throttle_slept_s"]
                lag = sorted(lag_samples(pair, time.time() + SETTLE_S, WINDOW_S))
                primary, backup = pair.status("primary"), pair.status("backup")
                print(f"lag over {WINDOW_S:.0f} s: median {lag[len(lag) // 2]:.0f} ms, "
                      f"p90 {lag[len(lag) * 9 // 10]:.0f} ms, max {lag[-1]:.0f} ms; "
                      f"throttle {primary['throttle_share']:.0%}: {primary['throttle_reason']}")
                # The throttle worked for it: the primary's vCPU slept for
                # most of the window (the backup runs at ~1/3 of its speed).
                assert primary["throttle_slept_s"] - slept_before > 0.3 * (SETTLE_S + WINDOW_S)
                # Within the target: the median at most half of it, nine
                # samples in ten inside, none beyond twice the target.  (The
                # loop aims at 0.3 of the target: single samples jitter by
                # ~50 ms, a 4 KiB read of the starved backup's QEMU and the ACK.)
                assert lag[len(lag) // 2] < TARGET_MS * 0.5, lag
                assert lag[len(lag) * 9 // 10] < TARGET_MS, lag
                assert lag[-1] < 2 * TARGET_MS, lag
                # The recording throttled by the plugin replays identically
                # on a backup without it: every frame the guest sent matched.
                assert backup["divergence"]["compared"] > 0
                assert backup["divergence"]["divergences"] == 0, backup["divergence"]
                took = go_live_after_the_kill(
                    pair, lambda: (pull_the_plug(topo.hosts["a"]), limit.close()), 60)
            print(f"live {took:.2f} s after the kill")
            result = json.loads(client.communicate(timeout=120)[0])
            answers = result["answers"]
            assert result["error"] is None and answers, result
            # Every increment the client saw acknowledged survived the failover.
            assert all(b - a in (1, 2) for a, b in zip(answers, answers[1:])), answers
            assert pair.counted() == answers[-1]
        finally:
            pair.stop()


@pytest.mark.qemu
@starved_backup_test
def test_without_lag_control_a_starved_backup_falls_behind(pair_factory) -> None:
    pair = pair_factory(workload=WORKLOAD, extra_config="[lag]\ncontrol = false\n")
    pair.start_both()
    wait_for(lambda: "VMFT-BENCH-START" in pair.console("primary"), 120,
             "the guest to start its CPU-bound workload")
    window = 8.0
    with starve_backup(pair) as limit:
        first, *_, last = lag_samples(pair, time.time(), window)
        print(f"lag {first:.0f} ms -> {last:.0f} ms in {window:.0f} s")
        # Already behind after the boot (replay is slower than record), and
        # then further behind by more than a third of every second.
        assert first > 10 * TARGET_MS
        assert last - first > 0.35 * window * 1000
        assert pair.status("primary")["throttle_slept_s"] == 0
        took = go_live_after_the_kill(pair, lambda: (pair.procs["primary"].kill(), limit.close()), 150)
    print(f"live {took:.2f} s after the kill, backlog {last / 1000:.1f} s")
