"""An FT pair on one machine: a backup and a primary controller as processes.

What `vmft demo`, the benchmarks and the tests use to run both sides here,
each side a separate `vmft` process as it would be on its own host.  Every
process is started in its own session and stopped by process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Iterator

from . import status
from .events import read_jsonl
from .nfs_server import NfsServer
from .topology import GUEST_IP, GUEST_MAC, LAN_PREFIX, STORAGE_IP, Host, Topology
from .waiting import wait_for

ROLES = ("primary", "backup")
TAP = "vmft0"  # each host's TAP for the guest, in its LAN bridge


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPair:
    """Both controllers of one VM, run from one directory."""

    def __init__(self, root: Path, workload: str = "ticks", name: str | None = None,
                 log_port: int | None = None, primary_target_port: int | None = None,
                 network: Topology | None = None, extra_config: str = "",
                 primary_target_address: str | None = None, lock: str | None = None,
                 failure: str = "", nfs: NfsServer | None = None,
                 launcher: str = "qemu", primary: str = "") -> None:
        """With `network`, the primary runs on host "a" and the backup on "b"
        of that topology, the guest has a NIC on its LAN, and the log channel
        runs over the hosts' FT link; without, both run here on loopback.
        `lock` is the [lock] table's body; by default both sides share a
        lock directory under `root` (one machine: shared storage for free),
        or with `nfs` (a server in the network's storage namespace) they
        speak NFS to it.
        `failure` is added to the [failure] table, `primary` to the
        [primary] table.  `launcher`: who starts
        both QEMUs (vm.launcher: "qemu" or "libvirt")."""
        self.root = root
        self.log_port = log_port or free_port()
        self.name = name or f"vm{self.log_port}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.hosts: dict[str, Host] = {}
        self.network = network
        root.mkdir(parents=True, exist_ok=True)
        address, nic = "127.0.0.1", ""
        if network is not None:
            self.hosts = {"primary": network.hosts["a"], "backup": network.hosts["b"]}
            for host in network.hosts.values():
                host.add_tap(TAP)
            address = network.hosts["b"].ft_ip
            nic = f'mac = "{GUEST_MAC}"\nip = "{GUEST_IP}/{LAN_PREFIX}"\n'
        tap = f'tap = "{TAP}"\n' if nic else ""
        if lock is None and nfs is not None:
            lock = f'backend = "nfs"\nserver = "{STORAGE_IP}"\nexport = "{nfs.pseudo}"\n'
        if lock is None:
            (root / "locks").mkdir(exist_ok=True)
            lock = f'backend = "path"\npath = "{root / "locks"}"\n'
        self.heartbeat_port = free_port()
        # Each side's Prometheus endpoint (in its host's netns with `network`).
        self.metrics_port = {role: free_port() for role in ROLES}
        # The backup listens on log_port; the primary connects to
        # primary_target_port when something (a fault proxy) sits between them.
        targets = {"primary": (primary_target_address or address,
                               primary_target_port or self.log_port),
                   "backup": (address, self.log_port)}
        for role, (addr, port) in targets.items():
            self.config(role).write_text(
                f'[vm]\nname = "{self.name}"\nworkload = "{workload}"\n{nic}'
                f'launcher = "{launcher}"\n'
                f'[primary]\nrun_dir = "{self.run_dir("primary")}"\n{tap}'
                f'metrics_port = {self.metrics_port["primary"]}\n{primary}'
                f'[backup]\nrun_dir = "{self.run_dir("backup")}"\n{tap}'
                f'metrics_port = {self.metrics_port["backup"]}\n'
                f'address = "{addr}"\nlog_port = {port}\n'
                f'[failure]\nheartbeat_port = {self.heartbeat_port}\n{failure}'
                f'[lock]\n{lock}{extra_config}')

    def config(self, role: str) -> Path:
        return self.root / f"{role}.toml"

    def run_dir(self, role: str) -> Path:
        return self.root / role

    def console(self, role: str) -> list[str]:
        try:
            return (self.run_dir(role) / "console.log").read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def output(self, role: str) -> str:
        return (self.root / f"{role}.out").read_text(errors="replace")

    def start(self, role: str) -> None:
        argv = [sys.executable, "-m", "vmft_qemu", role, "--config", str(self.config(role))]
        if role in self.hosts:
            argv = self.hosts[role].command(argv)
        with open(self.root / f"{role}.out", "wb") as out:
            self.procs[role] = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)

    def start_both(self, timeout: float = 30) -> None:
        """Backup first (it listens), then the primary."""
        self.start("backup")
        wait_for(lambda: self.alive("backup") and self.status("backup"), timeout,
                 "the backup controller to answer")
        self.start("primary")

    def wait_protected(self, timeout: float = 240) -> None:
        """Until the backup has replayed the guest's network bring-up and caught up."""
        wait_for(lambda: "VMFT-NET-UP " + GUEST_IP in self.console("backup"), timeout,
                 "the backup to replay the guest's network bring-up")
        try:
            wait_for(lambda: self.status("primary").get("lag_ms", 1e9) < 500, timeout,
                     "the backup to catch up")
        except TimeoutError as e:
            raise TimeoutError(f"{e}: {self.standing('state', 'lag_ms', 'errors')}") from None

    def wait_released(self, frames: int, timeout: float = 60) -> None:
        """Until the primary's output gate has released `frames` frames."""
        wait_for(lambda: (self.status("primary").get("gate") or {}).get("released", 0)
                 >= frames, timeout, f"{frames} frames through the primary's gate")

    def client(self, *args: str) -> subprocess.Popen[str]:
        """`python -m vmft_qemu.client ARGS` on the client host; its stdout is JSON."""
        assert self.network is not None, "a client needs the pair's network"
        return self.network.client.popen(
            [sys.executable, "-m", "vmft_qemu.client", *args, "--host", GUEST_IP],
            stdout=subprocess.PIPE, text=True)

    def counted(self) -> int:
        """The guest's counter as a client reads it (GET)."""
        out, _ = self.client("counter", "--get", "--count", "1", "--retries", "3").communicate(
            timeout=120)
        result = json.loads(out)
        if result["error"] is not None:
            raise RuntimeError(f"could not read the counter: {result['error']}")
        return result["answers"][0]

    def alive(self, role: str) -> bool:
        proc = self.procs[role]
        if proc.poll() is not None:
            raise RuntimeError(f"{role} controller exited with {proc.returncode}: "
                               f"{self.output(role)[-2000:]}")
        return True

    def status(self, role: str) -> dict[str, Any]:
        """The controller's snapshot, or {} while it is not answering."""
        return status.ask(self.run_dir(role) / status.SOCKET_NAME)

    def standing(self, *keys: str) -> str:
        """Where both sides stand: `keys` of each one's status, as JSON (for errors)."""
        return json.dumps({role: {k: self.status(role).get(k) for k in keys} for role in ROLES})

    def metrics(self, role: str) -> str:
        """The side's Prometheus text, scraped over HTTP in its host's network."""
        def scrape() -> str:
            url = f"http://127.0.0.1:{self.metrics_port[role]}/metrics"
            with urllib.request.urlopen(url, timeout=10) as answer:
                return answer.read().decode()

        return self.hosts[role].call(scrape) if role in self.hosts else scrape()

    def events(self, role: str) -> list[dict[str, Any]]:
        path = self.run_dir(role) / "events.jsonl"
        return read_jsonl(path) if path.exists() else []

    def wait_exit(self, role: str, timeout: float) -> int:
        return self.procs[role].wait(timeout)

    def shutdown(self, timeout: float = 60) -> dict[str, int]:
        """Clean stop: SIGTERM the primary; the backup replays the shutdown."""
        self.procs["primary"].send_signal(signal.SIGTERM)
        return {role: self.procs[role].wait(timeout) for role in ROLES if role in self.procs}

    def stop(self) -> None:
        """Stop everything this pair started, whatever state it is in."""
        stop_processes(self.procs.values())
        for role in ROLES:
            for pid in _pids_using(self.run_dir(role) / "qmp.sock"):
                os.kill(pid, signal.SIGKILL)


def stop_processes(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each process group, SIGKILL what is left after 15 s; reap them."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@contextlib.contextmanager
def lan_with_storage(root: Path) -> Iterator[tuple[Topology, NfsServer]]:
    """Hosts, LAN, client and a storage namespace serving the go-live lock over NFS."""
    with Topology(storage=True) as topo:
        assert topo.storage is not None
        with NfsServer(topo.storage, run_dir=root / "nfs") as nfs:
            yield topo, nfs


def pull_the_plug(host: Host) -> float:
    """Take every link of `host` down and SIGKILL all its processes; returns when
    (time.monotonic()) the plug was pulled."""
    at = time.monotonic()
    host.pull_plug()
    host.kill_all()
    return at


def _pids_using(marker: Path) -> list[int]:
    """QEMUs whose command line names `marker` (left over after a controller died)."""
    found = subprocess.run(["pgrep", "-f", str(marker)], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


class SpareHosts(LocalPair):
    """One VM on several netns hosts that take turns: a primary, its backup and
    standbys (`vmft protect`) for re-protection (`reprotect`).

    Every host has one config: `backup.*` is the host itself (where its
    standby listens), `protect.hosts` lists every host.  The first primary
    joins a standby like any primary without a backup.  Keyed by host name
    ("a", "b", ...) where `LocalPair` is keyed by role."""

    def __init__(self, root: Path, network: Topology, workload: str = "ticks",
                 extra_config: str = "") -> None:
        self.root = root
        self.network = network
        self.hosts = dict(network.hosts)
        self.log_port = free_port()
        self.heartbeat_port = free_port()
        self.name = f"vm{self.log_port}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.side: dict[str, str] = {}  # host -> "primary" or "backup": its run dir
        (root / "locks").mkdir(parents=True, exist_ok=True)
        everyone = ", ".join(f'"{h.ft_ip}:{self.log_port}"' for h in self.hosts.values())
        for short, host in self.hosts.items():
            host.add_tap(TAP)
            self.config(short).write_text(
                f'[vm]\nname = "{self.name}"\nworkload = "{workload}"\n'
                f'mac = "{GUEST_MAC}"\nip = "{GUEST_IP}/{LAN_PREFIX}"\n'
                f'[primary]\nrun_dir = "{root / short / "primary"}"\ntap = "{TAP}"\n'
                f'[backup]\nrun_dir = "{root / short / "backup"}"\ntap = "{TAP}"\n'
                f'address = "{host.ft_ip}"\nlog_port = {self.log_port}\n'
                f'[failure]\nheartbeat_port = {self.heartbeat_port}\n'
                f'[lock]\nbackend = "path"\npath = "{root / "locks"}"\n'
                f'[protect]\nhosts = [{everyone}]\n{extra_config}')

    def run_dir(self, host: str) -> Path:
        return self.root / host / self.side.get(host, "backup")

    def start(self, host: str, command: str = "protect") -> None:
        """`vmft primary` (a new VM) or `vmft protect` (a standby) on `host`."""
        self.side[host] = "primary" if command == "primary" else "backup"
        argv = self.hosts[host].command(
            [sys.executable, "-m", "vmft_qemu", command, "--config", str(self.config(host))])
        with open(self.root / f"{host}.out", "ab") as out:
            self.procs[host] = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)

    def role_of(self, host: str) -> str | None:
        """"primary" (the VM runs here), "backup" (protecting it), "standby" or None."""
        snap = self.status(host) if self.procs.get(host) and self.procs[host].poll() is None \
            else {}
        if snap.get("role") == "primary":
            return "primary"
        if snap.get("role") == "backup":
            return "standby" if snap.get("state") in ("standby", "joining") else "backup"
        return None

    def wait_pair(self, timeout: float = 120) -> tuple[str, str]:
        """Until some host's primary is protected by another host's replay that has
        caught up; returns (primary host, backup host)."""
        def pair() -> tuple[str, str] | None:
            roles = {h: self.role_of(h) for h in self.hosts}
            primary = next((h for h, r in roles.items() if r == "primary"), None)
            backup = next((h for h, r in roles.items() if r == "backup"), None)
            if primary is None or backup is None:
                return None
            snap = self.status(primary)
            if snap.get("state") not in ("protected", "lagging") or snap.get("lag_ms", 1e9) > 500:
                return None
            return primary, backup
        try:
            return wait_for(pair, timeout, "a protected pair")
        except TimeoutError as e:
            states = {h: self.status(h).get("state") for h in self.hosts}
            raise TimeoutError(f"{e}: {states}") from None

    def pull_plug(self, host: str) -> None:
        """Kill `host` (links down, every process SIGKILLed), then plug it in empty."""
        pull_the_plug(self.hosts[host])
        self.procs.pop(host).wait(10)
        self.hosts[host].plug_in()

    def stop(self) -> None:
        stop_processes(self.procs.values())
        for host in self.hosts.values():
            host.kill_all()
