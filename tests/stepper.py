"""A log-channel proxy that hands the backup the log one LOG frame at a time.

It checks the output rule's premise directly: a frame's stamp is no earlier
than the frame's emission, so every frame the primary's gate released, the
backup's replay produces from the log it has been handed.  While stepping,
before it forwards a LOG frame, and again once the primary has that frame's
ACK (so the gate has released everything the ACK covers), the proxy reads
how many frames the gate has released and waits until the backup's replay
has produced as many (its divergence check counts them).  It forwards
nothing more meanwhile, so a frame released on a stamp earlier than its
emission would need log the backup does not have: the wait runs out, and
the proxy reports a violation.

Run in the primary's host (`python -m tests.stepper LISTEN_PORT TARGET_HOST
TARGET_PORT PRIMARY_RUN_DIR BACKUP_RUN_DIR`): it forwards freely and prints
"listening"; a line "on" on its stdin makes it step, printing one JSON line
per step, until a line "off" (or a violation) lets the log flow again.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from vmft_qemu import log_channel as lc
from vmft_qemu import status
from vmft_qemu.waiting import wait_for

from .faults import LogProxy, _hang_up, _read_exact

WAIT_S = 10.0  # for the primary's ACK, and for the backup's replay to produce a frame
POLL_S = 0.001  # a step per LOG frame: the log must not pile up in front of the proxy


class Stepper(LogProxy):
    def __init__(self, target_host: str, target_port: int, listen_port: int,
                 primary_run: Path, backup_run: Path) -> None:
        self.primary_sock = primary_run / status.SOCKET_NAME
        self.backup_sock = backup_run / status.SOCKET_NAME
        self.stepping = threading.Event()
        super().__init__(target_port, target_host, listen_port)

    def _pipe_frames(self, src: socket.socket, dst: socket.socket, connection: int) -> None:
        try:
            while (header := _read_exact(src, lc.HEADER.size)) is not None:
                fields = lc.HEADER.unpack(header)
                payload = _read_exact(src, fields[7])
                if payload is None:
                    break
                step = fields[2] == lc.FrameType.LOG and fields[7] and self.stepping.is_set()
                if step:
                    self._check("before", fields[5])
                dst.sendall(header + payload)
                if step:
                    self._check("acked", fields[5])
        except OSError:
            pass
        _hang_up(src, dst)

    def _check(self, when: str, offset: int) -> None:
        """Around the LOG frame that ends at `offset`: every frame the gate has
        released, the backup's replay must produce with the log it has.
        "before" the frame is forwarded catches a frame released ahead of
        its log; once the frame is "acked", one released on that ACK."""
        step: dict[str, Any] = {"when": when, "offset": offset}
        try:
            if when == "acked":
                wait_for(lambda: status.ask(self.primary_sock).get("acked", {}).get("offset", -1)
                         >= offset, WAIT_S, "the primary to get the ACK", every=POLL_S)
            step["released"] = status.ask(self.primary_sock)["gate"]["released"]
            wait_for(lambda: self._produced() >= step["released"], WAIT_S,
                     "the backup's replay to produce every released frame", every=POLL_S)
            step["produced"] = self._produced()
        except TimeoutError as e:
            step.update(violation=str(e), produced=self._produced())
            self.stepping.clear()  # let the log flow again: the test ends
        print(json.dumps(step), flush=True)

    def _produced(self) -> int:
        return status.ask(self.backup_sock).get("divergence", {}).get("backup_frames", -1)


if __name__ == "__main__":
    listen, host, port, primary_run, backup_run = sys.argv[1:6]
    stepper = Stepper(host, int(port), int(listen), Path(primary_run), Path(backup_run))
    print("listening", flush=True)
    for line in sys.stdin:
        assert line.strip() in ("on", "off"), line
        (stepper.stepping.set if line.strip() == "on" else stepper.stepping.clear)()
