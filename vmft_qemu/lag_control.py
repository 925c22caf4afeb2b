"""Lag control: when the backup falls behind, the primary is slowed down.

Paper section 3.2 (managing the logging channel): VMware FT keeps the backup
close behind with a closed loop; while the backup lags, the primary VM's CPU
limit is lowered step by step, and raised again step by step once the backup has
caught up, until it lags only slightly.  A far-behind backup makes failover
slow: it must replay everything it holds before it can go live.

The lag is measured in the primary's running time (the controller timestamps
the log as it reads it, see `PrimaryController.lag_ms`): how long ago the
primary was where the backup is now.  Every period the loop compares it with the target
and sets the *throttle share*, the share of its busy time the primary's vCPU
sleeps.  The share is a PI controller aiming at `AIM` (0.3) of the target: the
integral is the paper's step-by-step limit and finds the share a slow backup
needs; the proportional part damps it (the lag integrates the speed
difference, so an integral alone would oscillate).

It has to exist: QEMU replays event-dense, CPU-bound guest code (a booting
kernel) 1.7 to 2 times slower than it records it, and a backup host busy
with other work is slower still.

The actuator is the throttle TCG plugin (`qemu_plugins/throttle.c`) in the
primary's QEMU; `Throttle` is the controller's end of the small file both
map.  The plugin only delays the vCPU thread and changes no guest state (every
clock read is in the log), so the recording stays deterministic and the
backup replays it without the plugin.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import struct
from pathlib import Path
from typing import Callable

PERIOD_S = 0.05
MAX_SHARE = 0.9  # the primary's vCPU sleeps at most this share of its busy time
AIM = 0.3  # aim at this fraction of the target: single samples jitter by ~50 ms
KP = 0.2  # share per target-sized excess of lag
KI = 0.5  # share per second per target-sized excess of lag

# The control file shared with throttle.c's `struct control`.
CONTROL = struct.Struct("<IIIIQ")  # magic, version, share_ppm, reserved, slept_ns
CONTROL_MAGIC = 0x54464D56  # "VMFT"
CONTROL_VERSION = 1
_SHARE, _SLEPT = 2, 2  # word indexes: share_ppm in u32 words, slept_ns in u64 words


class Throttle:
    """The controller's end of the throttle plugin: sets the share, reads what it slept.

    Created before QEMU starts (the plugin refuses to start without it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, CONTROL.pack(CONTROL_MAGIC, CONTROL_VERSION, 0, 0, 0))
            self._map = mmap.mmap(fd, CONTROL.size)
        finally:
            os.close(fd)
        # Single aligned loads and stores, as the plugin's atomics expect.
        self._u32 = memoryview(self._map).cast("I")
        self._u64 = memoryview(self._map).cast("Q")

    def set(self, share: float) -> None:
        self._u32[_SHARE] = round(min(max(share, 0.0), MAX_SHARE) * 1_000_000)

    @property
    def slept_s(self) -> float:
        """How long the primary's vCPU has slept for the loop so far."""
        return self._u64[_SLEPT] / 1e9

    def close(self) -> None:
        self._u32.release()
        self._u64.release()
        self._map.close()


class LagControl:
    def __init__(self, target_ms: float) -> None:
        self.target_ms = target_ms
        self.share = 0.0  # share of its busy time the primary's vCPU sleeps
        self._integral = 0.0
        self.reason = "not started"

    def decide(self, lag_ms: float, protected: bool, dt: float = PERIOD_S) -> float:
        """The throttle share for the next period, given the lag now."""
        if not protected:
            self.share = self._integral = 0.0
            self.reason = "no backup to wait for"
            return self.share
        error = (lag_ms - AIM * self.target_ms) / self.target_ms
        self._integral = min(max(self._integral + KI * error * dt, 0.0), MAX_SHARE)
        self.share = min(max(self._integral + KP * error, 0.0), MAX_SHARE)
        where = "over" if lag_ms > self.target_ms else "within"
        self.reason = f"lag {lag_ms:.0f} ms {where} target {self.target_ms:.0f} ms: " + (
            f"primary's vCPU sleeps {self.share:.0%} of its busy time" if self.share > 0
            else "primary runs at full speed")
        return self.share

    async def run(self, throttle: Throttle, lag_ms: Callable[[], float],
                  protected: Callable[[], bool]) -> None:
        """Run the loop until cancelled; leaves the primary at full speed."""
        try:
            while True:
                throttle.set(self.decide(lag_ms(), protected()))
                await asyncio.sleep(PERIOD_S)
        finally:
            throttle.set(0.0)
