"""The cluster playbook over SSH: three netns hosts, each with a real sshd.

`ansible/cluster.yml` runs from the client's namespace (the operator's
machine on the LAN) against hosts a, b and c over OpenSSH, with the hosts'
keys checked against a known_hosts file.  The hosts share this machine's
filesystem, where `make setup` has installed the packages and vmft, so those
steps are switched off (`vmft_manage_packages`, `vmft_install`,
`vmft_nfs_manage_packages`) and every path the roles write is the host's own
directory under the test's tmp.  Host c is also the NFS storage: the ganesha
configuration the nfs_storage role wrote is started in c's namespace and
serves a go-live test-and-set from host a.  A second run changes nothing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from tests.ssh_hosts import SshHosts
from vmft_qemu import test_and_set as tas
from vmft_qemu.nfs_server import NfsServer, rpc_null
from vmft_qemu.topology import Topology

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
STORAGE_HOST = "c"
PSEUDO = "/vmft"


class RoleNfsServer(NfsServer):
    """nfs-ganesha run with the configuration file the nfs_storage role wrote."""

    def __init__(self, rendered: Path, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rendered = rendered

    def config_text(self) -> str:
        return self.rendered.read_text()


def host_dir(root: Path, short: str) -> Path:
    return root / "hosts" / short


def inventory(root: Path, topo: Topology, ssh: SshHosts) -> dict:
    ssh_args = (f"-o UserKnownHostsFile={ssh.known_hosts} -o StrictHostKeyChecking=yes "
                "-o IdentitiesOnly=yes -o ControlMaster=no")
    ft_hosts = {}
    for short, host in topo.hosts.items():
        d = host_dir(root, short)
        ft_hosts[short] = {
            "ansible_host": host.lan_ip,
            "vmft_agent_state_dir": str(d / "agent"),
            "vmft_agent_socket": str(d / "agent.sock"),
            "vmft_systemd_unit_dir": str(d / "systemd"),
        }
    storage = host_dir(root, STORAGE_HOST)
    return {"all": {
        "vars": {
            "ansible_user": "root",
            "ansible_python_interpreter": "/usr/bin/python3",
            "ansible_ssh_private_key_file": str(ssh.client_key),
            "ansible_ssh_common_args": ssh_args,
            # The shared filesystem has the packages and vmft already.
            "vmft_manage_packages": False,
            "vmft_install": False,
            "vmft_nfs_manage_packages": False,
            "vmft_nfs_client_manage_packages": False,
            "vmft_agent_command": str(VENV_BIN / "vmft"),
            "vmft_nfs_server": topo.hosts[STORAGE_HOST].lan_ip,
            "vmft_nfs_pseudo": PSEUDO,
        },
        "children": {
            "ft_hosts": {"hosts": ft_hosts},
            "nfs_storage": {"hosts": {STORAGE_HOST: {
                "vmft_ganesha_config": str(storage / "ganesha.conf"),
                "vmft_nfs_export_dir": str(storage / "export"),
                "vmft_nfs_state_dir": str(storage / "ganesha"),
            }}},
        },
    }}


@pytest.fixture
def ssh_hosts(tmp_path: Path) -> Iterator[tuple[Topology, SshHosts]]:
    with Topology(hosts=3, storage=True) as topo, SshHosts(topo, tmp_path / "ssh") as ssh:
        yield topo, ssh


def playbook(topo: Topology, inventory_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible" / "ansible.cfg"),
           "ANSIBLE_HOST_KEY_CHECKING": "True", "ANSIBLE_FORCE_COLOR": "0",
           "ANSIBLE_NOCOLOR": "1", "LC_ALL": "C.UTF-8"}
    return topo.client.run([str(VENV_BIN / "ansible-playbook"), "-i", str(inventory_path),
                            str(REPO / "ansible" / "cluster.yml")],
                           capture_output=True, text=True, env=env, timeout=300)


def recap(out: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP: host -> {ok, changed, unreachable, failed, ...}."""
    found = {}
    for host, counts in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", out, re.M):
        found[host] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", counts)}
    return found


def test_the_cluster_playbook_provisions_three_hosts_over_ssh(tmp_path: Path,
                                                              ssh_hosts) -> None:
    topo, ssh = ssh_hosts
    inventory_path = tmp_path / "inventory.yml"
    inventory_path.write_text(json.dumps(inventory(tmp_path, topo, ssh), indent=2))

    first = playbook(topo, inventory_path)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    counts = recap(first.stdout)
    assert sorted(counts) == ["a", "b", "c"]
    assert all(c["failed"] == 0 and c["unreachable"] == 0 and c["changed"] > 0
               for c in counts.values()), counts
    # This kernel has no NFSv4 client: the mount is skipped, and the play says why.
    assert "no NFSv4 client" in first.stdout

    for short in topo.hosts:
        unit = host_dir(tmp_path, short) / "systemd" / "vmft-agent.service"
        text = unit.read_text()
        assert (f"ExecStart={VENV_BIN / 'vmft'} agent serve --name {short} "
                f"--socket {host_dir(tmp_path, short) / 'agent.sock'}") in text
        assert "KillMode=process" in text
        verify = subprocess.run(["systemd-analyze", "verify", str(unit)],
                                capture_output=True, text=True)
        assert verify.returncode == 0, verify.stderr

    # The storage role's ganesha configuration serves the go-live lock.
    storage = host_dir(tmp_path, STORAGE_HOST)
    with RoleNfsServer(storage / "ganesha.conf", netns=topo.hosts[STORAGE_HOST],
                       export_dir=storage / "export", run_dir=storage / "ganesha-run",
                       pseudo=PSEUDO):
        server = topo.hosts[STORAGE_HOST].lan_ip
        assert topo.client.call(rpc_null, server)
        lock = tas.NfsLock(server, PSEUDO, timeout_ms=2000)
        owner = tas.LockOwner(host="a", pid=1, vm="web", epoch=1, role="backup")
        verdict = topo.hosts["a"].call(lock.test_and_set, owner)
        assert verdict.won
        assert (storage / "export" / tas.lock_name("web", 1)).exists()

    second = playbook(topo, inventory_path)
    assert second.returncode == 0, second.stdout[-4000:]
    assert all(c["changed"] == 0 for c in recap(second.stdout).values()), second.stdout[-3000:]
