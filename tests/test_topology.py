"""Hosts as network namespaces (vmft_qemu.topology): reachability, partitions, teardown.

Needs root (network namespaces, veths, bridges, TAPs).  Every wait is
bounded: `busybox ping -W`, subprocess timeouts, the topology's own deadlines.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from vmft_qemu import topology as topo_mod
from vmft_qemu.topology import (CLIENT_IP, GUEST_IP, GUEST_MAC, LAN_PREFIX, STORAGE_IP, Netns,
                                Topology, TopologyError, cleanup_leftovers, list_netns)

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 (`ip`) is not installed"),
    pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox (for ping) is not installed"),
]


def ping(ns: Netns, ip: str, wait: int = 2) -> bool:
    """One echo request from inside `ns`; True if answered within `wait` s."""
    res = ns.run(["busybox", "ping", "-c", "1", "-W", str(wait), ip],
                 capture_output=True, text=True, timeout=wait + 10)
    return res.returncode == 0


def reachable(ns: Netns, ip: str, within: float = 10) -> bool:
    """Ping until answered, for at most `within` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if ping(ns, ip, wait=1):
            return True
    return False


@pytest.fixture
def topo() -> Iterator[Topology]:
    with Topology() as t:
        yield t


def test_layout(topo: Topology) -> None:
    assert re.fullmatch(r"vmft[0-9a-f]{4}", topo.prefix)
    assert all(len(n) <= 15 for n in topo.namespaces)
    assert set(topo.namespaces) <= set(list_netns())
    a, b = topo.hosts["a"], topo.hosts["b"]
    assert (a.ft_ip, b.ft_ip) == ("10.77.0.1", "10.77.0.2")
    assert topo.client.ip == CLIENT_IP == "192.168.77.100"
    assert (GUEST_IP, GUEST_MAC, LAN_PREFIX) == ("192.168.77.10", "52:54:00:77:00:10", 24)
    for host in (a, b):
        links = {link["ifname"]: link for link in host.links()}
        assert set(links) == {"lo", "lan0", "hbr0", "ft0"}
        assert links["lan0"]["master"] == "hbr0"
        assert "master" not in links["ft0"]
        assert all(link["operstate"] in ("UP", "UNKNOWN") for link in links.values())
    with pytest.raises(TypeError):
        a.run("ip link")  # argv lists only


def test_lan_reaches_hosts_and_ft_links_hosts(topo: Topology) -> None:
    a, b = topo.hosts["a"], topo.hosts["b"]
    a.add_lan_ip(f"192.168.77.21/{LAN_PREFIX}")
    b.add_lan_ip(f"192.168.77.22/{LAN_PREFIX}")
    assert ping(topo.client, "192.168.77.21")
    assert ping(topo.client, "192.168.77.22")
    assert ping(a, b.ft_ip)
    assert ping(b, a.ft_ip)
    # the FT network is not the LAN
    assert not ping(topo.client, a.ft_ip, wait=1)


@pytest.mark.parametrize("at_host", [False, True], ids=["switch-side", "host-side"])
def test_cut_ft_link_partitions_hosts_not_lan(topo: Topology, at_host: bool) -> None:
    a, b = topo.hosts["a"], topo.hosts["b"]
    a.add_lan_ip(f"192.168.77.21/{LAN_PREFIX}")
    b.add_lan_ip(f"192.168.77.22/{LAN_PREFIX}")
    assert ping(a, b.ft_ip)

    a.cut_ft_link(at_host=at_host)
    assert not ping(a, b.ft_ip)
    assert not ping(b, a.ft_ip)
    assert ping(topo.client, "192.168.77.21")   # both stay on the LAN
    assert ping(topo.client, "192.168.77.22")

    a.restore_ft_link()
    assert reachable(a, b.ft_ip)
    assert reachable(b, a.ft_ip)


def test_three_hosts() -> None:
    with Topology(hosts=3) as t:
        c = t.hosts["c"]
        assert c.ft_ip == "10.77.0.3"
        assert ping(c, t.hosts["a"].ft_ip)
        assert ping(t.hosts["b"], c.ft_ip)


TAP_ARP = r"""
import fcntl, os, select, socket, struct, sys, time
tap, mac, ip, target = sys.argv[1:5]
fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", tap.encode(), 0x0002 | 0x1000))
own = bytes.fromhex(mac.replace(":", ""))
request = (b"\xff" * 6 + own + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
           + own + socket.inet_aton(ip) + b"\x00" * 6 + socket.inet_aton(target))
deadline = time.monotonic() + 5
while time.monotonic() < deadline:
    os.write(fd, request)   # resent until answered: the port forwards once the TAP has carrier
    resend = time.monotonic() + 0.5
    while (left := min(resend, deadline) - time.monotonic()) > 0:
        if not select.select([fd], [], [], left)[0]:
            break
        frame = os.read(fd, 65536)
        if (frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x02"
                and frame[28:32] == socket.inet_aton(target) and frame[:6] == own):
            print(frame[22:28].hex(":"))
            sys.exit(0)
sys.exit(1)
"""


@pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no /dev/net/tun")
def test_tap_bridges_guest_frames_to_lan(topo: Topology) -> None:
    a = topo.hosts["a"]
    assert a.add_tap("vmtap0") == "vmtap0"
    assert a.link("vmtap0")["master"] == "hbr0"
    # as the guest: ARP for the client through the TAP, as the controller would send it
    res = a.run([sys.executable, "-c", TAP_ARP, "vmtap0", GUEST_MAC, GUEST_IP, CLIENT_IP],
                capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    client_mac = topo.client.link("lan0")["address"]
    assert res.stdout.strip() == client_mac


def test_pids_kill_all_and_pull_plug(topo: Topology) -> None:
    a, b = topo.hosts["a"], topo.hosts["b"]
    a.add_lan_ip(f"192.168.77.21/{LAN_PREFIX}")
    proc = a.popen([sys.executable, "-c", "import time; print('in', flush=True); time.sleep(60)"],
                   stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "in\n"
        assert a.pids() == [proc.pid]
        assert b.pids() == []
        assert a.kill_all() == [proc.pid]
        assert proc.wait(timeout=5) == -9
    finally:
        proc.kill()
        proc.wait(timeout=5)
        proc.stdout.close()
    assert a.pids() == []

    a.pull_plug()
    assert {link["operstate"] for link in a.links() if link["ifname"] != "lo"} == {"DOWN"}
    assert not ping(topo.client, "192.168.77.21")
    assert not ping(b, a.ft_ip)
    a.plug_in()
    assert reachable(topo.client, "192.168.77.21")
    assert reachable(b, a.ft_ip)


def test_storage_on_the_lan_and_cut_off() -> None:
    others = set(list_netns())
    with Topology(storage=True) as t:
        a, b = t.hosts["a"], t.hosts["b"]
        assert t.storage is not None and t.storage.name == f"{t.prefix}-sto"
        assert t.storage.name in t.namespaces and set(t.namespaces) <= set(list_netns())
        assert (a.lan_ip, b.lan_ip) == ("192.168.77.201", "192.168.77.202")
        assert ping(a, STORAGE_IP) and ping(b, STORAGE_IP)
        assert ping(t.storage, a.lan_ip)
        t.cut_storage()
        assert not ping(a, STORAGE_IP, wait=1) and not ping(b, STORAGE_IP, wait=1)
        assert ping(t.client, a.lan_ip)        # the rest of the LAN stays
        t.restore_storage()
        assert reachable(a, STORAGE_IP) and reachable(b, STORAGE_IP)
        a.pull_plug()                           # a dead host loses the storage too
        assert not ping(a, STORAGE_IP, wait=1)
        a.plug_in()
        assert reachable(a, STORAGE_IP)
    assert set(list_netns()) == others
    with pytest.raises(ValueError, match="reserved|one of"):
        Topology(hosts=["sto"])
    with Topology(hosts=1) as t:
        assert t.storage is None and t.hosts["a"].lan_ip is None
        with pytest.raises(RuntimeError, match="no storage"):
            t.cut_storage()


def test_call_runs_in_the_namespace(topo: Topology) -> None:
    a = topo.hosts["a"]
    a.add_lan_ip(f"192.168.77.21/{LAN_PREFIX}")

    def addresses() -> set[str]:
        import socket
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((CLIENT_IP, 9))            # no packet: just a route lookup
            return {s.getsockname()[0]}

    def netns() -> tuple[int, int]:
        st = os.stat("/proc/thread-self/ns/net")
        return st.st_dev, st.st_ino

    assert a.call(addresses) == {"192.168.77.21"}
    assert a.call(netns) == a.ident != netns()   # only that thread moved
    with pytest.raises(ZeroDivisionError):
        a.call(lambda: 1 / 0)
    stuck = threading.Event()
    with pytest.raises(TimeoutError, match="did not return within 0.1 s"):
        a.call(stuck.wait, 30, timeout=0.1)
    stuck.set()


def test_teardown_removes_namespaces() -> None:
    others = set(list_netns())
    with Topology() as t:
        names = t.namespaces
        assert set(names) <= set(list_netns())
        t.hosts["a"].add_tap("vmtap0")
        # a straggler is killed at teardown, not left holding the namespace
        straggler = t.hosts["b"].popen(["busybox", "sleep", "60"])
    assert straggler.wait(timeout=5) == -9
    assert set(list_netns()) == others
    assert not (topo_mod.OWNER_DIR / t.prefix).exists()


def test_teardown_after_exception_in_body() -> None:
    others = set(list_netns())
    with pytest.raises(RuntimeError, match="boom"):
        with Topology(hosts=3) as t:
            assert set(t.namespaces) <= set(list_netns())
            raise RuntimeError("boom")
    assert set(list_netns()) == others


def test_failed_command_raises_topology_error(topo: Topology) -> None:
    with pytest.raises(TopologyError, match=r"ip -n vmft[0-9a-f]{4}-a link set dev nosuch0 up.*"):
        topo.hosts["a"].set_link("nosuch0", True)


CRASH = """
import os
from vmft_qemu.topology import Topology
t = Topology().start()
print(t.prefix, flush=True)
os._exit(1)   # crash: no teardown
"""


def test_cleanup_leftovers_removes_only_dead_runs() -> None:
    others = set(list_netns())
    res = subprocess.run([sys.executable, "-c", CRASH], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    dead = res.stdout.strip()
    assert res.returncode == 1 and re.fullmatch(r"vmft[0-9a-f]{4}", dead), res.stderr
    left = {n for n in list_netns() if n.startswith(dead + "-")}
    try:
        assert len(left) == 5
        with Topology() as live:
            pattern = f"{re.escape(dead)}|{re.escape(live.prefix)}"
            assert set(cleanup_leftovers(pattern)) == left
            assert set(live.namespaces) <= set(list_netns())   # its owner is alive
            assert cleanup_leftovers(pattern) == []
    finally:
        cleanup_leftovers(re.escape(dead))
    assert set(list_netns()) == others
