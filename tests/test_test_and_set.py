"""The go-live test-and-set (vmft_qemu.test_and_set), against a real NFS server.

The NFS tests run nfs-ganesha (VFS backend) in the storage namespace of a
`Topology(storage=True)` and contend from the FT hosts' namespaces: in
contender processes (tests/lock_contender.py) started together for each round,
or in a thread entered into a host's namespace (`Netns.call`).

PathLock is production's backend on a kernel-mounted share.  This kernel has
no NFS client and Debian bookworm packages no FUSE NFS client (no fuse-nfs),
so no test can mount the export: PathLock is tested on a local directory, and
on the server's exported directory itself, racing NFS clients for the same
files (their creates and its own meet in the one file system behind ganesha).

Every wait is bounded: pipe reads have deadlines, subprocesses timeouts.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from vmft_qemu import config as cfg
from vmft_qemu import test_and_set as tas
from vmft_qemu.nfs_server import NfsServer, NfsServerError, rpc_null
from vmft_qemu.test_and_set import (GoLiveLock, LockOwner, LockUnavailable, NfsLock, PathLock,
                                    Verdict, acquire, lock_name, open_lock)
from vmft_qemu.topology import STORAGE_IP, Netns, Topology

REPO = Path(__file__).resolve().parents[1]
CONTENDER = Path(__file__).with_name("lock_contender.py")
ROUNDS = 40
TIMEOUT_MS = 1000
SLACK_S = 5.0            # generous bound beyond a timeout: this is no timing test
READ_S = 30.0            # a contender's answer to one round


def _libnfs_usable() -> bool:
    try:
        tas.libnfs()
        return True
    except LockUnavailable:
        return False


SERVER_OK = bool(os.geteuid() == 0 and shutil.which("ip") and shutil.which("ganesha.nfsd"))
needs_server = pytest.mark.skipif(not SERVER_OK, reason="needs root (network namespaces), "
                                  "iproute2 and nfs-ganesha (make setup)")
needs_nfs = pytest.mark.skipif(not (SERVER_OK and _libnfs_usable()),
                               reason="needs root, iproute2, nfs-ganesha and libnfs13 (make setup)")


def vm_name() -> str:
    """A VM name of its own for each test: tests sharing a server never share locks."""
    return f"vm-{uuid.uuid4().hex[:8]}"


def owner(host: str, vm: str, epoch: int = 1, role: str = "backup", pid: int = 4242) -> LockOwner:
    return LockOwner(host=host, pid=pid, vm=vm, epoch=epoch, role=role)


# --- contender processes ------------------------------------------------------------

class Contender:
    """tests/lock_contender.py in a namespace (or here): one test-and-set per `go`."""

    def __init__(self, ns: Netns | None, host: str, vm: str, *where: str) -> None:
        argv = [sys.executable, str(CONTENDER), "--host", host, "--vm", vm,
                "--timeout-ms", str(TIMEOUT_MS), *where]
        self.host = host
        self.proc = subprocess.Popen(ns.command(argv) if ns else argv, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
                                     cwd=REPO)
        self._buffer = b""
        self.pid = self.read()["ready"]

    def go(self, epoch: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{epoch}\n".encode())

    def read(self, timeout: float = READ_S) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            ready = select.select([self.proc.stdout], [], [], max(left, 0))[0]
            chunk = os.read(self.proc.stdout.fileno(), 4096) if ready else b""
            if not chunk:
                self.close()
                raise AssertionError(f"contender {self.host}: no answer "
                                     f"({'timeout' if not ready else 'exited'}): "
                                     f"{self.proc.stderr.read().decode(errors='replace')}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe and not pipe.closed:
                pipe.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stderr:
            self.proc.stderr.close()


def race(contenders: list[Contender], rounds: int) -> dict[str, int]:
    """Every contender tries each epoch at once; exactly one wins each, the others name it."""
    wins = {c.host: 0 for c in contenders}
    for epoch in range(1, rounds + 1):
        for c in contenders:
            c.go(epoch)
        results = {c.host: c.read() for c in contenders}
        for host, r in results.items():
            assert "error" not in r, f"epoch {epoch}, {host}: {r['error']}"
        winners = [host for host, r in results.items() if r["won"]]
        assert len(winners) == 1, f"epoch {epoch}: winners {winners}: {results}"
        winner = next(c for c in contenders if c.host == winners[0])
        wins[winner.host] += 1
        for host, r in results.items():
            assert r["holder"] is not None, f"epoch {epoch}: {host} cannot name the winner"
            holder = r["holder"]
            assert (holder["host"], holder["pid"], holder["epoch"]) == \
                (winner.host, winner.pid, epoch), f"epoch {epoch}: {host} sees {holder}"
    return wins


@pytest.fixture
def contenders() -> Iterator[list[Contender]]:
    made: list[Contender] = []
    yield made
    for c in made:
        c.close()


# --- without a server ---------------------------------------------------------------

def test_owner_json_round_trip() -> None:
    o = LockOwner("host-a", 123, "demo", 7, "primary", 1700000000.25)
    assert LockOwner.loads(o.dumps()) == o
    assert LockOwner.from_json(json.loads(o.dumps())) == o
    assert LockOwner.from_json({**o.to_json(), "time": 5}).time == 5.0
    assert o.same_contender(LockOwner("host-a", 123, "demo", 7, "primary", 1.0))
    assert o.same_contender(LockOwner("host-a", 123, "demo", 7, "backup", 1.0))
    assert not o.same_contender(LockOwner("host-a", 123, "demo", 8, "primary", 1.0))
    assert not o.same_contender(LockOwner("host-b", 123, "demo", 7, "primary", 1.0))
    assert not o.same_contender(LockOwner("host-a", 124, "demo", 7, "primary", 1.0))
    assert not o.same_contender(None)
    for bad in (b"", b"{", b"[]", b'{"host": "a"}', b"\xff\xfe",
                json.dumps({**o.to_json(), "pid": "123"}).encode(),
                json.dumps({**o.to_json(), "pid": True}).encode()):
        with pytest.raises(ValueError):
            LockOwner.loads(bad)


def test_lock_name() -> None:
    assert lock_name("demo", 3) == "demo.epoch-3.lock"
    for bad in ("", "a/b", ".hidden", "x\0y"):
        with pytest.raises(ValueError):
            lock_name(bad, 1)


def test_open_lock_follows_the_config(tmp_path: Path) -> None:
    def lock_of(**section: Any) -> GoLiveLock | None:
        return open_lock(cfg.from_dict({"lock": section}).lock)

    assert lock_of(backend="none") is None
    path_lock = lock_of(backend="path", path=str(tmp_path))
    assert isinstance(path_lock, PathLock) and path_lock.directory == tmp_path
    if _libnfs_usable():
        nfs_lock = lock_of(backend="nfs", server="192.0.2.1", export="/share", timeout_ms=300)
        assert isinstance(nfs_lock, NfsLock)
        assert (str(nfs_lock), nfs_lock.timeout_s) == ("nfs://192.0.2.1/share", 0.3)


def test_path_lock_one_winner_per_epoch(tmp_path: Path) -> None:
    lock = PathLock(tmp_path)
    a, b = owner("a", "demo", role="primary"), owner("b", "demo")
    won = lock.test_and_set(a)
    assert won.won and won.holder is not None and won.holder.same_contender(a)
    assert won.holder.time > 1e9
    lost = lock.test_and_set(b)
    assert lost == Verdict(False, won.holder)
    assert lock.holder("demo", 1) == won.holder
    # the holder's own second attempt (its first finished after its caller gave up) wins
    assert lock.test_and_set(a) == Verdict(True, won.holder)
    # a new epoch is a new race; the file names the VM and epoch
    assert lock.test_and_set(owner("b", "demo", epoch=2)).won
    assert not lock.test_and_set(owner("a", "demo", epoch=2)).won
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.epoch-1.lock",
                                                         "demo.epoch-2.lock"]
    assert LockOwner.loads((tmp_path / "demo.epoch-1.lock").read_bytes()) == won.holder
    assert lock.holder("demo", 3) is None


def test_path_lock_incomplete_content(tmp_path: Path) -> None:
    """A winner that has created the file but not yet written it: the loser still loses."""
    (tmp_path / "demo.epoch-1.lock").write_bytes(b'{"host": "a", "pi')
    t0 = time.monotonic()
    assert PathLock(tmp_path).test_and_set(owner("b", "demo")) == Verdict(False, None)
    assert time.monotonic() - t0 < tas.READ_WAIT_S + SLACK_S
    assert PathLock(tmp_path).holder("demo", 1) is None


def test_path_lock_unreachable_directory(tmp_path: Path) -> None:
    lock = PathLock(tmp_path / "not-mounted")
    with pytest.raises(LockUnavailable, match="not-mounted.*create"):
        lock.test_and_set(owner("a", "demo"))


def test_path_lock_race_between_processes(tmp_path: Path,
                                          contenders: list[Contender]) -> None:
    for host in ("a", "b", "c"):
        contenders.append(Contender(None, host, "demo", "--dir", str(tmp_path)))
    race(contenders, ROUNDS)
    assert len(list(tmp_path.iterdir())) == ROUNDS


class StuckLock(GoLiveLock):
    """Storage that never answers (a hard NFS mount whose server is gone)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def __str__(self) -> str:
        return "stuck"

    def _create(self, name: str, content: bytes, deadline: float) -> bool:
        self.entered.set()
        self.release.wait(60)
        return True

    def _read(self, name: str, deadline: float) -> bytes | None:
        return None


def test_acquire_bounds_a_stuck_call() -> None:
    lock = StuckLock()
    t0 = time.monotonic()
    with pytest.raises(LockUnavailable, match="no answer from the shared storage within 0.200 s"):
        asyncio.run(acquire(lock, owner("a", "demo"), 0.2))
    assert time.monotonic() - t0 < 0.2 + SLACK_S
    stuck = [t for t in threading.enumerate() if t.name.startswith("lock test-and-set stuck")]
    assert stuck and all(t.daemon for t in stuck)
    lock.release.set()
    for t in stuck:
        t.join(10)


def test_acquire_hands_back_result_and_errors(tmp_path: Path) -> None:
    verdict = asyncio.run(acquire(PathLock(tmp_path), owner("a", "demo"), 5))
    assert verdict.won
    with pytest.raises(LockUnavailable, match="create"):
        asyncio.run(acquire(PathLock(tmp_path / "gone"), owner("a", "demo"), 5))
    assert asyncio.run(tas.read_holder(PathLock(tmp_path), "demo", 1, 5)) == verdict.holder


def test_stuck_call_does_not_block_interpreter_exit() -> None:
    script = (
        "import asyncio, sys\n"
        f"sys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "from test_test_and_set import StuckLock, owner\n"
        "from vmft_qemu.test_and_set import acquire, LockUnavailable\n"
        "try:\n"
        "    asyncio.run(acquire(StuckLock(), owner('a', 'demo'), 0.1))\n"
        "except LockUnavailable:\n"
        "    print('unavailable', flush=True)\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=30, cwd=REPO)
    assert (res.returncode, res.stdout) == (0, "unavailable\n"), res.stderr


# --- against nfs-ganesha in the storage namespace -------------------------------------

@pytest.fixture(scope="module")
def storage() -> Iterator[tuple[Topology, NfsServer]]:
    """One topology with storage and one server for the module's NFS tests."""
    with Topology(storage=True) as topo, NfsServer(topo.storage) as server:
        yield topo, server


def nfs_lock(server: NfsServer, timeout_ms: int = TIMEOUT_MS) -> NfsLock:
    return NfsLock(STORAGE_IP, server.pseudo, timeout_ms)


@needs_server
def test_server_starts_answers_and_stops() -> None:
    with Topology(hosts=1) as topo:
        server = NfsServer(topo.client)
        run_dir = server.run_dir
        with server:
            pid = server.pid
            assert pid is not None and Path(f"/proc/{pid}").exists()
            assert server.pid_path.read_text().strip() == str(pid)   # ip netns exec execs
            assert topo.client.call(rpc_null, "127.0.0.1")
            assert "Graceless = true" in server.config_path.read_text()
            assert server.start_s is not None and server.start_s < 15
        assert server.proc is None and not Path(f"/proc/{pid}").exists()
        assert not run_dir.exists()
        assert topo.client.pids() == []


@needs_server
def test_server_that_cannot_start_reports_its_log() -> None:
    with Topology(hosts=1) as topo:
        server = NfsServer(topo.client, lease_s=1000)     # out of ganesha's range
        with pytest.raises(NfsServerError, match=r"(?s)exited with status.*out of range"):
            server.start(timeout=15)
        assert server.proc is None and topo.client.pids() == []
        assert not server.run_dir.exists()
    with pytest.raises(ValueError):
        NfsServer(None, pseudo="relative")


@needs_nfs
def test_nfs_race_between_hosts(storage: tuple[Topology, NfsServer],
                                contenders: list[Contender]) -> None:
    topo, server = storage
    vm = vm_name()
    for host in topo.hosts.values():
        contenders.append(Contender(host, host.short, vm, "--nfs", STORAGE_IP, server.pseudo))
    race(contenders, ROUNDS)
    files = sorted(server.export_dir.glob(f"{vm}.epoch-*.lock"))
    assert len(files) == ROUNDS
    for f in files:      # what the server stored is what the contenders saw
        assert LockOwner.loads(f.read_bytes()).host in topo.hosts


@needs_nfs
def test_nfs_new_epoch_new_race_and_round_trip(storage: tuple[Topology, NfsServer]) -> None:
    topo, server = storage
    a, b = topo.hosts["a"], topo.hosts["b"]
    lock, vm = nfs_lock(server), vm_name()
    first = a.call(lock.test_and_set, owner("a", vm, role="primary"))
    assert first.won and first.holder is not None
    assert b.call(lock.test_and_set, owner("b", vm)) == Verdict(False, first.holder)
    assert b.call(lock.holder, vm, 1) == first.holder          # the exact content
    assert a.call(lock.test_and_set, owner("a", vm, role="primary")) == Verdict(True, first.holder)
    second = b.call(lock.test_and_set, owner("b", vm, epoch=2))
    assert second.won
    assert a.call(lock.test_and_set, owner("a", vm, epoch=2)) == Verdict(False, second.holder)
    assert a.call(lock.holder, vm, 3) is None
    on_server = server.export_dir / lock_name(vm, 2)
    assert LockOwner.loads(on_server.read_bytes()) == second.holder
    assert oct(on_server.stat().st_mode & 0o777) == "0o644"


@needs_nfs
def test_nfs_unreachable_storage_is_unavailable(storage: tuple[Topology, NfsServer]) -> None:
    topo, server = storage
    a = topo.hosts["a"]
    lock, vm = nfs_lock(server, timeout_ms=500), vm_name()
    topo.cut_storage()
    try:
        for attempt in (lambda: lock.test_and_set(owner("a", vm)),
                        lambda: lock.holder(vm, 1),
                        lambda: asyncio.run(acquire(lock, owner("a", vm), 0.5))):
            t0 = time.monotonic()
            with pytest.raises(LockUnavailable, match="within 0.5"):
                a.call(attempt, timeout=0.5 + SLACK_S)
            assert time.monotonic() - t0 < 0.5 + SLACK_S
    finally:
        topo.restore_storage()
    assert a.call(lock.test_and_set, owner("a", vm)).won
    assert not (server.export_dir / lock_name(vm, 2)).exists()


@needs_nfs
def test_nfs_host_without_plug_cannot_win(storage: tuple[Topology, NfsServer]) -> None:
    topo, server = storage
    a, b = topo.hosts["a"], topo.hosts["b"]
    lock, vm = nfs_lock(server, timeout_ms=500), vm_name()
    a.pull_plug()
    try:
        with pytest.raises(LockUnavailable):
            a.call(lock.test_and_set, owner("a", vm), timeout=0.5 + SLACK_S)
        assert b.call(lock.test_and_set, owner("b", vm)).won
    finally:
        a.plug_in()
    assert a.call(lock.test_and_set, owner("a", vm)) == \
        Verdict(False, b.call(lock.holder, vm, 1))


@needs_nfs
def test_nfs_wrong_export_is_unavailable(storage: tuple[Topology, NfsServer]) -> None:
    topo, server = storage
    lock = NfsLock(STORAGE_IP, "/no-such-export", TIMEOUT_MS)
    with pytest.raises(LockUnavailable, match="mount"):
        topo.hosts["a"].call(lock.test_and_set, owner("a", vm_name()), timeout=SLACK_S)


@needs_nfs
def test_path_lock_on_the_export_races_nfs_clients(storage: tuple[Topology, NfsServer],
                                                   contenders: list[Contender]) -> None:
    """A local exclusive create in the exported directory and NFS creates: one winner."""
    topo, server = storage
    vm = vm_name()
    contenders.append(Contender(topo.storage, "sto", vm, "--dir", str(server.export_dir)))
    for host in topo.hosts.values():
        contenders.append(Contender(host, host.short, vm, "--nfs", STORAGE_IP, server.pseudo))
    race(contenders, ROUNDS)


@needs_nfs
def test_cli_lock_show(storage: tuple[Topology, NfsServer], tmp_path: Path) -> None:
    topo, server = storage
    a = topo.hosts["a"]
    vm = vm_name()
    conf = tmp_path / "vm.toml"
    conf.write_text(f'[vm]\nname = "{vm}"\n[lock]\nbackend = "nfs"\nserver = "{STORAGE_IP}"\n'
                    f'export = "{server.pseudo}"\ntimeout_ms = 500\nepoch = 3\n')
    show = [sys.executable, "-m", "vmft_qemu", "lock", "show", "--config", str(conf)]

    def run(*extra: str) -> subprocess.CompletedProcess:
        return a.run([*show, *extra], capture_output=True, text=True, timeout=30, cwd=REPO)

    assert run().returncode == 1
    won = a.call(NfsLock(STORAGE_IP, server.pseudo, 500).test_and_set,
                 owner("a", vm, epoch=3, role="primary"))
    res = run()
    assert res.returncode == 0 and "held by the primary on host a (pid 4242)" in res.stdout
    assert json.loads(run("--json").stdout)["holder"] == won.holder.to_json()
    assert run("--epoch", "4").returncode == 1
    topo.cut_storage()
    try:
        res = run()
        assert res.returncode == 2 and "within 0.5" in res.stderr
    finally:
        topo.restore_storage()
