"""The atomic test-and-set on shared storage: who may go live alone (paper, section 2.3).

    "To ensure that only one VM becomes the primary, VMware FT uses an atomic
    test-and-set operation on the shared storage ... If the operation
    succeeds, the VM is allowed to go live.  If the operation fails, then the
    other VM must have already gone live, so the current VM actually halts."

Here the test-and-set is the exclusive create of a lock file at the root of a
shared NFS export, `{vm}.epoch-{epoch}.lock`, holding the winner's `LockOwner`
as JSON (host, PID, VM, epoch, role, wall-clock time).  Both sides of one FT
pair race for the same epoch's file; a re-protected pair uses epoch + 1, a
new race.  Two backends, one interface (`GoLiveLock`):

  PathLock  os.open(O_CREAT | O_EXCL) in a directory: production, where the
            share is kernel-mounted (NFSv3 and v4 do exclusive creates
            atomically on the server)
  NfsLock   speaks NFSv4 itself through libnfs (Debian's libnfs13 4.0.0, via
            ctypes), for hosts without a kernel NFS client: OPEN with
            EXCLUSIVE4 create, atomic on the server; no rpcbind or MOUNT

A side that cannot reach the storage must not go live: every operation ends
within a bounded time with `LockUnavailable`.  `NfsLock` drives libnfs's
asynchronous interface under its own deadline (connect included), and
`acquire` bounds any backend (a kernel mount can block in the kernel forever)
by running it in a daemon thread with a hard deadline.

A loser reads the winner's content to name it; the winner may not have
written it yet, so the loser waits for it a little (`READ_WAIT_S`) and else
reports the holder as None.  A side that finds the file naming itself (an
earlier attempt of its own won after its caller had given up) has won.
"""

from __future__ import annotations

import abc
import asyncio
import ctypes
import ctypes.util
import errno
import json
import logging
import os
import select
import socket
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, TypeVar

from .config import LockConfig
from .events import emit

log = logging.getLogger(__name__)

T = TypeVar("T")

READ_WAIT_S = 0.5        # a loser waits this long for the winner's content
READ_POLL_S = 0.01
MAX_CONTENT = 4096       # a lock file is far smaller
NFS_POLL_S = 0.1         # libnfs wants servicing this often (its own timeouts)


class LockUnavailable(Exception):
    """The shared storage could not be reached, or did not answer in time: do not go live."""


@dataclass(frozen=True)
class LockOwner:
    """Who holds (or contends for) one epoch's lock.  `time` is wall-clock seconds."""

    host: str
    pid: int
    vm: str
    epoch: int
    role: str
    time: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> LockOwner:
        """The owner in `data`; ValueError if it is not a complete, well-typed one."""
        if not isinstance(data, dict):
            raise ValueError(f"a lock owner is a JSON object, not {type(data).__name__}")
        values = {}
        for f in fields(cls):
            want = {"str": str, "int": int, "float": (int, float)}[f.type]
            value = data.get(f.name)
            if not isinstance(value, want) or isinstance(value, bool):
                raise ValueError(f"lock owner field {f.name!r}: {value!r}")
            values[f.name] = float(value) if f.name == "time" else value
        return cls(**values)

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True).encode() + b"\n"

    @classmethod
    def loads(cls, raw: bytes) -> LockOwner:
        try:
            return cls.from_json(json.loads(raw))
        except UnicodeDecodeError as e:
            raise ValueError(str(e)) from None

    def same_contender(self, other: LockOwner | None) -> bool:
        """The same process's attempt for the same lock?  (Its time and role may differ:
        a backup that went live runs on as the primary in the same process.)"""
        return other is not None and replace(other, time=self.time, role=self.role) == self


@dataclass(frozen=True)
class Verdict:
    """The test-and-set's outcome: `holder` is the winner (us if `won`), None if unknown yet."""

    won: bool
    holder: LockOwner | None


def lock_name(vm: str, epoch: int) -> str:
    if not vm or "/" in vm or vm.startswith(".") or "\0" in vm:
        raise ValueError(f"bad VM name for a lock file: {vm!r}")
    return f"{vm}.epoch-{epoch}.lock"


def _parse(raw: bytes | None) -> LockOwner | None:
    if raw is None:
        return None
    try:
        return LockOwner.loads(raw)
    except ValueError:
        return None        # still being written (or not ours)


class GoLiveLock(abc.ABC):
    """The test-and-set on one shared store.  Subclasses create and read files."""

    timeout_s: float | None = None     # own bound on one operation (None: the caller's)

    def test_and_set(self, owner: LockOwner) -> Verdict:
        """Create `owner`'s lock file if nobody has: won; else who holds it."""
        name = lock_name(owner.vm, owner.epoch)
        mine = replace(owner, time=time.time())
        t0 = time.monotonic()
        deadline = t0 + self.timeout_s if self.timeout_s else float("inf")
        try:
            created = self._create(name, mine.dumps(), deadline)
        except LockUnavailable as e:
            emit(log, "test-and-set-unavailable", logging.WARNING, lock=str(self), vm=owner.vm,
                 epoch=owner.epoch, role=owner.role, error=str(e))
            raise
        holder = mine if created else self._wait_holder(name, deadline)
        verdict = Verdict(created or owner.same_contender(holder), holder)
        emit(log, "test-and-set", lock=str(self), vm=owner.vm, epoch=owner.epoch,
             role=owner.role, won=verdict.won, created=created,
             holder=holder and holder.to_json(), ms=round((time.monotonic() - t0) * 1000, 1))
        return verdict

    def holder(self, vm: str, epoch: int) -> LockOwner | None:
        """Who holds `vm`'s lock for `epoch`: None if nobody (or its content is incomplete)."""
        deadline = time.monotonic() + self.timeout_s if self.timeout_s else float("inf")
        return _parse(self._read(lock_name(vm, epoch), deadline))

    def _wait_holder(self, name: str, deadline: float) -> LockOwner | None:
        """After a lost create: the winner's content, once it is there (bounded)."""
        until = min(deadline, time.monotonic() + READ_WAIT_S)
        while True:
            try:
                holder = _parse(self._read(name, until))
            except LockUnavailable as e:    # we lost all the same
                log.warning("%s: lost %s, but cannot read its holder: %s", self, name, e)
                return None
            if holder is not None or time.monotonic() + READ_POLL_S >= until:
                return holder
            time.sleep(READ_POLL_S)

    @abc.abstractmethod
    def _create(self, name: str, content: bytes, deadline: float) -> bool:
        """Exclusively create `name` holding `content`, durably: True; False if it exists.

        LockUnavailable for anything else (also when writing fails after the
        create: this side then does not go live)."""

    @abc.abstractmethod
    def _read(self, name: str, deadline: float) -> bytes | None:
        """The content of `name` (at most MAX_CONTENT bytes); None if there is no such file."""


class PathLock(GoLiveLock):
    """The lock in a directory of a mounted share: O_CREAT | O_EXCL, write, fsync."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)

    def __str__(self) -> str:
        return str(self.directory)

    def _create(self, name: str, content: bytes, deadline: float) -> bool:
        path = self.directory / name
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise LockUnavailable(f"{path}: create: {e.strerror}") from None
        try:
            try:
                view = memoryview(content)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            raise LockUnavailable(f"{path}: created, but writing it failed: {e.strerror}") from None
        return True

    def _read(self, name: str, deadline: float) -> bytes | None:
        path = self.directory / name
        try:
            with open(path, "rb") as f:
                return f.read(MAX_CONTENT)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise LockUnavailable(f"{path}: read: {e.strerror}") from None


# --- NFSv4 through libnfs -----------------------------------------------------

NFS_V4 = 4
NFS_CB = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
_c = ctypes
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "nfs_init_context": (_c.c_void_p, []),
    "nfs_destroy_context": (None, [_c.c_void_p]),
    "nfs_get_error": (_c.c_char_p, [_c.c_void_p]),
    "nfs_set_version": (_c.c_int, [_c.c_void_p, _c.c_int]),
    "nfs_set_autoreconnect": (None, [_c.c_void_p, _c.c_int]),
    "nfs_set_timeout": (None, [_c.c_void_p, _c.c_int]),
    "nfs4_set_client_name": (None, [_c.c_void_p, _c.c_char_p]),
    "nfs_get_fd": (_c.c_int, [_c.c_void_p]),
    "nfs_which_events": (_c.c_int, [_c.c_void_p]),
    "nfs_service": (_c.c_int, [_c.c_void_p, _c.c_int]),
    "nfs_mount_async": (_c.c_int, [_c.c_void_p, _c.c_char_p, _c.c_char_p, NFS_CB, _c.c_void_p]),
    "nfs_open2_async": (_c.c_int, [_c.c_void_p, _c.c_char_p, _c.c_int, _c.c_int, NFS_CB,
                                   _c.c_void_p]),
    "nfs_write_async": (_c.c_int, [_c.c_void_p, _c.c_void_p, _c.c_uint64, _c.c_char_p, NFS_CB,
                                   _c.c_void_p]),
    "nfs_read_async": (_c.c_int, [_c.c_void_p, _c.c_void_p, _c.c_uint64, NFS_CB, _c.c_void_p]),
    "nfs_fsync_async": (_c.c_int, [_c.c_void_p, _c.c_void_p, NFS_CB, _c.c_void_p]),
    "nfs_close_async": (_c.c_int, [_c.c_void_p, _c.c_void_p, NFS_CB, _c.c_void_p]),
}
_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()
# libnfs 4.0.0 derives each EXCLUSIVE4 create verifier from one unguarded static
# seed: two threads of a process could send the same verifier, and the server
# would take the second create for a retransmission of the first.  So a process
# runs one NFS lock operation at a time.
_nfs_guard = threading.Lock()


def libnfs() -> ctypes.CDLL:
    """libnfs.so.13, loaded once, its functions typed; LockUnavailable if missing."""
    global _lib
    with _lib_lock:
        if _lib is None:
            name = ctypes.util.find_library("nfs") or "libnfs.so.13"
            try:
                lib = ctypes.CDLL(name)
                for fn, (restype, argtypes) in _SIGNATURES.items():
                    getattr(lib, fn).restype = restype
                    getattr(lib, fn).argtypes = argtypes
            except (OSError, AttributeError) as e:
                raise LockUnavailable(f"libnfs (libnfs13 4.x) is not usable: {e}") from None
            _lib = lib
        return _lib


class _NfsSession:
    """One libnfs context: mount, then calls, each run to completion before `deadline`."""

    _count = 0

    def __init__(self, server: str, export: str, deadline: float, where: str) -> None:
        self.lib = libnfs()
        self.deadline = deadline
        self.budget_s = deadline - time.monotonic()
        self.where = where
        self._callbacks: list[Any] = []      # alive until the context is gone
        self.ctx = self.lib.nfs_init_context()
        if not self.ctx:
            raise LockUnavailable(f"{where}: libnfs cannot make a context")
        _NfsSession._count += 1
        self.lib.nfs_set_version(self.ctx, NFS_V4)
        self.lib.nfs_set_autoreconnect(self.ctx, 0)     # fail, never retry forever
        self.lib.nfs_set_timeout(self.ctx, max(1, int((deadline - time.monotonic()) * 1000)))
        self.lib.nfs4_set_client_name(
            self.ctx, f"vmft {socket.gethostname()} {os.getpid()} {_NfsSession._count}".encode())
        try:
            self.call("mount", self.lib.nfs_mount_async, server.encode(), export.encode())
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.ctx:
            self.lib.nfs_destroy_context(self.ctx)   # cancels what is pending (callbacks run)
            self.ctx = None
        self._callbacks.clear()

    def call(self, what: str, start: Callable[..., int], *args: Any, allow: tuple[int, ...] = (),
             data_len: bool = False) -> tuple[int, Any]:
        """start(ctx, *args, callback, NULL) and service the context until it calls back.

        Returns libnfs's (status, data): data is the bytes read if `data_len`,
        else the raw pointer (a file handle, or NULL).  A negative status (an
        error) raises LockUnavailable unless it is in `allow`."""
        result: list[tuple[int, Any]] = []

        def done(status: int, _ctx: int | None, data: int | None, _private: int | None) -> None:
            if status < 0:
                result.append((status, ctypes.string_at(data).decode(errors="replace")
                               if data else ""))
            elif data_len:
                result.append((status, ctypes.string_at(data, status) if status else b""))
            else:
                result.append((status, data))

        callback = NFS_CB(done)
        self._callbacks.append(callback)
        if start(self.ctx, *args, callback, None) != 0:
            raise LockUnavailable(f"{self.where}: {what}: {self.error()}")
        while not result:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise LockUnavailable(f"{self.where}: no answer to {what} within "
                                      f"{self.budget_s:.3f} s")
            poller = select.poll()
            fd = self.lib.nfs_get_fd(self.ctx)
            if fd >= 0:
                poller.register(fd, self.lib.nfs_which_events(self.ctx))
            ready = poller.poll(min(left, NFS_POLL_S) * 1000)
            if self.lib.nfs_service(self.ctx, ready[0][1] if ready else 0) < 0 and not result:
                raise LockUnavailable(f"{self.where}: {what}: {self.error()}")
        status, data = result[0]
        if status < 0 and status not in allow:
            raise LockUnavailable(f"{self.where}: {what}: {data or os.strerror(-status)}")
        return status, data

    def error(self) -> str:
        text = self.lib.nfs_get_error(self.ctx)
        return text.decode(errors="replace") if text else "failed"


class NfsLock(GoLiveLock):
    """The lock on an NFS export, spoken NFSv4 through libnfs; each operation within `timeout_ms`."""

    def __init__(self, server: str, export: str | Path, timeout_ms: int) -> None:
        libnfs()                       # fail early if it is missing
        self.server = server
        self.export = str(export)
        self.timeout_s = timeout_ms / 1000

    def __str__(self) -> str:
        return f"nfs://{self.server}{self.export}"

    def _session(self, name: str, deadline: float) -> _NfsSession:
        if not _nfs_guard.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise LockUnavailable(f"{self}/{name}: another NFS lock operation of this process "
                                  "is still running")
        try:
            return _NfsSession(self.server, self.export, deadline, f"{self}/{name}")
        except BaseException:
            _nfs_guard.release()
            raise

    def _create(self, name: str, content: bytes, deadline: float) -> bool:
        session = self._session(name, deadline)
        try:
            status, fh = session.call("create", session.lib.nfs_open2_async, f"/{name}".encode(),
                                      os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644,
                                      allow=(-errno.EEXIST,))
            if status == -errno.EEXIST:
                return False
            # On an error the file handle is left to the context's destruction.
            written, _ = session.call("write", session.lib.nfs_write_async, fh, len(content),
                                      content)
            if written != len(content):
                raise LockUnavailable(f"{session.where}: short write ({written} of "
                                      f"{len(content)} bytes)")
            session.call("fsync", session.lib.nfs_fsync_async, fh)
            session.call("close", session.lib.nfs_close_async, fh)
            return True
        finally:
            session.close()
            _nfs_guard.release()

    def _read(self, name: str, deadline: float) -> bytes | None:
        session = self._session(name, deadline)
        try:
            status, fh = session.call("open", session.lib.nfs_open2_async, f"/{name}".encode(),
                                      os.O_RDONLY, 0, allow=(-errno.ENOENT,))
            if status == -errno.ENOENT:
                return None
            _, content = session.call("read", session.lib.nfs_read_async, fh, MAX_CONTENT,
                                      data_len=True)
            session.call("close", session.lib.nfs_close_async, fh)
            return content
        finally:
            session.close()
            _nfs_guard.release()


# --- for the controllers ----------------------------------------------------------

def open_lock(config: LockConfig) -> GoLiveLock | None:
    """The configured lock; None for backend "none" (such a pair never goes live alone)."""
    if config.backend == "none":
        return None
    if config.backend == "path":
        return PathLock(config.path)
    if config.backend == "nfs":
        return NfsLock(config.server, config.export, config.timeout_ms)
    raise ValueError(f"unknown lock backend {config.backend!r}")


async def bounded(fn: Callable[..., T], *args: Any, timeout_s: float, what: str) -> T:
    """fn(*args) in a daemon thread; LockUnavailable if it has not returned in `timeout_s`.

    A call stuck for good (a hard NFS mount in the kernel) keeps its thread,
    but never the event loop nor the interpreter's exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(ok: bool, value: Any) -> None:
        if future.done():
            emit(log, "test-and-set-late", logging.WARNING, what=what,
                 outcome=repr(value) if not ok else value)
        elif ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def run() -> None:
        try:
            ok, value = True, fn(*args)
        except BaseException as e:      # handed to the awaiting side
            ok, value = False, e
        try:
            loop.call_soon_threadsafe(deliver, ok, value)
        except RuntimeError:            # the loop is gone
            log.warning("%s: finished after its caller had gone: %r", what, value)

    threading.Thread(target=run, name=f"lock {what}", daemon=True).start()
    try:
        return await asyncio.wait_for(future, timeout_s)
    except TimeoutError:
        emit(log, "test-and-set-unavailable", logging.WARNING, what=what,
             error=f"no answer within {timeout_s:.3f} s")
        raise LockUnavailable(f"{what}: no answer from the shared storage within "
                              f"{timeout_s:.3f} s") from None


async def acquire(lock: GoLiveLock, owner: LockOwner, timeout_s: float) -> Verdict:
    """`lock.test_and_set(owner)`, bounded by `timeout_s` (LockUnavailable: do not go live)."""
    return await bounded(lock.test_and_set, owner, timeout_s=timeout_s,
                         what=f"test-and-set {lock}/{lock_name(owner.vm, owner.epoch)}")


async def read_holder(lock: GoLiveLock, vm: str, epoch: int, timeout_s: float) -> LockOwner | None:
    """`lock.holder(vm, epoch)`, bounded by `timeout_s`."""
    return await bounded(lock.holder, vm, epoch, timeout_s=timeout_s,
                         what=f"read {lock}/{lock_name(vm, epoch)}")
