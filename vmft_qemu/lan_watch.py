"""Watching the LAN: when does the guest's traffic come from its new host?

After a go-live the guest's frames enter the LAN from the backup's host.  This
watcher runs in the LAN's namespace on the bridge port of one host and prints,
as JSON lines, each frame whose source is the guest's MAC, with its
CLOCK_MONOTONIC time (the same clock in every namespace of this machine):

    python -m vmft_qemu.lan_watch b-lan 52:54:00:77:00:10

`LanWatch` runs it for a benchmark or the demo and collects what it saw.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from .topology import Netns

ETH_P_ALL = 0x0003
ETH_P_ARP = 0x0806


def watch(ifname: str, mac: str) -> None:
    src = bytes.fromhex(mac.replace(":", ""))
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((ifname, 0))
    print(json.dumps({"listening": ifname}), flush=True)
    while True:
        frame = sock.recv(65536)
        if frame[6:12] != src:
            continue
        ethertype = int.from_bytes(frame[12:14], "big")
        # A gratuitous ARP: sender and target address are the same.
        garp = ethertype == ETH_P_ARP and frame[28:32] == frame[38:42]
        print(json.dumps({"t": time.monotonic(), "ethertype": ethertype, "garp": garp,
                          "bytes": len(frame)}), flush=True)


class LanWatch:
    """Frames from `mac` entering the LAN through host port `port` of `lan`."""

    def __init__(self, lan: Netns, port: str, mac: str) -> None:
        self.frames: list[dict[str, Any]] = []
        self._proc = lan.popen([sys.executable, "-m", "vmft_qemu.lan_watch", port, mac],
                               stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        first = self._proc.stdout.readline()
        if "listening" not in first:
            self.close()
            raise RuntimeError(f"LAN watcher on {port} did not start: {first!r}")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self.frames.append(json.loads(line))

    def first(self, after: float, garp: bool | None = None) -> dict[str, Any] | None:
        """The first frame seen after monotonic time `after` (only GARPs, or none)."""
        for frame in list(self.frames):
            if frame["t"] > after and (garp is None or frame["garp"] == garp):
                return frame
        return None

    def close(self) -> None:
        self._proc.kill()
        self._proc.wait(10)


if __name__ == "__main__":
    watch(sys.argv[1], sys.argv[2])
