"""The TCG plugins: built against the installed QEMU's header, loaded by QEMU."""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
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
    # kick=inputs finds replay_has_events() and all_cpu_threads_idle() in the QEMU
    # binary, kick=halted the latter; a QEMU without them would refuse here.
    for ok_args in ("interval_us=1000,kick=off", "interval_us=2000,kick=inputs,poll_us=100",
                    "kick=halted,poll_us=100"):
        ok = run(ok_args, extra=["-S", "-qmp", "stdio"],
                 input='{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n')
        assert ok.returncode == 0, (ok_args, ok.stderr)
    bad = run("interval_us=5")
    assert bad.returncode != 0 and "interval_us must be 100 .. 1000000, not '5'" in bad.stderr
    bad_poll = run("kick=inputs,poll_us=x")
    assert bad_poll.returncode != 0 and "poll_us must be 100 .. 1000000" in bad_poll.stderr
    unknown = run("kick=sometimes")
    assert unknown.returncode != 0 and \
        "known: interval_us=N, poll_us=N, kick=inputs|halted|off, flush_socket=PATH" in unknown.stderr


def test_logflush_answers_each_flush_request_on_its_socket() -> None:
    """flush_socket=PATH: every datagram comes back (after a flush), and the
    socket is gone when QEMU exits."""
    plugin = PLUGIN_DIR / "liblogflush.so"
    with tempfile.TemporaryDirectory() as tmp:  # unix socket paths must be short
        at, own = Path(tmp) / "flush.sock", Path(tmp) / "controller.sock"
        qemu = subprocess.Popen(
            ["qemu-system-x86_64", "-machine", "none", "-display", "none", "-nodefaults", "-S",
             "-plugin", f"{plugin},interval_us=2000,kick=inputs,flush_socket={at}",
             "-qmp", "stdio"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(str(own))
            sock.settimeout(5)
            deadline = time.monotonic() + 30
            while not at.exists():
                assert qemu.poll() is None and time.monotonic() < deadline, "no flush socket"
                time.sleep(0.05)
            for request in (b"\x01" * 8, b"\x02" * 8):
                sock.sendto(request, str(at))
                assert sock.recv(64) == request
            _, stderr = qemu.communicate('{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
                                         timeout=60)
            assert qemu.returncode == 0, stderr
            assert not at.exists()
        finally:
            sock.close()
            if qemu.poll() is None:
                qemu.kill()
                qemu.wait()
    bad = subprocess.run(["qemu-system-x86_64", "-machine", "none", "-display", "none",
                          "-plugin", f"{plugin},flush_socket=/nonexistent/dir/flush.sock"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "cannot bind flush_socket" in bad.stderr
