"""Lag control: when the backup falls behind, the primary is slowed down.

VMware FT keeps the backup close behind with a closed loop: when the backup
lags, the primary is given less CPU, and more again when it has caught up.  Here the lag is measured in the primary's own guest clock (the
clock reads in the replay log, see `PrimaryController.lag_ms`).  Every period
the loop compares it with the target and pauses the primary's QEMU for a
share of the next period proportional to the excess.

It has to exist: QEMU replays event-dense, CPU-bound guest code (a booting
kernel) 1.7 to 2 times slower than it records it, and a deficit built up then
is not made up while the guest idles unless the primary waits.

The actuator stops the whole record process (SIGSTOP/SIGCONT).  That changes
no guest state the log does not capture (every clock read is in the log), so
the recording stays deterministic.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Callable

PERIOD_S = 0.05
FULL_SCALE_MS = 500.0  # excess lag at which the primary is paused the most
MAX_SHARE = 0.9  # never pause the primary for more than this share of a period


class LagControl:
    def __init__(self, target_ms: float) -> None:
        self.target_ms = target_ms
        self.share = 0.0  # share of each period the primary is paused
        self.reason = "not started"

    def decide(self, lag_ms: float, protected: bool) -> float:
        """The share of the next period to pause the primary for."""
        if not protected:
            self.share, self.reason = 0.0, "no backup to wait for"
        elif lag_ms <= self.target_ms:
            self.share, self.reason = 0.0, f"lag {lag_ms:.0f} ms within target {self.target_ms:.0f} ms"
        else:
            excess = lag_ms - self.target_ms
            self.share = min(MAX_SHARE, excess / FULL_SCALE_MS)
            self.reason = (f"lag {lag_ms:.0f} ms over target {self.target_ms:.0f} ms: "
                           f"primary paused {self.share:.0%} of the time")
        return self.share

    async def run(self, pid: int, lag_ms: Callable[[], float],
                  protected: Callable[[], bool]) -> None:
        """Run the loop for the QEMU `pid` until cancelled; leaves it running."""
        try:
            while True:
                pause = self.decide(lag_ms(), protected()) * PERIOD_S
                if pause > 0:
                    os.kill(pid, signal.SIGSTOP)
                    try:
                        await asyncio.sleep(pause)
                    finally:
                        os.kill(pid, signal.SIGCONT)
                await asyncio.sleep(PERIOD_S - pause)
        except ProcessLookupError:
            pass
