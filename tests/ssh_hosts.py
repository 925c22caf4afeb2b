"""Real sshd on netns hosts, for tests that reach hosts over SSH (cluster, ansible).

Each host of a `Topology(storage=True)` gets its own OpenSSH server, listening
on the host's LAN address, with a host key made for this test; one client key
(also made here) may log in as root.  A known_hosts file lists the hosts' keys
under their addresses, so clients check them (nothing is accepted blindly).
Every sshd is started by the test and stopped by its PID.
"""

from __future__ import annotations

import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vmft_qemu.topology import Host, Topology
from vmft_qemu.waiting import wait_for

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")       # sshd refuses to start without it

SSHD_CONFIG = """\
ListenAddress {address}:22
HostKey {host_key}
PidFile {run_dir}/sshd.pid
AuthorizedKeysFile {authorized_keys}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
PrintMotd no
Subsystem sftp internal-sftp
LogLevel VERBOSE
"""


def keygen(path: Path) -> Path:
    """A new ed25519 key pair at `path` (and `path`.pub); returns `path`."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name,
                    "-f", str(path)], check=True)
    return path


@dataclass
class SshHost:
    host: Host
    run_dir: Path
    process: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        assert self.host.lan_ip is not None
        return self.host.lan_ip


class SshHosts:
    """An sshd on each host of `topo`; the client key and known_hosts to reach them."""

    def __init__(self, topo: Topology, root: Path) -> None:
        self.topo = topo
        self.root = root
        self.hosts: dict[str, SshHost] = {}
        root.mkdir(parents=True, exist_ok=True)
        self.client_key = keygen(root / "client_key")
        self.known_hosts = root / "known_hosts"

    def __enter__(self) -> SshHosts:
        try:
            PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
            authorized = self.root / "authorized_keys"
            authorized.write_text(self.client_key.with_suffix(".pub").read_text())
            known = []
            for short, host in self.topo.hosts.items():
                run_dir = self.root / short
                run_dir.mkdir()
                host_key = keygen(run_dir / "ssh_host_ed25519_key")
                config = run_dir / "sshd_config"
                config.write_text(SSHD_CONFIG.format(address=host.lan_ip, host_key=host_key,
                                                     run_dir=run_dir, authorized_keys=authorized))
                with open(run_dir / "sshd.log", "wb") as out:
                    proc = host.popen([SSHD, "-D", "-e", "-f", str(config)],
                                      stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)
                self.hosts[short] = SshHost(host, run_dir, proc)
                known.append(f"{host.lan_ip} {host_key.with_suffix('.pub').read_text()}")
            self.known_hosts.write_text("".join(known))
            for ssh in self.hosts.values():
                wait_for(lambda: self._listening(ssh), 10, f"sshd on {ssh.host.name}",
                         every=0.05)
        except BaseException:
            self.close()
            raise
        return self

    def _listening(self, ssh: SshHost) -> bool:
        if ssh.process.poll() is not None:
            raise RuntimeError(f"sshd on {ssh.host.name} exited {ssh.process.returncode}: "
                               f"{(ssh.run_dir / 'sshd.log').read_text()[-1000:]}")
        return self.topo.client.call(_accepts, ssh.address, 22)

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for ssh in self.hosts.values():
            if ssh.process.poll() is None:
                ssh.process.terminate()
            try:
                ssh.process.wait(5)
            except subprocess.TimeoutExpired:
                ssh.process.kill()
                ssh.process.wait(5)


def _accepts(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False

