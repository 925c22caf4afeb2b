"""A slow host, made on purpose: cap the CPU a process (a backup's QEMU) may use.

Lag control exists for a backup whose host is busier or slower than the
primary's.  Tests and `bench/lag.py` stand such a host in by putting the
backup's QEMU into a CPU cgroup of its own with a bandwidth limit: cgroup v2's
`cpu.max` where the unified hierarchy has the cpu controller, otherwise
cgroup v1's `cpu.cfs_quota_us` / `cpu.cfs_period_us` (this project's
containers mount v1 for cpu).  A short period (10 ms) makes the starvation
smooth rather than 100 ms bursts.
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 10_000


def _hierarchy() -> tuple[Path, bool] | None:
    """(the cpu hierarchy's root, whether it is cgroup v2), or None."""
    controllers = CGROUP_ROOT / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        return CGROUP_ROOT, True
    if (CGROUP_ROOT / "cpu" / "cpu.cfs_quota_us").exists():
        return CGROUP_ROOT / "cpu", False
    return None


def available() -> str | None:
    """None if a CPU limit can be set here, else why not."""
    found = _hierarchy()
    if found is None:
        return "no cgroup cpu controller (neither v2 cpu.max nor v1 cpu.cfs_quota_us)"
    if not os.access(found[0], os.W_OK):
        return f"{found[0]} is not writable (not root?)"
    return None


class CpuLimit:
    """A cgroup `name` limited to `share` of one CPU, with processes `pids` in it.

    Use as a context manager: on exit (or `close()`, which lifts the limit)
    the processes go back to the root group and the cgroup is removed."""

    def __init__(self, name: str, share: float, *pids: int) -> None:
        found = _hierarchy()
        if found is None:
            raise RuntimeError(available())
        root, self._v2 = found
        self._root = root
        self.path = root / name
        self.path.mkdir()
        try:
            self.set(share)
            for pid in pids:
                self.add(pid)
        except Exception:
            self.close()
            raise

    def set(self, share: float) -> None:
        """Allow the group `share` of one CPU (at least 0.1)."""
        if share < 0.1:
            raise ValueError(f"CPU share {share}: must be at least 0.1")
        quota = round(share * PERIOD_US)
        if self._v2:
            (self.path / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        else:
            (self.path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))

    def add(self, pid: int) -> None:
        """Move process `pid` (all its threads) into the group."""
        (self.path / "cgroup.procs").write_text(str(pid))

    def close(self) -> None:
        if not self.path.exists():
            return  # closed already
        for pid in (self.path / "cgroup.procs").read_text().split():
            try:
                (self._root / "cgroup.procs").write_text(pid)
            except ProcessLookupError:
                pass  # exited meanwhile
        self.path.rmdir()

    def __enter__(self) -> "CpuLimit":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
