"""Hosts as network namespaces: the paper's physical hosts and LAN, on one machine.

The paper runs the primary and the backup VM on separate physical servers that
share a LAN (where the clients are) and talk over a logging channel.  Tests and
the demo stand those in with network namespaces:

    <prefix>-lan   the LAN: bridge br0
    <prefix>-ft    the FT network: bridge ftnet, for the log channel and heartbeats
    <prefix>-a     FT host "a" (and -b, -c, ...): one namespace per host, with
                     lan0  veth, its peer a port of the LAN's br0; enslaved
                           here to the host bridge hbr0, no IP by default
                     hbr0  the host's bridge: lan0 plus the guest's TAP devices
                     ft0   veth, its peer a port of ftnet; 10.77.0.X/24 (X = 1, 2, ...)
    <prefix>-cli   a client on the LAN: lan0 at 192.168.77.100/24
    <prefix>-sto   with Topology(storage=True): the shared storage (the NFS
                     server of the go-live lock) on the LAN: lan0 at
                     192.168.77.250/24; each FT host then also has a LAN
                     address on hbr0, 192.168.77.(200 + X)/24, to reach it

The prefix is "vmft" plus 4 random hex digits, unique per `Topology`, so
parallel runs and leftovers of crashed runs never clash; every name fits
IFNAMSIZ.  The guest is 192.168.77.10/24 with MAC 52:54:00:77:00:10; its
frames reach the LAN through a TAP device (`Host.add_tap`) that the host's
vmft controller opens and that hbr0 bridges to lan0.

Deleting a namespace deletes its veths, bridges and TAPs; `Topology` deletes
all of its namespaces on exit, also when the body raised.  Each live topology
leaves an owner file (its creator's PID and start time) in /run/vmft-topology;
`cleanup_leftovers` deletes vmft's namespaces whose owner is gone.

All commands are argv lists run through iproute2 (`ip -n NS ...`,
`ip netns exec NS ...`); no shell.  `Netns.call` runs a Python function in a
thread that has entered the namespace (setns), for probes without a process.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import secrets
import select
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Sequence, TypeVar

log = logging.getLogger(__name__)

GUEST_IP = "192.168.77.10"
GUEST_MAC = "52:54:00:77:00:10"
LAN_PREFIX = 24                      # prefix length of the LAN
LAN_NETWORK = "192.168.77.0/24"
CLIENT_IP = "192.168.77.100"
FT_NETWORK = "10.77.0.0/24"
FT_PREFIX = 24
STORAGE_IP = "192.168.77.250"        # the shared storage (Topology(storage=True))
HOST_LAN_BASE = 200                  # with storage: host X is 192.168.77.(200 + X)
STORAGE_PORT = "sto-lan"             # the storage's port on the LAN's br0

NAME_PREFIX = "vmft"
PREFIX_RE = r"vmft[0-9a-f]{4}"       # one topology's prefix
NETNS_RE = re.compile(rf"({PREFIX_RE})-([a-z][a-z0-9]{{0,5}})")  # its namespaces
RESERVED = ("lan", "ft", "cli", "sto")  # namespace suffixes that are not hosts
OWNER_DIR = Path("/run/vmft-topology")
NETNS_DIR = Path("/run/netns")
IFNAMSIZ = 16                        # including the NUL: names up to 15 chars

CMD_TIMEOUT = 30.0                   # per `ip` command
LINK_TIMEOUT = 5.0                   # for a bridge port to start forwarding
POLL_EVERY = 0.02
CLONE_NEWNET = 0x40000000

T = TypeVar("T")


class TopologyError(RuntimeError):
    """A command that builds or changes the topology failed."""

    def __init__(self, cmd: Sequence[str], message: str, returncode: int | None = None,
                 stderr: str = "") -> None:
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stderr = stderr
        detail = f": {stderr.strip()}" if stderr.strip() else ""
        super().__init__(f"{shlex.join(self.cmd)}: {message}{detail}")


# --- commands -------------------------------------------------------------

def _argv(argv: Sequence[str]) -> list[str]:
    if isinstance(argv, (str, bytes)):
        raise TypeError("argv must be a list of arguments, not a shell string")
    return [str(a) for a in argv]


def _run(cmd: Sequence[str], timeout: float = CMD_TIMEOUT) -> str:
    """Run `cmd`; its stdout, or TopologyError with the command and its stderr."""
    cmd = _argv(cmd)
    log.debug("run: %s", shlex.join(cmd))
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL)
    except FileNotFoundError as e:
        raise TopologyError(cmd, f"not found ({e.strerror})") from None
    except subprocess.TimeoutExpired:
        raise TopologyError(cmd, f"timed out after {timeout:.0f} s") from None
    if res.returncode != 0:
        raise TopologyError(cmd, f"exit status {res.returncode}", res.returncode, res.stderr)
    return res.stdout


def _ip(ns: str, *args: str) -> str:
    return _run(["ip", "-n", ns, *args])


def _ip_json(ns: str, *args: str) -> Any:
    out = _run(["ip", "-n", ns, "-j", *args])
    return json.loads(out) if out.strip() else []


def list_netns() -> list[str]:
    """Names of all named network namespaces (`ip netns list`)."""
    out = _run(["ip", "-j", "netns", "list"])
    return [entry["name"] for entry in json.loads(out)] if out.strip() else []


def _check_ifname(name: str) -> str:
    if not name or len(name) >= IFNAMSIZ or "/" in name or name.strip() != name:
        raise ValueError(f"bad interface name {name!r} (1-{IFNAMSIZ - 1} chars)")
    return name


# --- processes ------------------------------------------------------------

def _netns_ident(path: str | Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _start_time(pid: int) -> str | None:
    """A process's start time (field 22 of /proc/PID/stat): with the PID, its identity."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pids_in(ident: tuple[int, int]) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and _netns_ident(f"/proc/{entry.name}/ns/net") == ident:
            pids.append(int(entry.name))
    return sorted(pids)


def _kill_all_in(ns: str, ident: tuple[int, int] | None, timeout: float) -> list[int]:
    """SIGKILL every process in the namespace `ident`; wait up to `timeout` s for them."""
    if ident is None:
        return []
    killed: dict[int, int] = {}
    try:
        for pid in _pids_in(ident):
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            if _netns_ident(f"/proc/{pid}/ns/net") != ident:   # gone and reused meanwhile
                os.close(pidfd)
                continue
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                os.close(pidfd)
                continue
            killed[pidfd] = pid
        if killed:
            log.info("%s: SIGKILL %s", ns, sorted(killed.values()))
            _wait_exited(ns, dict(killed), timeout)
    finally:
        for pidfd in killed:
            os.close(pidfd)
    return sorted(killed.values())


def _wait_exited(ns: str, pidfds: dict[int, int], timeout: float) -> None:
    poller = select.poll()
    for pidfd in pidfds:
        poller.register(pidfd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while pidfds:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TopologyError(["kill", "-KILL", *map(str, pidfds.values())],
                                f"processes in {ns} still alive after {timeout:.0f} s")
        for pidfd, _ in poller.poll(left * 1000):
            poller.unregister(pidfd)
            pidfds.pop(pidfd)


def _enter_netns(name: str) -> None:
    """Move the calling thread into network namespace `name` (setns(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


# --- namespaces -----------------------------------------------------------

class Netns:
    """One named network namespace."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # running commands inside
    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` as a command that runs inside this namespace."""
        return ["ip", "netns", "exec", self.name, *_argv(argv)]

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
        """subprocess.run(argv, **kwargs) inside this namespace."""
        return subprocess.run(self.command(argv), **kwargs)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """subprocess.Popen(argv, **kwargs) inside this namespace."""
        return subprocess.Popen(self.command(argv), **kwargs)

    def iproute(self, *args: str) -> str:
        """`ip -n NAME args...`, checked; its stdout."""
        return _ip(self.name, *args)

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = CMD_TIMEOUT) -> T:
        """fn(*args) in a new thread that has entered this namespace; its result.

        Sockets that `fn` opens are this namespace's.  Its exception is raised
        here; if it has not returned within `timeout` s, TimeoutError (the
        thread is a daemon, so one stuck in a system call never blocks exit).
        """
        outcome: list[tuple[bool, Any]] = []

        def run() -> None:
            try:
                _enter_netns(self.name)
                outcome.append((True, fn(*args)))
            except BaseException as e:   # handed to the caller
                outcome.append((False, e))

        thread = threading.Thread(target=run, name=f"netns-{self.name}", daemon=True)
        thread.start()
        thread.join(timeout)
        if not outcome:
            raise TimeoutError(f"{getattr(fn, '__name__', fn)} in {self.name} did not return "
                               f"within {timeout:.1f} s")
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    # processes
    @property
    def ident(self) -> tuple[int, int] | None:
        return _netns_ident(NETNS_DIR / self.name)

    def pids(self) -> list[int]:
        """PIDs of the processes whose network namespace is this one.

        A command started with `run`/`popen` counts from the moment `ip netns
        exec` has entered the namespace, a little after Popen returns.
        """
        ident = self.ident
        return _pids_in(ident) if ident else []

    def kill_all(self, timeout: float = 5.0) -> list[int]:
        """SIGKILL every process in this namespace and wait (bounded) until they are gone."""
        return _kill_all_in(self.name, self.ident, timeout)

    # links
    def links(self) -> list[dict[str, Any]]:
        return _ip_json(self.name, "-d", "link", "show")

    def link(self, dev: str) -> dict[str, Any]:
        return _ip_json(self.name, "-d", "link", "show", "dev", dev)[0]

    def set_link(self, dev: str, up: bool) -> None:
        self.iproute("link", "set", "dev", dev, "up" if up else "down")

    def wait_link(self, dev: str, timeout: float = LINK_TIMEOUT) -> None:
        """Wait until `dev` is operationally up and, if a bridge port, forwarding."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.link(dev)
            slave = info.get("linkinfo", {}).get("info_slave_data", {})
            if info.get("operstate") == "UP" and slave.get("state", "forwarding") == "forwarding":
                return
            if time.monotonic() > deadline:
                raise TopologyError(["ip", "-n", self.name, "link", "show", "dev", dev],
                                    f"not up and forwarding after {timeout:.0f} s "
                                    f"(operstate {info.get('operstate')}, "
                                    f"port state {slave.get('state')})")
            time.sleep(POLL_EVERY)

    def add_bridge(self, name: str) -> None:
        self.iproute("link", "add", "name", name, "type", "bridge", "forward_delay", "0",
                "stp_state", "0")
        self.set_link(name, True)


class Host(Netns):
    """An FT host: LAN link lan0 (in bridge hbr0, with the guest's TAPs) and FT link ft0."""

    def __init__(self, topology: Topology, name: str, short: str, index: int) -> None:
        super().__init__(name)
        self.topology = topology
        self.short = short                      # "a", "b", ...
        self.index = index                      # 1, 2, ...
        self.ft_ip = f"10.77.0.{index}"
        self.lan_port = f"{short}-lan"          # lan0's peer on the LAN's br0
        self.ft_port = f"{short}-ft"            # ft0's peer on ftnet
        self.lan_ip: str | None = None          # set with Topology(storage=True)
        self.taps: list[str] = []

    def add_tap(self, name: str) -> str:
        """Create a persistent TAP device here, in bridge hbr0 and up; return its name.

        It has no carrier (and its hbr0 port does not forward) until someone
        opens it with IFF_TAP|IFF_NO_PI inside this namespace.
        """
        _check_ifname(name)
        self.iproute("tuntap", "add", "dev", name, "mode", "tap")
        self.taps.append(name)
        self.iproute("link", "set", "dev", name, "master", "hbr0", "up")
        log.info("%s: TAP %s in hbr0", self.name, name)
        return name

    def add_lan_ip(self, cidr: str) -> None:
        """Give the host itself an address on the LAN (on hbr0), e.g. for tests."""
        self.iproute("addr", "add", cidr, "dev", "hbr0")

    def del_lan_ip(self, cidr: str) -> None:
        self.iproute("addr", "del", cidr, "dev", "hbr0")

    def cut_ft_link(self, at_host: bool = False) -> None:
        """Partition this host from the others on the FT network; the LAN stays.

        By default the switch side goes down (ftnet's port for ft0): like a cut
        cable, ft0 loses carrier and keeps its address and routes, so traffic
        is silently lost.  `at_host=True` sets ft0 itself down instead (its
        route goes, and sends fail at once with ENETUNREACH).
        """
        if at_host:
            self.set_link("ft0", False)
        else:
            _ip(self.topology.ftnet.name, "link", "set", "dev", self.ft_port, "down")
        log.info("%s: FT link cut%s", self.name, " at the host" if at_host else "")

    def restore_ft_link(self, timeout: float = LINK_TIMEOUT) -> None:
        """Undo `cut_ft_link` (either kind); return once the link forwards again."""
        ftnet = self.topology.ftnet
        ftnet.set_link(self.ft_port, True)
        self.set_link("ft0", True)
        ftnet.wait_link(self.ft_port, timeout)
        self.wait_link("ft0", timeout)
        log.info("%s: FT link restored", self.name)

    def pull_plug(self) -> None:
        """Set every link of this host down (lan0, ft0, hbr0, TAPs; not lo).

        Its processes keep running: stopping them is the caller's job
        (`pids()`, `kill_all()`).
        """
        for dev in self._devices():
            self.set_link(dev, False)
        log.info("%s: plug pulled", self.name)

    def plug_in(self, timeout: float = LINK_TIMEOUT) -> None:
        """Set every link of this host up again; return once lan0 and ft0 forward."""
        for dev in self._devices():
            self.set_link(dev, True)
        self._wait_ready(timeout)
        log.info("%s: plugged in", self.name)

    def _devices(self) -> list[str]:
        return [link["ifname"] for link in self.links() if link["ifname"] != "lo"]

    def _wait_ready(self, timeout: float = LINK_TIMEOUT) -> None:
        self.topology.lan.wait_link(self.lan_port, timeout)
        self.topology.ftnet.wait_link(self.ft_port, timeout)
        self.wait_link("lan0", timeout)
        self.wait_link("ft0", timeout)
        self.wait_link("hbr0", timeout)


class Client(Netns):
    """A client machine on the LAN."""

    def __init__(self, name: str, ip: str = CLIENT_IP) -> None:
        super().__init__(name)
        self.ip = ip


# --- the topology -----------------------------------------------------------

class Topology:
    """A LAN, an FT network, N FT hosts and a client, each a network namespace.

        with Topology() as topo:
            a, b = topo.hosts["a"], topo.hosts["b"]
            tap = a.add_tap("vmtap0")
            a.run(["vmft", "primary", ...])
            topo.client.run(["busybox", "ping", "-c1", "-W2", GUEST_IP])
    """

    def __init__(self, hosts: int | Sequence[str] = 2, ipv6: bool = False,
                 storage: bool = False) -> None:
        names = [chr(ord("a") + i) for i in range(hosts)] if isinstance(hosts, int) else list(hosts)
        if not 1 <= len(names) <= 254:
            raise ValueError("need 1 to 254 hosts")
        most = int(STORAGE_IP.rsplit(".", 1)[1]) - HOST_LAN_BASE - 1
        if storage and len(names) > most:
            raise ValueError(f"with storage, at most {most} hosts (LAN addresses "
                             f"192.168.77.{HOST_LAN_BASE + 1}-{HOST_LAN_BASE + most})")
        for short in names:
            if short in RESERVED or not re.fullmatch(r"[a-z][a-z0-9]{0,5}", short):
                raise ValueError(f"bad host name {short!r}: 1-6 of [a-z0-9], "
                                 f"starting with a letter, not one of {RESERVED}")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate host names in {names}")
        self.ipv6 = ipv6
        self.prefix = _new_prefix()
        self.lan = Netns(f"{self.prefix}-lan")
        self.ftnet = Netns(f"{self.prefix}-ft")
        self.client = Client(f"{self.prefix}-cli")
        self.hosts: dict[str, Host] = {
            short: Host(self, f"{self.prefix}-{short}", short, i)
            for i, short in enumerate(names, start=1)
        }
        self.storage: Netns | None = Netns(f"{self.prefix}-sto") if storage else None
        if storage:
            for host in self.hosts.values():
                host.lan_ip = f"192.168.77.{HOST_LAN_BASE + host.index}"
        self._created: list[str] = []
        self._started = False
        self._closed = False

    def __repr__(self) -> str:
        return f"Topology({self.prefix!r}, hosts={list(self.hosts)})"

    def host(self, short: str) -> Host:
        return self.hosts[short]

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this topology has (or will have), by name."""
        return [self.lan.name, self.ftnet.name, *(h.name for h in self.hosts.values()),
                self.client.name, *([self.storage.name] if self.storage else [])]

    # the shared storage
    def cut_storage(self) -> None:
        """Cut the storage off the LAN (its port on br0 goes down): nobody reaches it.

        Like `Host.cut_ft_link`: the storage's lan0 loses carrier, and traffic
        to it is silently lost (until ARP gives up: then EHOSTUNREACH).
        """
        storage = self._storage()
        self.lan.set_link(STORAGE_PORT, False)
        log.info("storage %s: cut off the LAN", storage.name)

    def restore_storage(self, timeout: float = LINK_TIMEOUT) -> None:
        """Undo `cut_storage`; return once its link forwards again."""
        storage = self._storage()
        self.lan.set_link(STORAGE_PORT, True)
        self.lan.wait_link(STORAGE_PORT, timeout)
        storage.wait_link("lan0", timeout)
        log.info("storage %s: back on the LAN", storage.name)

    def _storage(self) -> Netns:
        if self.storage is None:
            raise RuntimeError(f"{self} has no storage: use Topology(storage=True)")
        return self.storage

    # lifecycle
    def __enter__(self) -> Topology:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(raise_errors=exc is None)

    def start(self) -> Topology:
        if self._started:
            raise RuntimeError(f"{self} already started")
        self._started = True
        _write_owner(self.prefix)
        try:
            self._build()
        except BaseException:
            self.close(raise_errors=False)
            raise
        log.info("topology %s up: hosts %s (FT %s), client %s", self.prefix,
                 ", ".join(f"{h.short}={h.name}" for h in self.hosts.values()),
                 ", ".join(h.ft_ip for h in self.hosts.values()), self.client.name)
        return self

    def close(self, raise_errors: bool = True) -> None:
        """Kill what still runs in the namespaces and delete them all (idempotent)."""
        if self._closed:
            return
        self._closed = True
        errors = []
        # hosts and the client first, the switches last
        for name in sorted(self._created, key=lambda n: n in (self.lan.name, self.ftnet.name)):
            try:
                _delete_netns(name)
            except (TopologyError, OSError) as e:
                log.error("topology %s: cannot delete %s: %s", self.prefix, name, e)
                errors.append(e)
        self._created.clear()
        if not errors:
            (OWNER_DIR / self.prefix).unlink(missing_ok=True)
            log.info("topology %s down", self.prefix)
        if errors and raise_errors:
            raise errors[0]

    # building
    def _add_netns(self, ns: Netns) -> None:
        _run(["ip", "netns", "add", ns.name])
        self._created.append(ns.name)
        ns.set_link("lo", True)
        if not self.ipv6:   # keep the LAN quiet: no router solicitations, MLD, DAD
            _run(ns.command(["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
                             "net.ipv6.conf.default.disable_ipv6=1"]))

    def _veth(self, switch: Netns, bridge: str, port: str, ns: Netns, ifname: str) -> None:
        """A veth: `port` in `bridge` of `switch`, `ifname` in `ns` (both up)."""
        switch.iproute("link", "add", "name", _check_ifname(port), "type", "veth",
                  "peer", "name", _check_ifname(ifname), "netns", ns.name)
        switch.iproute("link", "set", "dev", port, "master", bridge, "up")
        ns.set_link(ifname, True)

    def _build(self) -> None:
        self._add_netns(self.lan)
        self.lan.add_bridge("br0")
        self._add_netns(self.ftnet)
        self.ftnet.add_bridge("ftnet")
        for host in self.hosts.values():
            self._add_netns(host)
            host.add_bridge("hbr0")
            self._veth(self.lan, "br0", host.lan_port, host, "lan0")
            host.iproute("link", "set", "dev", "lan0", "master", "hbr0")
            self._veth(self.ftnet, "ftnet", host.ft_port, host, "ft0")
            host.iproute("addr", "add", f"{host.ft_ip}/{FT_PREFIX}", "dev", "ft0")
        self._add_netns(self.client)
        self._veth(self.lan, "br0", "cli-lan", self.client, "lan0")
        self.client.iproute("addr", "add", f"{self.client.ip}/{LAN_PREFIX}", "dev", "lan0")
        if self.storage:
            self._add_netns(self.storage)
            self._veth(self.lan, "br0", STORAGE_PORT, self.storage, "lan0")
            self.storage.iproute("addr", "add", f"{STORAGE_IP}/{LAN_PREFIX}", "dev", "lan0")
            for host in self.hosts.values():
                host.add_lan_ip(f"{host.lan_ip}/{LAN_PREFIX}")
        for host in self.hosts.values():
            host._wait_ready()
        self.lan.wait_link("cli-lan")
        self.client.wait_link("lan0")
        if self.storage:
            self.lan.wait_link(STORAGE_PORT)
            self.storage.wait_link("lan0")


# --- ownership and leftovers -------------------------------------------------

def _new_prefix() -> str:
    taken = {m.group(1) for n in list_netns() if (m := NETNS_RE.fullmatch(n))}
    taken |= {p.name for p in OWNER_DIR.glob(f"{NAME_PREFIX}*")} if OWNER_DIR.is_dir() else set()
    for _ in range(100):
        prefix = NAME_PREFIX + secrets.token_hex(2)
        if prefix not in taken:
            return prefix
    raise TopologyError(["ip", "netns", "list"], "no free topology prefix")


def _write_owner(prefix: str) -> None:
    OWNER_DIR.mkdir(parents=True, exist_ok=True)
    (OWNER_DIR / prefix).write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")


def _owner_alive(prefix: str) -> bool:
    try:
        pid_s, start = (OWNER_DIR / prefix).read_text().split()
    except (OSError, ValueError):
        return False
    return _start_time(int(pid_s)) == start


def _delete_netns(name: str, timeout: float = 5.0) -> None:
    killed = _kill_all_in(name, _netns_ident(NETNS_DIR / name), timeout)
    if killed:
        log.warning("netns %s: killed processes still in it: %s", name, killed)
    _run(["ip", "netns", "delete", name])


def cleanup_leftovers(prefix_pattern: str = PREFIX_RE, include_live: bool = False) -> list[str]:
    """Delete vmft topology namespaces left behind by crashed runs; return their names.

    Only namespaces of vmft's naming scheme ("vmft" + 4 hex digits + "-" + role)
    whose prefix also matches the regular expression `prefix_pattern` (in
    full) are candidates, and of those only the ones whose creating process is
    gone, unless `include_live`.  Processes still inside them are killed.
    """
    removed = []
    by_prefix: dict[str, list[str]] = {}
    for name in list_netns():
        m = NETNS_RE.fullmatch(name)
        if m and re.fullmatch(prefix_pattern, m.group(1)):
            by_prefix.setdefault(m.group(1), []).append(name)
    for prefix, names in sorted(by_prefix.items()):
        if not include_live and _owner_alive(prefix):
            log.debug("leaving %s: its owner is alive", prefix)
            continue
        for name in names:
            _delete_netns(name)
            removed.append(name)
        (OWNER_DIR / prefix).unlink(missing_ok=True)
    if removed:
        log.info("removed leftover namespaces: %s", ", ".join(removed))
    return removed
