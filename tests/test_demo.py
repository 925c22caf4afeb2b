"""`make demo`'s main job, end to end: `vmft demo` as a user runs it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.qemu

DEMO_TIMEOUT_S = 600  # boot and catch-up, 5 s protected, the kill, 15 s after it, shutdown


def _netns() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}


def test_demo_takes_over_keeps_every_increment_and_cleans_up(tmp_path: Path, image) -> None:
    workdir = tmp_path / "demo"
    demo = subprocess.Popen([sys.executable, "-m", "vmft_qemu", "demo", "--seconds", "5",
                             "--workdir", str(workdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = demo.communicate(timeout=DEMO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(demo.pid, signal.SIGINT)  # its own clean-up runs: pair, netns, NFS server
        try:
            out, _ = demo.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            out, _ = demo.communicate(timeout=10)
        pytest.fail(f"vmft demo did not end within {DEMO_TIMEOUT_S} s:\n{out[-4000:]}")
    print(out)
    assert demo.returncode == 0, out[-4000:]
    report = out[out.index("=== vmft demo report ==="):]
    assert re.search(r"client: +\d+ increments acknowledged, .*: none lost", report), report
    assert "backup's console carries on the primary's: YES" in report
    assert "new primary exited:   0" in report
    written = re.search(r"report: +(\S+\.md)", report)
    assert written is not None and Path(written.group(1)).is_file(), report
    # The demo's hosts were network namespaces; none is left behind.
    hosts = re.search(r"hosts: primary on (\S+), backup on (\S+), client (\S+) ", out)
    assert hosts is not None, out[:2000]
    assert not set(hosts.groups()) & _netns()
