"""nfs-ganesha in a network namespace: the shared storage of the go-live lock.

The paper's FT pair decides who may run the VM alone with a test-and-set on
shared storage (`test_and_set`).  Tests and the demo stand the storage in with
a user-space NFS server, nfs-ganesha with its VFS backend (Debian's
nfs-ganesha and nfs-ganesha-vfs), run in the storage namespace of a
`Topology(storage=True)`:

    with Topology(storage=True) as topo, NfsServer(topo.storage) as nfs:
        lock = NfsLock(STORAGE_IP, nfs.pseudo, timeout_ms=1000)   # from a host's netns

Every instance is private: its configuration, log, PID file, NFSv4 recovery
and credential-cache directories live in its own run directory (a temporary
one unless given), so it never touches a system instance or another test's.
It serves NFSv4 only (no MOUNT, NLM or rquota: no rpcbind needed), over TCP,
without a grace period (a fresh server would refuse every create with
NFS4ERR_GRACE for 90 s otherwise), root not squashed.  It runs in the
foreground as a child (`ip netns exec NS ganesha.nfsd -F ...`, which execs:
the child's PID is ganesha's), is ready once it answers an RPC NULL call on
its port, and is stopped by that PID: SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import logging
import secrets
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from .events import emit
from .topology import Netns
from .waiting import wait_for

log = logging.getLogger(__name__)

GANESHA = "ganesha.nfsd"
NFS_PORT = 2049
NFS_PROGRAM = 100003
PSEUDO = "/vmft"                 # the export's NFSv4 path (lock.export in the config)
LEASE_S = 10                     # NFSv4 lease: a vanished client's opens expire after this
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
PROBE_TIMEOUT = 0.5              # one RPC NULL call
POLL = 0.02
LOG_TAIL = 20                    # lines of ganesha's log in an error

CONFIG = """\
# Written by vmft_qemu.nfs_server for one private nfs-ganesha instance.
NFS_CORE_PARAM {{
    Protocols = 4;               # NFSv4 only: no MOUNT, NLM, rquota, so no rpcbind
    NFS_Port = {port};
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
    Dbus_Name_Prefix = "{dbus_prefix}";
}}
NFSv4 {{
    Graceless = true;            # serve creates at once after a start
    Lease_Lifetime = {lease};
    RecoveryBackend = fs;
    RecoveryRoot = "{run_dir}/recovery";
    Only_Numeric_Owners = true;  # no idmapd: owners are uid numbers
}}
NFS_KRB5 {{
    Active_krb5 = false;
    CCacheDir = "{run_dir}/ccache";
}}
EXPORT {{
    Export_Id = 1;
    Path = "{export_dir}";
    Pseudo = "{pseudo}";
    Protocols = 4;
    Transports = TCP;
    Access_Type = RW;
    Squash = No_Root_Squash;
    SecType = sys;
    FSAL {{
        Name = VFS;
    }}
}}
"""


class NfsServerError(RuntimeError):
    """nfs-ganesha did not start, or did not stop; the message has its log's tail."""


def rpc_null(address: str, port: int = NFS_PORT, timeout: float = PROBE_TIMEOUT) -> bool:
    """One ONC RPC NULL call to NFSv4 at address:port over TCP; True if accepted."""
    xid = secrets.randbits(32)
    # xid, CALL, RPC version 2, program, version 4, procedure 0, AUTH_NONE cred and verifier
    call = struct.pack(">10I", xid, 0, 2, NFS_PROGRAM, 4, 0, 0, 0, 0, 0)
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">I", 0x80000000 | len(call)) + call)
            reply = b""
            while len(reply) < 4 + 24:   # record mark; xid, REPLY, accepted, verifier, status
                chunk = sock.recv(64)
                if not chunk:
                    return False
                reply += chunk
    except OSError:
        return False
    rxid, mtype, stat, _flavor, vlen = struct.unpack(">5I", reply[4:24])
    if (rxid, mtype, stat, vlen) != (xid, 1, 0, 0):
        return False
    return struct.unpack(">I", reply[24:28])[0] == 0   # SUCCESS


class NfsServer:
    """A private nfs-ganesha exporting `export_dir` as `pseudo`, in `netns` (None: here)."""

    def __init__(self, netns: Netns | None, export_dir: Path | None = None,
                 run_dir: Path | None = None, pseudo: str = PSEUDO, port: int = NFS_PORT,
                 lease_s: int = LEASE_S) -> None:
        if not pseudo.startswith("/"):
            raise ValueError(f"the NFSv4 pseudo path must be absolute, not {pseudo!r}")
        self.netns = netns
        self._own_run_dir = run_dir is None
        self.run_dir = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="vmft-ganesha-"))
        self.export_dir = Path(export_dir) if export_dir else self.run_dir / "export"
        self.pseudo = pseudo
        self.port = port
        self.lease_s = lease_s
        self.config_path = self.run_dir / "ganesha.conf"
        self.log_path = self.run_dir / "ganesha.log"
        self.pid_path = self.run_dir / "ganesha.pid"
        self.stderr_path = self.run_dir / "ganesha.stderr"
        self.proc: subprocess.Popen | None = None
        self.start_s: float | None = None      # how long the last start took

    def __repr__(self) -> str:
        where = self.netns.name if self.netns else "this namespace"
        return f"NfsServer({where}, {str(self.export_dir)!r} as {self.pseudo!r})"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def config_text(self) -> str:
        for path in (self.run_dir, self.export_dir):
            if any(c in str(path) for c in '"\n'):
                raise ValueError(f"unusable path for ganesha's configuration: {str(path)!r}")
        return CONFIG.format(port=self.port, lease=self.lease_s, run_dir=self.run_dir,
                             export_dir=self.export_dir, pseudo=self.pseudo,
                             dbus_prefix="vmft" + secrets.token_hex(4))

    def command(self) -> list[str]:
        argv = [GANESHA, "-F", "-f", str(self.config_path), "-L", str(self.log_path),
                "-p", str(self.pid_path), "-N", "NIV_EVENT"]
        return self.netns.command(argv) if self.netns else argv

    # lifecycle
    def __enter__(self) -> NfsServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self, timeout: float = START_TIMEOUT) -> NfsServer:
        """Start ganesha; return once it answers on its port (NfsServerError if not in time)."""
        if self.proc is not None:
            raise RuntimeError(f"{self} already started")
        if shutil.which(GANESHA) is None:
            raise NfsServerError(f"{GANESHA} not found: install nfs-ganesha and "
                                 "nfs-ganesha-vfs (make setup)")
        t0 = time.monotonic()
        try:
            for sub in ("recovery", "ccache"):
                (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
            self.export_dir.mkdir(parents=True, exist_ok=True)
            self.config_path.write_text(self.config_text())
            with open(self.stderr_path, "wb") as err:
                self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                             stdout=err, stderr=subprocess.STDOUT,
                                             start_new_session=True)
            self._wait_ready(t0 + timeout)
        except BaseException:
            self.stop()
            raise
        self.start_s = time.monotonic() - t0
        emit(log, "nfs-server-started", pid=self.proc.pid, netns=self.netns and self.netns.name,
             export=self.export_dir, pseudo=self.pseudo, start_ms=round(self.start_s * 1000, 1))
        return self

    def _wait_ready(self, deadline: float) -> None:
        proc = self.proc
        assert proc is not None

        def serving() -> bool:
            status = proc.poll()
            if status is not None:
                raise NfsServerError(f"{shlex.join(self.command())} exited with status "
                                     f"{status} before serving{self._tail()}")
            return self._probe()

        try:
            wait_for(serving, deadline - time.monotonic(), f"{GANESHA} on port {self.port}",
                     every=POLL)
        except TimeoutError:
            raise NfsServerError(f"{GANESHA} (pid {proc.pid}) does not answer on port "
                                 f"{self.port}{self._tail()}") from None

    def _probe(self) -> bool:
        if self.netns is None:
            return rpc_null("127.0.0.1", self.port)
        return self.netns.call(rpc_null, "127.0.0.1", self.port, timeout=PROBE_TIMEOUT + 5)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop ganesha by its PID (SIGTERM, then SIGKILL); remove a temporary run directory.

        Idempotent.  NfsServerError if it survives SIGKILL for `timeout` s."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s: pid %d ignored SIGTERM for %.0f s; SIGKILL", self, proc.pid,
                            timeout)
                proc.kill()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    raise NfsServerError(f"{GANESHA} (pid {proc.pid}) survives SIGKILL") from None
        if proc is not None:
            emit(log, "nfs-server-stopped", pid=proc.pid, status=proc.returncode)
        if self._own_run_dir and self.run_dir.exists():
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _tail(self) -> str:
        parts = []
        for path in (self.log_path, self.stderr_path):
            try:
                lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL:]
            except OSError:
                continue
            if lines:
                parts.append(f"\n--- {path} (last {len(lines)} lines):\n" + "\n".join(lines))
        return "".join(parts) or f" (no log in {self.run_dir})"
