"""The cluster: FT hosts steered from one place, over SSH to each host's agent.

The paper's FT VMs live in a cluster whose management service places each
VM's primary and backup on different hosts, starts them, and starts a new
backup elsewhere when one side's host fails.  `vmft cluster` is that service
for vmft: it reads an inventory, reaches every host's agent (agent.py) over
SSH (paramiko; the host key must already be in the inventory's known_hosts
file: an unknown or changed key is refused, never added), places each VM's
two sides on different hosts, and starts, stops and shows them.  On a host it
only ever runs one fixed command, `VMFT agent call --socket PATH` (quoted
with shlex), and the request travels as JSON on that command's stdin.

The inventory is a small TOML file (not the ansible inventory: the cluster
needs per-VM settings and must run where no ansible is installed; the ansible
group `ft_hosts` and this file name the same hosts):

    [cluster]
    user = "root"                            # SSH user on every host
    identity = "/root/.ssh/id_ed25519"       # SSH private key
    known_hosts = "/etc/vmft/known_hosts"    # the hosts' keys; others are refused
    vmft = "/opt/vmft/venv/bin/vmft"         # the vmft command on the hosts
    agent_socket = "/run/vmft/agent.sock"    # where each host's agent listens
    run_root = "/var/lib/vmft/vms"           # the controllers' run dirs: RUN_ROOT/VM.HOST
    image_cache = "/var/cache/vmft/images"
    connect_timeout_s = 5                    # for SSH to connect, and a host to open a session

    [lock]                                   # the go-live lock on shared storage,
    backend = "nfs"                          # as in a pair's [lock] (`vmft config example`)
    server = "192.168.77.250"
    export = "/vmft"

    [hosts.a]
    address = "192.168.77.201"               # where SSH reaches the host
    port = 22
    ft_address = "10.77.0.1"                 # its address on the FT network (log channel)
    tap = "vmft0"                            # its TAP in the LAN bridge, for the guest's NIC
    launcher = "qemu"                        # "libvirt": this host's libvirtd starts its QEMUs
    # agent_socket, run_root, libvirt_uri: this host's own, if they differ

    [vms.web]
    workload = "ticks"
    memory_mib = 256
    mac = "52:54:00:77:00:10"
    ip = "192.168.77.10/24"
    log_port = 7400                          # the backup listens here for the log channel
    heartbeat_port = 7401
    hosts = []                               # [] : vmft places it; ["a", "b"]: primary, backup

Placement: the primary goes to the reachable host with the fewest running
controllers, the backup to the next one (ties: inventory order), and a
standby (`vmft protect`) to the next one after that, if there is a third
host.  Each side's QEMU is started as its host says (`launcher`: by the
controller, or by the host's libvirtd, so the VM shows in its `virsh list`).  Every start of a pair gets a new lock epoch (milliseconds since 1970),
so a lock left on the share by an earlier failover never decides a later pair.

Re-protection (the paper's "a new backup VM is started on another host"):
the pair's config lists every host's log-channel address under
`protect.hosts`, so when one side's host fails and the other runs the VM
alone, it joins the standby by itself (reprotect.py) and the VM is protected
again, now on the standby's host.  `vmft cluster protect VM` starts a new
standby on the least-loaded spare host for a VM that has none.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import socket
import sys
import textwrap
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import paramiko

from . import config as cfg
from .events import emit
from .waiting import wait_for

log = logging.getLogger(__name__)

STOP_TIMEOUT = 120.0           # for both sides to end after a clean stop (the backup
                               # replays up to the shutdown first)
CALL_TIMEOUT = 90.0            # one agent request over SSH (a start waits for the controller)
INFO_TIMEOUT = 15.0            # one host's info (its agent asks each of its controllers)
PLUG_PROBE_S = 0.5             # s a probe of a pulled host's SSH port waits for an answer, and between probes


class ClusterError(RuntimeError):
    """A cluster operation that cannot be done; the message says why."""


class HostUnreachable(ClusterError):
    """SSH to the host (or its agent) failed."""


# --- the inventory ---------------------------------------------------------------

def _host_list(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or len(v) not in (0, 2) or not all(isinstance(h, str) for h in v):
        raise ValueError('must be [] (placed by vmft) or ["PRIMARY-HOST", "BACKUP-HOST"]')
    if v and v[0] == v[1]:
        raise ValueError("the primary and the backup must be on different hosts")
    return tuple(v)


def _optional_path(v: Any) -> Path | None:
    return None if v == "" else cfg._path(v)


_HOSTNAME = cfg._string(r"[\w.:-]+", "a host name or address")
_VM = cfg.SCHEMA["vm"]

SCHEMA: dict[str, dict[str, tuple[Callable[[Any], Any], Any]]] = {
    "cluster": {
        "user": (cfg._string(r"[a-z_][a-z0-9_-]{0,31}", "a user name"), "root"),
        "identity": (cfg._path, "/root/.ssh/id_ed25519"),
        "known_hosts": (cfg._path, "/etc/vmft/known_hosts"),
        "vmft": (cfg._path, "/opt/vmft/venv/bin/vmft"),
        "agent_socket": (cfg._path, "/run/vmft/agent.sock"),
        "run_root": (cfg._path, "/var/lib/vmft/vms"),
        "image_cache": _VM["image_cache"],
        "connect_timeout_s": (cfg._int_range(1, 300), 5),
    },
    "host": {
        "address": (_HOSTNAME, None),
        "port": (cfg._int_range(1, 65535), 22),
        "ft_address": (cfg._address, None),
        "tap": (cfg._string(cfg._IFNAME, cfg._IFNAME_TEXT), "vmft0"),
        "agent_socket": (_optional_path, ""),
        "run_root": (_optional_path, ""),
        "launcher": _VM["launcher"],
        "libvirt_uri": _VM["libvirt_uri"],
    },
    "vm": {
        **{key: _VM[key] for key in ("workload", "memory_mib", "icount_shift", "disk",
                                     "mac", "ip")},
        "log_port": cfg.SCHEMA["backup"]["log_port"],
        "heartbeat_port": cfg.SCHEMA["failure"]["heartbeat_port"],
        "hosts": (_host_list, []),
    },
}


@dataclass(frozen=True)
class HostSpec:
    name: str
    address: str
    port: int
    ft_address: str
    tap: str
    agent_socket: Path
    run_root: Path
    launcher: str = "qemu"
    libvirt_uri: str = "qemu:///system"


@dataclass(frozen=True)
class VMSpec:
    name: str
    settings: dict[str, Any]       # the [vm] keys of the pair's config
    log_port: int
    heartbeat_port: int
    hosts: tuple[str, ...]


@dataclass(frozen=True)
class Inventory:
    user: str
    identity: Path
    known_hosts: Path
    vmft: Path
    image_cache: Path
    connect_timeout_s: int
    lock: dict[str, Any]
    hosts: dict[str, HostSpec]
    vms: dict[str, VMSpec]
    source: str = "<dict>"


def _tables(raw: dict[str, Any], name: str, source: str) -> dict[str, dict[str, Any]]:
    given = raw.get(name, {})
    if not isinstance(given, dict) or not all(isinstance(t, dict) for t in given.values()):
        raise cfg.ConfigError(f"{source}: [{name}.NAME] tables expected")
    kind = name.rstrip("s")
    out = {}
    for key, table in given.items():
        if not re.fullmatch(r"[A-Za-z0-9-]{1,32}", key):
            raise cfg.ConfigError(f"{source}: [{name}.{key}]: names are 1 to 32 letters, "
                                  "digits or '-'")
        out[key] = cfg._section({kind: table}, kind, f"{source}: [{name}.{key}]", SCHEMA)
    return out


def inventory_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Inventory:
    for name in raw:
        if name not in ("cluster", "lock", "hosts", "vms"):
            raise cfg.ConfigError(f"{source}: [{name}]: unknown section; allowed: "
                                  "cluster, lock, hosts, vms")
    top = cfg._section(raw, "cluster", source, SCHEMA)
    lock = cfg._section(raw, "lock", source)
    if lock["backend"] == "nfs" and not lock["server"]:
        raise cfg.ConfigError(f"{source}: lock.server: backend \"nfs\" needs the server's address")
    hosts = {name: HostSpec(name=name, address=t["address"], port=t["port"],
                            ft_address=t["ft_address"], tap=t["tap"],
                            agent_socket=t["agent_socket"] or top["agent_socket"],
                            run_root=t["run_root"] or top["run_root"],
                            launcher=t["launcher"], libvirt_uri=t["libvirt_uri"])
             for name, t in _tables(raw, "hosts", source).items()}
    if len(hosts) < 2:
        raise cfg.ConfigError(f"{source}: [hosts.NAME]: an FT pair needs at least two hosts")
    vms = {}
    for name, t in _tables(raw, "vms", source).items():
        for host in t["hosts"]:
            if host not in hosts:
                raise cfg.ConfigError(f"{source}: vms.{name}.hosts: no host {host!r} in "
                                      f"[hosts] ({', '.join(hosts)})")
        # As written (the pair's config checks them again, in its own types).
        settings = {k: v for k, v in raw["vms"][name].items() if k in _VM}
        vms[name] = VMSpec(name, settings, t["log_port"], t["heartbeat_port"], t["hosts"])
    return Inventory(user=top["user"], identity=top["identity"],
                     known_hosts=top["known_hosts"], vmft=top["vmft"],
                     image_cache=top["image_cache"],
                     connect_timeout_s=top["connect_timeout_s"], lock=lock, hosts=hosts,
                     vms=vms, source=source)


def load_inventory(path: Path) -> Inventory:
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as e:
        raise cfg.ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise cfg.ConfigError(f"{path}: not valid TOML: {e}") from None
    return inventory_from_dict(raw, str(path))


# --- placement and the pair's configuration ---------------------------------------

def place(vm: VMSpec, reachable: list[str], load: dict[str, int]) -> tuple[str, str]:
    """(primary host, backup host) for `vm`: two different reachable hosts."""
    if vm.hosts:
        missing = [h for h in vm.hosts if h not in reachable]
        if missing:
            raise ClusterError(f"{vm.name} is pinned to {', '.join(vm.hosts)}, but "
                               f"{', '.join(missing)} cannot be reached")
        return vm.hosts[0], vm.hosts[1]
    if len(reachable) < 2:
        raise ClusterError(f"{vm.name} needs two reachable hosts; reachable: "
                           f"{', '.join(reachable) or 'none'}")
    ranked = least_loaded(reachable, load)
    return ranked[0], ranked[1]


def least_loaded(hosts: list[str], load: dict[str, int]) -> list[str]:
    """`hosts` by the number of controllers running there, then in inventory order."""
    return sorted(hosts, key=lambda h: (load.get(h, 0), hosts.index(h)))


def reachable(survey: dict[str, dict[str, Any]]) -> list[str]:
    return [host for host, info in survey.items() if "error" not in info]


def load(survey: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Running controllers per reachable host."""
    return {host: sum(side["running"] for side in survey[host]["sides"])
            for host in reachable(survey)}


def run_dir(host: HostSpec, vm: str) -> Path:
    return host.run_root / f"{vm}.{host.name}"


def on_host(raw: dict[str, Any], host: HostSpec) -> dict[str, Any]:
    """A side's config: the pair's, with `host`'s way of starting QEMU."""
    return {**raw, "vm": {**raw["vm"], "launcher": host.launcher,
                          "libvirt_uri": host.libvirt_uri}}


def pair_config(inv: Inventory, vm: VMSpec, primary: HostSpec, backup: HostSpec,
                epoch: int, standby: HostSpec | None = None) -> dict[str, Any]:
    """The pair's configuration (what `vmft primary|backup --config` reads), checked,
    as the primary's host runs it (`on_host` makes the backup's).

    `protect.hosts` names every host, in the order a primary running alone
    tries them: the standby's first, the pair's own last."""
    order = sorted(inv.hosts.values(), key=lambda h: (h != standby, h in (primary, backup)))
    raw = on_host({
        "vm": {"name": vm.name, "image_cache": str(inv.image_cache), **vm.settings},
        "primary": {"run_dir": str(run_dir(primary, vm.name)), "tap": primary.tap},
        "backup": {"run_dir": str(run_dir(backup, vm.name)), "tap": backup.tap,
                   "address": backup.ft_address, "log_port": vm.log_port},
        "failure": {"heartbeat_port": vm.heartbeat_port},
        "lock": {**{k: str(v) if isinstance(v, Path) else v for k, v in inv.lock.items()},
                 "epoch": epoch},
        # Where a standby may wait for this VM: on any host of the cluster.
        "protect": {"hosts": [f"{h.ft_address}:{vm.log_port}" for h in order]},
    }, primary)
    cfg.from_dict(raw, f"{inv.source}: the pair config of {vm.name}")
    return raw


def standby_config(pair: dict[str, Any], host: HostSpec, vm: str) -> dict[str, Any]:
    """The pair's config as a standby on `host` needs it: the backup is `host` itself."""
    backup = {**pair["backup"], "run_dir": str(run_dir(host, vm)), "tap": host.tap,
              "address": host.ft_address}
    raw = on_host({**pair, "backup": backup}, host)
    if raw["primary"]["run_dir"] == backup["run_dir"]:
        raise ClusterError(f"{vm}: the standby cannot go on its own primary's host {host.name}")
    cfg.from_dict(raw, f"the standby config of {vm} on {host.name}")
    return raw


def to_toml(raw: dict[str, dict[str, Any]]) -> str:
    """Tables of strings, integers and booleans as TOML (JSON's escapes are TOML's)."""
    lines = []
    for section, table in raw.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
        lines.append("")
    return "\n".join(lines)


# --- SSH to the agents ------------------------------------------------------------------

class AgentLink:
    """One host's agent, over SSH: the host key is checked, the command is fixed."""

    def __init__(self, inv: Inventory, host: HostSpec) -> None:
        self.inv = inv
        self.host = host
        self._ssh: paramiko.SSHClient | None = None

    def _client(self) -> paramiko.SSHClient:
        if self._ssh is None:
            client = paramiko.SSHClient()
            try:
                client.load_host_keys(str(self.inv.known_hosts))
            except OSError as e:
                raise ClusterError(f"known_hosts {self.inv.known_hosts}: {e.strerror}") from None
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            timeout = self.inv.connect_timeout_s
            try:
                client.connect(self.host.address, port=self.host.port, username=self.inv.user,
                               key_filename=str(self.inv.identity), look_for_keys=False,
                               allow_agent=False, timeout=timeout, banner_timeout=timeout,
                               auth_timeout=timeout)
            except paramiko.BadHostKeyException as e:
                client.close()
                raise HostUnreachable(f"{self.host.name}: HOST KEY MISMATCH for "
                                      f"{self.host.address}: {e}; refusing to connect") from None
            except (paramiko.SSHException, OSError) as e:
                client.close()
                raise HostUnreachable(f"{self.host.name} ({self.host.address}:{self.host.port}): "
                                      f"{type(e).__name__}: {e}") from None
            self._ssh = client
        return self._ssh

    def _session(self) -> paramiko.Channel:
        """A new session channel on the host's connection.

        A host answers a channel open at once; one that does not within
        connect_timeout_s gets one new connection (nothing ran on the host yet, so
        trying again is safe).  Seen once in CI: a connection that had been idle
        while the VM's two sides started never answered the standby's channel.
        """
        def open_session() -> paramiko.Channel:
            transport = self._client().get_transport()
            assert transport is not None                 # _client() connected it
            return transport.open_session(timeout=self.inv.connect_timeout_s)
        try:
            return open_session()
        except paramiko.SSHException as e:
            self.close()
            emit(log, "ssh-reconnect", host=self.host.name, reason=str(e))
        return open_session()

    def run(self, argv: list[str], stdin: bytes = b"",
            timeout: float = CALL_TIMEOUT) -> tuple[int, bytes, bytes]:
        """Run the fixed argv on the host (each argument shell-quoted); rc, stdout, stderr."""
        command = shlex.join(argv)
        try:
            chan = self._session()
            chan.settimeout(timeout)
            chan.exec_command(command)
            chan.sendall(stdin)
            chan.shutdown_write()
            out, err = chan.makefile("rb").read(), chan.makefile_stderr("rb").read()
            return chan.recv_exit_status(), out, err
        except (paramiko.SSHException, OSError) as e:   # includes socket.timeout
            self.close()
            raise HostUnreachable(f"{self.host.name}: `{command}`: {type(e).__name__}: {e}") \
                from None

    def call(self, request: dict[str, Any], timeout: float = CALL_TIMEOUT) -> dict[str, Any]:
        argv = [str(self.inv.vmft), "agent", "call", "--socket", str(self.host.agent_socket)]
        rc, out, err = self.run(argv, json.dumps(request).encode() + b"\n", timeout)
        try:
            answer = json.loads(out)
        except ValueError:
            raise HostUnreachable(f"{self.host.name}: `{shlex.join(argv)}` exited {rc}: "
                                  f"{(err or out).decode(errors='replace').strip()[-500:]}") \
                from None
        if not answer.get("ok"):
            raise ClusterError(f"{self.host.name}: {answer.get('error')}")
        return answer

    def close(self) -> None:
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None


# --- the cluster -------------------------------------------------------------------------

@dataclass
class VMView:
    """Where a VM's sides run now, from the agents' answers."""

    name: str
    primary: str | None = None           # host
    backup: str | None = None
    standby: str | None = None           # a host waiting to become the new backup
    state: str | None = None             # the primary's controller state
    lag_ms: float | None = None
    sides: list[dict[str, Any]] = field(default_factory=list)

    @property
    def protected(self) -> bool:
        return self.primary is not None and self.backup is not None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "primary": self.primary, "backup": self.backup,
                "standby": self.standby, "state": self.state, "lag_ms": self.lag_ms, "protected": self.protected,
                "sides": self.sides}


class Cluster:
    """The hosts of one inventory and the VMs on them."""

    def __init__(self, inv: Inventory) -> None:
        self.inv = inv
        self.links = {name: AgentLink(inv, host) for name, host in inv.hosts.items()}

    def close(self) -> None:
        for link in self.links.values():
            link.close()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def survey(self) -> dict[str, dict[str, Any]]:
        """Every host's agent info, or {"error": ...} for a host that cannot be reached."""
        def ask(link: AgentLink) -> dict[str, Any]:
            try:
                return link.call({"op": "info"}, INFO_TIMEOUT)
            except ClusterError as e:
                return {"error": str(e)}

        with ThreadPoolExecutor(max_workers=len(self.links)) as pool:
            answers = list(pool.map(ask, self.links.values()))
        return dict(zip(self.links, answers))

    @staticmethod
    def vms(survey: dict[str, dict[str, Any]]) -> dict[str, VMView]:
        views: dict[str, VMView] = {}
        for host, info in survey.items():
            for side in info.get("sides", []):
                if not side["running"]:
                    continue
                view = views.setdefault(side["vm"], VMView(side["vm"]))
                view.sides.append({"host": host, **side})
                if side["role"] == "primary":
                    view.primary, view.state, view.lag_ms = host, side["state"], side["lag_ms"]
                elif side["role"] == "standby":
                    view.standby = host
                else:
                    view.backup = host
        return views

    def _vm(self, name: str) -> VMSpec:
        try:
            return self.inv.vms[name]
        except KeyError:
            raise ClusterError(f"no VM {name!r} in {self.inv.source} "
                               f"(VMs: {', '.join(self.inv.vms) or 'none'})") from None

    def start(self, name: str) -> dict[str, Any]:
        """Place the VM's sides on two hosts; start the backup, then the primary."""
        vm = self._vm(name)
        survey = self.survey()
        if name in self.vms(survey):
            raise ClusterError(f"{name} already runs: `vmft cluster stop {name}` first")
        hosts = reachable(survey)
        primary, backup = place(vm, hosts, load(survey))
        spares = [h for h in least_loaded(hosts, load(survey)) if h not in (primary, backup)]
        standby = spares[0] if spares else None
        epoch = time.time_ns() // 1_000_000
        pair = pair_config(self.inv, vm, self.inv.hosts[primary], self.inv.hosts[backup], epoch,
                           self.inv.hosts[standby] if standby else None)
        emit(log, "cluster-placing", vm=name, primary=primary, backup=backup, standby=standby,
             epoch=epoch)
        started = []
        try:
            sides = ((backup, "backup", on_host(pair, self.inv.hosts[backup])),
                     (primary, "primary", pair))
            for host, role, raw in sides:
                self.links[host].call({"op": "start", "vm": name, "role": role,
                                       "config": to_toml(raw)})
                started.append(host)
        except ClusterError:
            for host in started:
                self.links[host].call({"op": "kill", "vm": name})
            raise
        standby_error = None
        if standby is not None:
            try:
                self._start_standby(name, pair, standby)
            except ClusterError as e:       # the pair runs protected; only the spare is missing
                emit(log, "cluster-standby-failed", vm=name, host=standby, error=str(e))
                standby, standby_error = None, str(e)
        return {"vm": name, "primary": primary, "backup": backup, "standby": standby,
                "standby_error": standby_error, "epoch": epoch}

    def _start_standby(self, name: str, pair: dict[str, Any], host: str) -> None:
        config = to_toml(standby_config(pair, self.inv.hosts[host], name))
        self.links[host].call({"op": "start", "vm": name, "role": "protect", "config": config})

    def protect(self, name: str) -> dict[str, Any]:
        """A standby on the least-loaded spare host for a VM that has none: the primary,
        running alone, joins it as its new backup."""
        survey = self.survey()
        view = self.vms(survey).get(name)
        if view is not None and view.standby is not None:
            raise ClusterError(f"{name} has a standby already, on {view.standby}")
        spare = self.spare_for(name, survey)
        assert view is not None and view.primary is not None
        pair = tomllib.loads(self.links[view.primary].call({"op": "config", "vm": name})["config"])
        self._start_standby(name, pair, spare)
        return {"vm": name, "primary": view.primary, "standby": spare}

    def stop(self, name: str, timeout: float = STOP_TIMEOUT) -> dict[str, Any]:
        """Shut the guest down on its primary (the backup replays the shutdown and ends)."""
        view = self.vms(self.survey()).get(name)
        if view is None:
            raise ClusterError(f"{name} does not run on any reachable host")
        if view.primary is None:
            raise ClusterError(f"{name} has no primary now (sides: {view.sides})")
        self.links[view.primary].call({"op": "stop", "vm": name})
        try:
            wait_for(lambda: self.vms(self.survey()).get(name) is None, timeout,
                     f"{name} to stop", every=0.5)
        except TimeoutError:
            if (left := self.vms(self.survey()).get(name)) is not None:
                for side in left.sides:
                    self.links[side["host"]].call({"op": "kill", "vm": name})
                return {"vm": name, "clean": False, "killed_on": [s["host"] for s in left.sides]}
        return {"vm": name, "clean": True}

    def pull_plug(self, host: str) -> dict[str, Any]:
        """Drill: the host takes every link down and SIGKILLs its controllers."""
        if host not in self.links:
            raise ClusterError(f"no host {host!r} in {self.inv.source} "
                               f"(hosts: {', '.join(self.links)})")
        answer = self.links[host].call({"op": "pull-plug"})
        self.links[host].close()
        # Return only once the host is gone: a request that reached it just
        # before its links went down would wait out its whole timeout.
        started = time.monotonic()
        bound = answer["in_s"] + 2 * self.inv.connect_timeout_s
        try:
            wait_for(lambda: not self._answers_ssh(self.inv.hosts[host]), bound,
                     f"{host} to stop answering on SSH", every=PLUG_PROBE_S)
        except TimeoutError:
            raise ClusterError(f"{host}'s agent took the pull-plug, but {host} still answers "
                               f"on SSH after {bound:.0f} s") from None
        down_after_s = round(time.monotonic() - started, 2)
        emit(log, "cluster-plug-pulled", host=host, down_after_s=down_after_s)
        return {"host": host, "down_after_s": down_after_s}

    @staticmethod
    def _answers_ssh(host: HostSpec) -> bool:
        try:
            socket.create_connection((host.address, host.port), timeout=PLUG_PROBE_S).close()
            return True
        except OSError:
            return False

    def spare_for(self, name: str, survey: dict[str, dict[str, Any]]) -> str:
        """The host a new backup for a VM running alone would go to."""
        view = self.vms(survey).get(name)
        if view is None or view.primary is None:
            raise ClusterError(f"{name} has no running primary to protect")
        if view.protected:
            raise ClusterError(f"{name} is protected already (primary {view.primary}, "
                               f"backup {view.backup})")
        spares = [h for h in reachable(survey) if h != view.primary]
        if not spares:
            raise ClusterError(f"{name}: no reachable host besides {view.primary} for a backup")
        return least_loaded(spares, load(survey))[0]


# --- the command line ---------------------------------------------------------------

INVENTORY = Path("/etc/vmft/cluster.toml")


def render(survey: dict[str, dict[str, Any]], views: dict[str, VMView]) -> str:
    lines = [f"{'HOST':<10} {'AGENT':<40} CONTROLLERS"]
    for host, info in survey.items():
        if "error" in info:
            lines.append(f"{host:<10} {'UNREACHABLE':<40} {info['error']}")
        else:
            running = [f"{s['vm']}:{s['role']}" for s in info["sides"] if s["running"]]
            lines.append(f"{host:<10} {'vmft ' + info['version'] + ' on ' + info['hostname']:<40} "
                         f"{', '.join(running) or '-'}")
    lines += ["", f"{'VM':<12} {'PRIMARY':<10} {'BACKUP':<10} {'STANDBY':<10} {'STATE':<14} LAG"]
    for view in views.values():
        lag = f"{view.lag_ms:.0f} ms" if view.lag_ms is not None and view.protected else "-"
        lines.append(f"{view.name:<12} {view.primary or '-':<10} "
                     f"{view.backup or 'NONE':<10} {view.standby or '-':<10} "
                     f"{view.state or '?':<14} {lag}"
                     f"{'' if view.protected else '   UNPROTECTED'}")
    return "\n".join(lines)


def cmd_cluster(args: Any) -> int:
    if args.action == "example":
        example = __doc__.split("name the same hosts):\n")[1].split("\nPlacement:")[0]
        print(textwrap.dedent(example).strip())
        return 0
    try:
        inv = load_inventory(args.inventory)
    except cfg.ConfigError as e:
        raise SystemExit(f"vmft: inventory error: {e}") from None
    with Cluster(inv) as cluster:
        try:
            return _cluster_action(cluster, args)
        except ClusterError as e:
            print(f"vmft cluster: {e}", file=sys.stderr)
            return 2


def _cluster_action(cluster: Cluster, args: Any) -> int:
    if args.action == "show":
        survey = cluster.survey()
        views = cluster.vms(survey)
        if args.json:
            print(json.dumps({"hosts": survey,
                              "vms": {n: v.to_json() for n, v in views.items()}}, default=str))
        else:
            print(render(survey, views))
        return 0 if all("error" not in info for info in survey.values()) else 1
    if args.target is None:
        raise ClusterError(f"`vmft cluster {args.action}` needs a "
                           f"{'HOST' if args.action == 'pull-plug' else 'VM'}")
    if args.action == "start":
        placed = cluster.start(args.target)
        standby = f", standby on {placed['standby']}" if placed["standby"] else ", no standby"
        if placed["standby_error"]:
            standby += (f" (the standby failed to start: {placed['standby_error']}; if a "
                        f"side's host fails, `vmft cluster protect {args.target}` gives the "
                        "VM running alone a new backup)")
        print(f"{placed['vm']}: primary on {placed['primary']}, backup on {placed['backup']}"
              f"{standby} (lock epoch {placed['epoch']})")
    elif args.action == "stop":
        stopped = cluster.stop(args.target)
        print(f"{args.target}: " + ("shut down cleanly" if stopped["clean"] else
                                    f"did not stop in time; killed on {stopped['killed_on']}"))
    elif args.action == "pull-plug":
        if not args.yes:
            raise ClusterError(f"pull-plug takes every network link of {args.target} down and "
                               "SIGKILLs its VMs; you need console access to bring it back. "
                               "Add --yes to do it.")
        pulled = cluster.pull_plug(args.target)
        print(f"{args.target}: plug pulled (unreachable {pulled['down_after_s']:.1f} s after "
              "its agent answered)")
    elif args.action == "protect":
        placed = cluster.protect(args.target)
        print(f"{args.target}: standby started on {placed['standby']}; the primary on "
              f"{placed['primary']} joins it as its new backup")
    return 0


def add_cli(sub: Any) -> None:
    """`vmft cluster ...`."""
    p = sub.add_parser(
        "cluster", help="place, start, stop and show FT VMs on several hosts over SSH",
        description="Steer the FT hosts of an inventory from one place.  Each host runs "
                    "`vmft agent` (the ft_host ansible role installs it); this command "
                    "reaches the agents over SSH, with the hosts' keys checked against the "
                    "inventory's known_hosts file, and puts each VM's primary and backup on "
                    "two different hosts.",
        epilog="Actions:  show: every host's agent and the VMs, where each side "
               "runs, its state and lag (exit 1 if a host is unreachable);  start VM: place "
               "and start the backup, then the primary;  stop VM: shut the guest down on "
               "its primary (the backup replays the shutdown);  pull-plug HOST --yes: a "
               "failover drill, the host takes every link down and its VMs die (it returns "
               "once the host no longer answers), the backups elsewhere take over and join "
               "the standby;  protect VM: a standby on a spare "
               "host for a VM that runs alone without one;  example: print an annotated inventory.  "
               "A typical drill: `vmft cluster start web; vmft cluster show; "
               "vmft cluster pull-plug a --yes; vmft cluster show`.")
    p.add_argument("action", choices=["show", "start", "stop", "pull-plug",
                                      "protect", "example"])
    p.add_argument("target", nargs="?", metavar="VM|HOST")
    p.add_argument("--inventory", "-i", type=Path, default=INVENTORY,
                   help=f"the cluster's TOML inventory (default {INVENTORY})")
    p.add_argument("--json", action="store_true", help="show: one JSON object")
    p.add_argument("--yes", action="store_true", help="pull-plug: yes, really")
    p.set_defaults(func=cmd_cluster)
