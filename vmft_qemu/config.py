"""The FT pair's configuration: one TOML file describes the VM and both hosts.

Both controllers read the same file, the way the paper's primary and backup VM
share one VM configuration.  Every value is checked; a bad one is refused with
an error naming its key and what is allowed.

    [vm]
    name = "demo"                 # letters, digits, '-', 1..32
    memory_mib = 256              # 64 .. 4096
    workload = "ticks"            # ticks | sha256:MIB | shutdown:SECONDS
    icount_shift = 3              # "auto" or 0 .. 10 (3: 8 ns per instruction)
    disk = true                   # the guest's ext4 root disk, through blkreplay
    image_cache = "/var/cache/vmft/images"  # default: $VMFT_IMAGE_CACHE, or this
    qemu = "qemu-system-x86_64"
    mac = "52:54:00:77:00:10"     # the guest's NIC ("" for none)
    ip = "192.168.77.10/24"       # the guest's address on the LAN
    launcher = "qemu"             # qemu: the controller runs QEMU itself
                                  # libvirt: libvirtd runs it as a transient domain
                                  # vmft-NAME-primary / -backup (shows in virsh list)
    libvirt_uri = "qemu:///system"  # launcher "libvirt": this host's libvirtd
    rtc_base = "2026-01-01T00:00:00"  # the guest's RTC date at its first boot (UTC); it
                                  # then runs with the guest's virtual time (both sides
                                  # must agree, and QEMU's start date is not in the log)

    [primary]
    run_dir = "/run/vmft/demo/primary"
    tap = "vmft0"                 # this host's TAP on the LAN ("" for none)
    log_flush_us = 2000           # push the replay log out of QEMU this often; inputs
                                  # reach the guest as soon as queued (0: neither)
    metrics_port = 0              # Prometheus text at http://HOST:PORT/metrics (0: off)

    [backup]
    run_dir = "/run/vmft/demo/backup"
    tap = "vmft0"
    address = "127.0.0.1"         # where the backup listens for the log channel
    log_port = 7400
    metrics_port = 0              # the backup's (and, after go-live, the new primary's)
    replay_kick_us = 100          # after the replay's vCPU halts, look this often whether
                                  # it has halted again and wake it, to take the
                                  # checkpoints the primary's wake-ups logged

    [lag]
    target_ms = 100               # backup at most this far behind (primary's clock)
    control = true                # slow the primary down when the backup lags

    [channel]
    heartbeat_ms = 50             # heartbeat frames while the log is quiet
    max_frame_kib = 256           # largest LOG frame
    max_retained_mib = 256        # unacknowledged log the primary keeps; when full,
                                  # the guest pauses until the backup catches up
    reconnect_ms = 200            # primary's pause between connection attempts

    [failure]
    heartbeat_ms = 50             # UDP heartbeats to the partner this often
    heartbeat_port = 7401         # UDP port at backup.address; the backup answers the
                                  # primary's heartbeats at the address they came from
    timeout_ms = 600              # partner silent (UDP and log channel) this long: failed
    channel_grace_ms = 3000       # heartbeats but no log channel this long: failed too

    [lock]
    backend = "path"              # path: exclusive create under `path` (a mounted share)
                                  # nfs: speak NFS to `server` itself (libnfs)
                                  # none: never go live alone (no failover)
    path = "/var/lib/vmft/locks"  # backend "path": the directory on the share
    server = ""                   # backend "nfs": the NFS server's address
    export = "/vmft"              # backend "nfs": the exported directory
    timeout_ms = 1000             # give up on the lock after this: do not go live
    epoch = 1                     # the FT pair's generation; both sides race for it

    [protect]
    hosts = ["10.0.0.3:7400"]     # where a standby backup may wait (`vmft protect`):
                                  # its log channel address:port; [] for none
    auto = true                   # a VM running alone joins a standby there by itself
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .images import DEFAULT_CACHE


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key."""


@dataclass(frozen=True)
class VMConfig:
    name: str
    memory_mib: int
    workload: str
    icount_shift: str
    disk: bool
    image_cache: Path
    qemu: str
    mac: str
    ip: str
    launcher: str
    libvirt_uri: str
    rtc_base: str


@dataclass(frozen=True)
class PrimaryConfig:
    run_dir: Path
    tap: str
    log_flush_us: int
    metrics_port: int


@dataclass(frozen=True)
class BackupConfig:
    run_dir: Path
    tap: str
    address: str
    log_port: int
    metrics_port: int
    replay_kick_us: int


@dataclass(frozen=True)
class LagConfig:
    target_ms: int
    control: bool


@dataclass(frozen=True)
class ChannelConfig:
    heartbeat_ms: int
    max_frame_kib: int
    max_retained_mib: int
    reconnect_ms: int


@dataclass(frozen=True)
class FailureConfig:
    heartbeat_ms: int
    heartbeat_port: int
    timeout_ms: int
    channel_grace_ms: int


@dataclass(frozen=True)
class LockConfig:
    backend: str
    path: Path
    server: str
    export: str
    timeout_ms: int
    epoch: int


@dataclass(frozen=True)
class ProtectConfig:
    hosts: tuple[tuple[str, int], ...]
    auto: bool


@dataclass(frozen=True)
class FTConfig:
    vm: VMConfig
    primary: PrimaryConfig
    backup: BackupConfig
    lag: LagConfig
    channel: ChannelConfig
    failure: FailureConfig
    lock: LockConfig
    protect: ProtectConfig = ProtectConfig(hosts=(), auto=True)
    source: str = "<defaults>"


# --- checks: each returns the converted value or raises ValueError(allowed) ---

def _int_range(lo: int, hi: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"must be an integer from {lo} to {hi}")
        return v
    return check


def _boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("must be true or false")
    return v


def _string(pattern: str, allowed: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if not isinstance(v, str) or not re.fullmatch(pattern, v):
            raise ValueError(f"must be {allowed}")
        return v
    return check


def _path(v: Any) -> Path:
    if not isinstance(v, str) or not v.startswith("/"):
        raise ValueError("must be an absolute path")
    return Path(v)


def _address(v: Any) -> str:
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise ValueError("must be an IP address such as 127.0.0.1") from None


def _flush_interval(v: Any) -> int:
    if v == 0:
        return 0
    return _int_range(100, 1_000_000)(v)


def _shift(v: Any) -> str:
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 10):
        return str(v)
    raise ValueError('must be "auto" or an integer from 0 to 10')


def _endpoints(v: Any) -> tuple[tuple[str, int], ...]:
    allowed = 'a list of "IP:PORT" strings, e.g. ["10.0.0.3:7400"]'
    if not isinstance(v, list):
        raise ValueError(f"must be {allowed}")
    out = []
    for item in v:
        address, _, port = item.rpartition(":") if isinstance(item, str) else ("", "", "")
        try:
            out.append((_address(address), _int_range(1, 65535)(int(port))))
        except ValueError:
            raise ValueError(f"{item!r} is not IP:PORT; must be {allowed}") from None
    return tuple(out)


_MAC = r"[0-9a-f]{2}(:[0-9a-f]{2}){5}"
_IP_PREFIX = r"(\d{1,3}\.){3}\d{1,3}/\d{1,2}"
_IFNAME = r"[A-Za-z0-9_.-]{0,15}"
_IFNAME_TEXT = 'a network interface name of at most 15 characters, or ""'
WORKLOADS = r"ticks|sha256:[1-9][0-9]{0,4}|shutdown:[1-9][0-9]{0,3}"

SCHEMA: dict[str, dict[str, tuple[Callable[[Any], Any], Any]]] = {
    "vm": {
        "name": (_string(r"[A-Za-z0-9-]{1,32}", "1 to 32 letters, digits or '-'"), "demo"),
        "memory_mib": (_int_range(64, 4096), 256),
        "workload": (_string(WORKLOADS, "ticks, sha256:MIB or shutdown:SECONDS"), "ticks"),
        "icount_shift": (_shift, 3),
        "disk": (_boolean, True),
        "image_cache": (_path, str(DEFAULT_CACHE)),
        "qemu": (_string(r"[\w./+-]+", "a QEMU binary name or path"), "qemu-system-x86_64"),
        "mac": (_string(_MAC + r"|", "a MAC address like 52:54:00:77:00:10, or \"\""), ""),
        "ip": (_string(_IP_PREFIX + r"|", "an IPv4 address with prefix like 192.168.77.10/24, "
                                           "or \"\""), ""),
        "launcher": (_string(r"qemu|libvirt", "qemu or libvirt"), "qemu"),
        # QEMU opens the controller's pipes and sockets, so only this host's libvirtd will do.
        "libvirt_uri": (_string(r"qemu(\+unix)?:///system(\?socket=/[\w./-]+)?",
                                "a local system URI of libvirt's QEMU driver, e.g. "
                                "qemu:///system (QEMU must run where its controller does)"),
                        "qemu:///system"),
        "rtc_base": (_string(r"\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}:\d{2})?",
                             "a UTC date like 2026-01-01 or 2026-01-01T00:00:00"),
                     "2026-01-01T00:00:00"),
    },
    "primary": {
        "run_dir": (_path, "/run/vmft/demo/primary"),
        "tap": (_string(_IFNAME, _IFNAME_TEXT), ""),
        "log_flush_us": (_flush_interval, 2000),
        "metrics_port": (_int_range(0, 65535), 0),
    },
    "backup": {
        "run_dir": (_path, "/run/vmft/demo/backup"),
        "tap": (_string(_IFNAME, _IFNAME_TEXT), ""),
        "address": (_address, "127.0.0.1"),
        "log_port": (_int_range(1, 65535), 7400),
        "metrics_port": (_int_range(0, 65535), 0),
        "replay_kick_us": (_int_range(100, 1_000_000), 100),
    },
    "lag": {
        "target_ms": (_int_range(10, 60_000), 100),
        "control": (_boolean, True),
    },
    "channel": {
        "heartbeat_ms": (_int_range(10, 10_000), 50),
        "max_frame_kib": (_int_range(4, 4096), 256),
        "max_retained_mib": (_int_range(1, 65536), 256),
        "reconnect_ms": (_int_range(10, 60_000), 200),
    },
    "failure": {
        "heartbeat_ms": (_int_range(10, 10_000), 50),
        "heartbeat_port": (_int_range(1, 65535), 7401),
        "timeout_ms": (_int_range(50, 600_000), 600),
        "channel_grace_ms": (_int_range(100, 600_000), 3000),
    },
    "lock": {
        "backend": (_string(r"path|nfs|none", "path, nfs or none"), "path"),
        "path": (_path, "/var/lib/vmft/locks"),
        "server": (_string(r"|[\w.:-]+", "an NFS server's host name or address, or \"\""), ""),
        "export": (_path, "/vmft"),
        "timeout_ms": (_int_range(50, 600_000), 1000),
        "epoch": (_int_range(1, 2**62), 1),
    },
    "protect": {
        "hosts": (_endpoints, []),
        "auto": (_boolean, True),
    },
}


def _section(raw: dict[str, Any], name: str, source: str,
             schema: dict[str, dict[str, tuple[Callable[[Any], Any], Any]]] = SCHEMA
             ) -> dict[str, Any]:
    """Table `name` of `raw`, every key checked against `schema` (defaults filled in)."""
    given = raw.get(name, {})
    if not isinstance(given, dict):
        raise ConfigError(f"{source}: [{name}] must be a table")
    fields = schema[name]
    out: dict[str, Any] = {}
    for key in given:
        if key not in fields:
            raise ConfigError(
                f"{source}: {name}.{key}: unknown key; allowed: {', '.join(fields)}")
    for key, (check, default) in fields.items():
        value = given.get(key, default)
        try:
            out[key] = check(value)
        except ValueError as e:
            raise ConfigError(f"{source}: {name}.{key} = {value!r}: {e}") from None
    return out


def from_dict(raw: dict[str, Any], source: str = "<dict>") -> FTConfig:
    for name in raw:
        if name not in SCHEMA:
            raise ConfigError(
                f"{source}: [{name}]: unknown section; allowed: {', '.join(SCHEMA)}")
    vm = _section(raw, "vm", source)
    primary = _section(raw, "primary", source)
    backup = _section(raw, "backup", source)
    if bool(vm["mac"]) != bool(vm["ip"]):
        raise ConfigError(f"{source}: vm.mac and vm.ip: give both (the guest has a NIC) or neither")
    if vm["mac"] and not (primary["tap"] and backup["tap"]):
        raise ConfigError(f"{source}: primary.tap and backup.tap: the guest has a NIC, so each "
                          "host needs the TAP device its controller puts on the LAN")
    if primary["run_dir"] == backup["run_dir"]:
        raise ConfigError(
            f"{source}: backup.run_dir = {str(backup['run_dir'])!r}: must differ from "
            "primary.run_dir (each side keeps its own log pipe and disk)")
    failure = _section(raw, "failure", source)
    if failure["timeout_ms"] < 2 * failure["heartbeat_ms"]:
        raise ConfigError(f"{source}: failure.timeout_ms = {failure['timeout_ms']}: must be at "
                          f"least twice failure.heartbeat_ms ({failure['heartbeat_ms']}), or one "
                          "late heartbeat declares a healthy partner failed")
    lock = _section(raw, "lock", source)
    if lock["backend"] == "nfs" and not lock["server"]:
        raise ConfigError(f"{source}: lock.server: backend \"nfs\" needs the NFS server's address")
    return FTConfig(
        vm=VMConfig(**vm),
        primary=PrimaryConfig(**primary),
        backup=BackupConfig(**backup),
        lag=LagConfig(**_section(raw, "lag", source)),
        channel=ChannelConfig(**_section(raw, "channel", source)),
        failure=FailureConfig(**failure),
        lock=LockConfig(**lock),
        protect=ProtectConfig(**_section(raw, "protect", source)),
        source=source,
    )


def load(path: Path) -> FTConfig:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return from_dict(raw, str(path))
