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
    ok = subprocess.run(base + ["-plugin", f"{plugin},interval_us=1000,kick=off", "-S", "-qmp",
                                "stdio"],
                        input='{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(base + ["-plugin", f"{plugin},interval_us=5"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "interval_us must be 100 .. 1000000" in bad.stderr
    unknown = subprocess.run(base + ["-plugin", f"{plugin},kick=sometimes"],
                             capture_output=True, text=True, timeout=60)
    assert unknown.returncode != 0 and "known: interval_us=N, kick=on|off" in unknown.stderr
