"""The atomic test-and-set on shared storage (paper section 2.3) -- interim.

Minimal path backend so the controllers can be wired; the NFS backend and the
tests are being written alongside.
"""

from __future__ import annotations

import abc
import asyncio
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import LockConfig


class LockUnavailable(Exception):
    """The shared storage did not answer in time: do not go live."""


@dataclass(frozen=True)
class LockOwner:
    host: str
    pid: int
    vm: str
    epoch: int
    role: str
    time: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LockOwner":
        return cls(**data)


@dataclass(frozen=True)
class Verdict:
    won: bool
    holder: LockOwner | None


def lock_name(vm: str, epoch: int) -> str:
    return f"{vm}.epoch-{epoch}.lock"


class GoLiveLock(abc.ABC):
    @abc.abstractmethod
    def test_and_set(self, owner: LockOwner) -> Verdict: ...


class PathLock(GoLiveLock):
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def test_and_set(self, owner: LockOwner) -> Verdict:
        path = self.directory / lock_name(owner.vm, owner.epoch)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                return Verdict(False, LockOwner.from_json(json.loads(path.read_text())))
            except (OSError, ValueError):
                return Verdict(False, None)
        except OSError as e:
            raise LockUnavailable(f"{path}: {e.strerror}") from None
        mine = LockOwner(owner.host, owner.pid, owner.vm, owner.epoch, owner.role, time.time())
        with os.fdopen(fd, "w") as f:
            json.dump(mine.to_json(), f)
            f.flush()
            os.fsync(f.fileno())
        return Verdict(True, mine)


def open_lock(config: LockConfig) -> GoLiveLock | None:
    if config.backend == "none":
        return None
    if config.backend == "path":
        return PathLock(config.path)
    raise LockUnavailable(f"lock backend {config.backend!r} is not available yet")


async def acquire(lock: GoLiveLock, owner: LockOwner, timeout_s: float) -> Verdict:
    try:
        return await asyncio.wait_for(asyncio.to_thread(lock.test_and_set, owner), timeout_s)
    except TimeoutError:
        raise LockUnavailable(f"no answer from the shared storage within {timeout_s:.1f} s") from None
