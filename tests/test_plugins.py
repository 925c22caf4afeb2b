"""The TCG plugins: built against the installed QEMU's header, loaded by QEMU."""

from __future__ import annotations

import subprocess
from pathlib import Path

from vmft_qemu.machine import PLUGIN_DIR

PLUGINS = PLUGIN_DIR.parent


def test_plugins_build_against_the_installed_qemu() -> None:
    subprocess.run(["make", "-C", str(PLUGINS)], check=True, capture_output=True, text=True)
    assert (PLUGIN_DIR / "liblogflush.so").stat().st_size > 0


def test_qemu_loads_logflush_and_it_refuses_bad_arguments(tmp_path: Path) -> None:
    base = ["qemu-system-x86_64", "-machine", "none", "-display", "none", "-nodefaults"]
    plugin = PLUGIN_DIR / "liblogflush.so"

    def run(args: str, **kw) -> subprocess.CompletedProcess[str]:
        return subprocess.run(base + ["-plugin", f"{plugin},{args}", *kw.get("extra", [])],
                              input=kw.get("input"), capture_output=True, text=True, timeout=60)
    # kick=inputs finds replay_has_events() in the QEMU binary; a QEMU without it
    # would refuse here.
    for ok_args in ("interval_us=1000,kick=off", "interval_us=2000,kick=inputs,poll_us=100",
                    "interval_us=500,kick=on"):
        ok = run(ok_args, extra=["-S", "-qmp", "stdio"],
                 input='{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n')
        assert ok.returncode == 0, (ok_args, ok.stderr)
    bad = run("interval_us=5")
    assert bad.returncode != 0 and "interval_us must be 100 .. 1000000, not '5'" in bad.stderr
    bad_poll = run("kick=inputs,poll_us=x")
    assert bad_poll.returncode != 0 and "poll_us must be 100 .. 1000000" in bad_poll.stderr
    unknown = run("kick=sometimes")
    assert unknown.returncode != 0 and \
        "known: interval_us=N, poll_us=N, kick=inputs|on|off" in unknown.stderr
