"""The host agent: one small daemon per FT host, the cluster's hands on that host.

In the paper a cluster service (vCenter) decides where each FT VM's primary and
backup run and starts them on their hosts.  Here `vmft cluster` (cluster.py) is
that service and this agent is what it talks to on every host: it starts and
stops the pair's controllers (`vmft primary|backup --config F`) there, says
what runs there, and pulls the host's plug for failover drills.

It listens on a unix socket only root can open (`/run/vmft/agent.sock`); the
cluster reaches it over SSH by running one fixed command on the host,
`vmft agent call --socket PATH`, which copies one request line from stdin to
the socket and the answer back.  No request is ever turned into a shell
command: the controllers are started from a fixed argv, and the pair's
configuration arrives as TOML text that is parsed and checked
(`config.from_dict`) before it is written to the state directory.

The protocol: one JSON object per line, one request per connection.

    {"op": "info"}                                  this host: name, vmft version, its VMs
    {"op": "start", "vm": V, "role": R, "config": TOML}   start V's controller in role R
                                                    (primary, backup, or protect: a standby)
    {"op": "config", "vm": V}                       the config V's running controller here has
    {"op": "stop",  "vm": V}                        SIGTERM V's controllers here
    {"op": "kill",  "vm": V}                        SIGKILL them (and their QEMUs)
    {"op": "pull-plug"}                             drill: answer; once the caller has hung
                                                    up, every link but lo down and every
                                                    controller SIGKILLed

Every answer has "ok" and, when false, "error".  State lives in the state
directory (`VM/ROLE.toml`, `VM/ROLE.pid` with the process's start time,
`VM/ROLE.out`), so a restarted agent finds the controllers it started: the
systemd unit stops only the agent (KillMode=process), never a running VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import psutil

from . import config as cfg
from . import status as st
from .events import emit
from .waiting import wait_for, wait_until

log = logging.getLogger(__name__)

SOCKET = Path("/run/vmft/agent.sock")
STATE_DIR = Path("/var/lib/vmft/agent")
# "protect": a standby (`vmft protect`) that a primary running alone joins as its new backup.
ROLES = ("primary", "backup", "protect")
MAX_REQUEST = 1 << 20              # bytes in one request line
START_TIMEOUT = 30.0               # for a started controller to answer on its status socket
PULL_DELAY = 1.0                   # s from the pull-plug caller's hang-up to the links going down:
                                   # for the relay to exit and sshd to pass its answer on
HANG_UP_TIMEOUT = 10.0             # s the pull-plug waits at most for its caller to hang up
CALL_TIMEOUT = 60.0


class AgentError(RuntimeError):
    """A request the agent refuses or cannot carry out; the message says why."""


def version() -> str:
    try:
        return metadata.version("vmft")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class Side:
    """One controller this agent started: a VM's primary or backup on this host."""

    vm: str
    role: str
    dir: Path

    @property
    def config_path(self) -> Path:
        return self.dir / f"{self.role}.toml"

    @property
    def pid_path(self) -> Path:
        return self.dir / f"{self.role}.pid"

    @property
    def out_path(self) -> Path:
        return self.dir / f"{self.role}.out"

    def process(self) -> psutil.Process | None:
        """The controller's process if it still runs (same PID and start time)."""
        try:
            pid_s, started = self.pid_path.read_text().split()
            proc = psutil.Process(int(pid_s))
            if f"{proc.create_time():.3f}" != started or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except (OSError, ValueError, psutil.Error):
            return None

    def run_dir(self) -> Path:
        return run_dir_of(cfg.load(self.config_path), self.role)

    def status(self) -> dict[str, Any]:
        try:
            return st.query(self.run_dir() / st.SOCKET_NAME, timeout=2)
        except (OSError, ValueError, cfg.ConfigError):
            return {}

    def describe(self) -> dict[str, Any]:
        proc = self.process()
        snap = self.status() if proc else {}
        return {"vm": self.vm, "started_as": self.role, "running": proc is not None,
                "pid": proc.pid if proc else None,
                "role": current_role(self.role, snap), "state": snap.get("state"),
                "alone": snap.get("alone"), "lag_ms": snap.get("lag_ms"),
                "output_tail": "" if proc else _tail(self.out_path)}


def run_dir_of(config: cfg.FTConfig, role: str) -> Path:
    """A standby waits, and replays once joined, as the backup of its own config."""
    return config.primary.run_dir if role == "primary" else config.backup.run_dir


def current_role(started_as: str, snap: dict[str, Any]) -> str:
    """What a controller is now: a backup that went live runs on as the VM's primary,
    a standby that was joined is its backup."""
    role = snap.get("role", "backup" if started_as == "protect" else started_as)
    if role == "backup" and snap.get("state") in ("standby", "joining"):
        return "standby"
    return role


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _signal(proc: psutil.Process, sig: signal.Signals) -> None:
    """SIGTERM the controller (it shuts its QEMU down cleanly); any other signal
    goes to its process group: the controller and its QEMU."""
    try:
        if sig == signal.SIGTERM:
            os.kill(proc.pid, sig)
        else:
            os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


class Agent:
    """The agent's state and its answers to requests."""

    def __init__(self, name: str, state_dir: Path = STATE_DIR,
                 vmft: list[str] | None = None) -> None:
        self.name = name
        self.state_dir = state_dir
        # The controllers run on the Python that runs this agent.
        self.vmft = vmft or [sys.executable, "-m", "vmft_qemu"]
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        state_dir.mkdir(parents=True, exist_ok=True)

    def sides(self) -> list[Side]:
        found = []
        for vm_dir in sorted(p for p in self.state_dir.iterdir() if p.is_dir()):
            for role in ROLES:
                side = Side(vm_dir.name, role, vm_dir)
                if side.pid_path.exists():
                    found.append(side)
        return found

    def _reap(self) -> None:
        for pid, child in list(self._children.items()):
            if child.poll() is not None:
                del self._children[pid]

    # --- the operations ---------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {"host": self.name, "hostname": socket.gethostname(), "version": version(),
                "sides": [side.describe() for side in self.sides()]}

    async def start(self, vm: str, role: str, text: str) -> dict[str, Any]:
        if role not in ROLES:
            raise AgentError(f"role {role!r}: must be one of {', '.join(ROLES)}")
        try:
            config = cfg.from_dict(tomllib.loads(text), f"{vm}/{role}.toml")
        except (tomllib.TOMLDecodeError, cfg.ConfigError) as e:
            raise AgentError(f"bad configuration for {vm}: {e}") from None
        if config.vm.name != vm:
            raise AgentError(f"the configuration is for VM {config.vm.name!r}, not {vm!r}")
        side = Side(vm, role, self.state_dir / vm)
        for other in self.sides():
            if other.vm == vm and (proc := other.process()):
                raise AgentError(f"{vm} already runs here (as {other.role}, pid "
                                 f"{proc.pid}): stop it first")
        side.dir.mkdir(parents=True, exist_ok=True)
        side.config_path.write_text(text)
        with open(side.out_path, "wb") as out:
            child = subprocess.Popen([*self.vmft, role, "--config", str(side.config_path)],
                                     stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._children[child.pid] = child
        side.pid_path.write_text(f"{child.pid} {psutil.Process(child.pid).create_time():.3f}\n")
        emit(log, "agent-started", vm=vm, role=role, pid=child.pid)
        run_dir = run_dir_of(config, role)

        def answers() -> bool:   # the controller, on its status socket
            if child.poll() is not None:
                raise AgentError(f"{vm} {role} exited with {child.returncode}: "
                                 f"{_tail(side.out_path)}")
            try:
                st.query(run_dir / st.SOCKET_NAME, timeout=1)
                return True
            except (OSError, ValueError):
                return False

        try:
            await wait_until(answers, START_TIMEOUT, f"{vm} {role} to answer")
        except TimeoutError:
            raise AgentError(f"{vm} {role} (pid {child.pid}) did not answer on "
                             f"{run_dir / st.SOCKET_NAME} within {START_TIMEOUT:.0f} s") from None
        return {"pid": child.pid, "run_dir": str(run_dir)}

    def config(self, vm: str) -> dict[str, Any]:
        for side in self.sides():
            if side.vm == vm and side.process():
                return {"role": side.role, "config": side.config_path.read_text()}
        raise AgentError(f"{vm} does not run on {self.name}")

    def signal_vm(self, vm: str, sig: signal.Signals) -> dict[str, Any]:
        signalled = []
        for side in self.sides():
            if side.vm == vm and (proc := side.process()):
                _signal(proc, sig)
                signalled.append({"role": side.role, "pid": proc.pid})
        if not signalled:
            raise AgentError(f"{vm} does not run on {self.name}")
        emit(log, "agent-signalled", vm=vm, signal=sig.name, sides=signalled)
        return {"signalled": signalled}

    def pull_plug(self) -> None:
        """Every link but lo down, then every controller and its QEMU SIGKILLed."""
        links = json.loads(subprocess.run(["ip", "-j", "link", "show"], check=True,
                                          capture_output=True, text=True).stdout)
        for link in links:
            if link["ifname"] != "lo":
                subprocess.run(["ip", "link", "set", "dev", link["ifname"], "down"],
                               capture_output=True)
        for side in self.sides():
            if proc := side.process():
                _signal(proc, signal.SIGKILL)
        emit(log, "agent-plug-pulled", host=self.name)

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        self._reap()
        op = request.get("op")
        if op == "info":
            return self.info()
        if op == "start":
            return await self.start(_field(request, "vm"), _field(request, "role"),
                                    _field(request, "config"))
        if op == "config":
            return self.config(_field(request, "vm"))
        if op in ("stop", "kill"):
            return self.signal_vm(_field(request, "vm"),
                                  signal.SIGTERM if op == "stop" else signal.SIGKILL)
        if op == "pull-plug":
            return {"in_s": PULL_DELAY}
        raise AgentError(f"unknown op {op!r}: info, start, config, stop, kill or pull-plug")


def _field(request: dict[str, Any], key: str) -> str:
    value = request.get(key)
    if not isinstance(value, str) or not value:
        raise AgentError(f"request needs {key!r} (a non-empty string)")
    return value


async def serve(agent: Agent, path: Path = SOCKET) -> None:
    """Answer requests on the unix socket `path` (its owner only) until cancelled."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request: Any = None
        try:
            line = await reader.readline()
            request = json.loads(line)
            if not isinstance(request, dict):
                raise AgentError("a request is one JSON object")
            reply = {"ok": True, **await agent.handle(request)}
        except (AgentError, ValueError) as e:
            reply = {"ok": False, "error": str(e)}
        except Exception as e:   # the agent stays up; the caller learns what broke
            log.exception("request failed")
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        writer.write(json.dumps(reply, default=str).encode() + b"\n")
        await writer.drain()
        if reply["ok"] and isinstance(request, dict) and request.get("op") == "pull-plug":
            await _hung_up(reader)
            asyncio.get_running_loop().call_later(PULL_DELAY, agent.pull_plug)
        writer.close()

    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    old_umask = os.umask(0o077)
    try:
        server = await asyncio.start_unix_server(answer, str(path), limit=MAX_REQUEST)
    finally:
        os.umask(old_umask)
    emit(log, "agent-listening", host=agent.name, socket=str(path))
    async with server:
        await server.serve_forever()


async def _hung_up(reader: asyncio.StreamReader) -> None:
    """Until the caller closes its end (bounded).  A pull-plug's answer travels
    back through the host's own links (`vmft agent call` over SSH): the links go
    down only after the relay has passed it on and hung up."""
    try:
        await asyncio.wait_for(reader.read(), HANG_UP_TIMEOUT)
    except (asyncio.TimeoutError, OSError):
        pass


def run(agent: Agent, path: Path) -> int:
    """Serve until SIGTERM or SIGINT."""

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await serve(agent, path)
        except asyncio.CancelledError:
            emit(log, "agent-stopped", host=agent.name)

    asyncio.run(main())
    return 0


def detach(path: Path, log_file: Path, timeout: float = 10.0) -> int | None:
    """Fork the agent into the background; in the parent, its PID once `path` answers.

    Returns None in the child, which goes on to serve (own session, stdio to `log_file`).
    """
    pid = os.fork()
    if pid == 0:
        os.setsid()
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.close(null)
        return None

    def answers() -> bool:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            raise AgentError(f"the agent exited at once (status {status}): {_tail(log_file)}")
        try:
            call(path, {"op": "info"}, timeout=1)
            return True
        except (OSError, ValueError):
            return False

    try:
        wait_for(answers, timeout, f"the agent on {path}", every=0.05)
    except TimeoutError:
        raise AgentError(f"the agent did not answer on {path} within {timeout:.0f} s") from None
    return pid


@contextlib.contextmanager
def _session(path: Path, request: dict[str, Any], timeout: float) -> Iterator[dict[str, Any]]:
    """One request to the agent at `path`; its answer, the connection still open."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps(request).encode() + b"\n")
        with sock.makefile("rb") as answer:
            yield json.loads(answer.readline(MAX_REQUEST))


def call(path: Path, request: dict[str, Any], timeout: float = CALL_TIMEOUT) -> dict[str, Any]:
    """Send one request to the agent at `path`; its answer."""
    with _session(path, request, timeout) as answer:
        return answer


def relay(path: Path) -> int:
    """`vmft agent call`: one request line from stdin to the agent, its answer to
    stdout, written before the connection closes (a pull-plug waits for that)."""
    line = sys.stdin.buffer.readline(MAX_REQUEST)
    try:
        with _session(path, json.loads(line), CALL_TIMEOUT) as answer:
            print(json.dumps(answer), flush=True)
            return 0
    except (OSError, ValueError) as e:
        print(json.dumps({"ok": False, "error": f"no answer from the agent at {path}: {e}"}))
        return 2


# --- the command line ---------------------------------------------------------------

def cmd_agent(args: Any) -> int:
    if args.action == "call":
        return relay(args.socket)
    agent = Agent(args.name or socket.gethostname(), args.state_dir)
    if args.detach:
        pid = detach(args.socket, args.log)
        if pid is not None:
            print(pid)
            return 0
    return run(agent, args.socket)


def add_cli(sub: Any) -> None:
    """`vmft agent serve|call`."""
    p = sub.add_parser(
        "agent", help="the host agent that `vmft cluster` drives over SSH",
        description="The host agent: one per FT host (the ft_host ansible role installs it "
                    "as the systemd service vmft-agent).  It starts and stops the pair "
                    "controllers that `vmft cluster` places on this host, says what runs "
                    "here, and pulls this host's plug for drills.  It listens on a unix "
                    "socket only root can open; `vmft agent call` is the one command the "
                    "cluster runs over SSH: a JSON request on stdin, the answer on stdout.",
        epilog="Requests: {\"op\": \"info\"}, {\"op\": \"start\", \"vm\": V, \"role\": "
               "\"primary\"|\"backup\", \"config\": TOML}, {\"op\": \"stop\"|\"kill\", "
               "\"vm\": V}, {\"op\": \"pull-plug\"}.")
    p.add_argument("action", choices=["serve", "call"],
                   help="serve: run the agent; call: relay one request from stdin")
    p.add_argument("--socket", type=Path, default=SOCKET, help=f"default {SOCKET}")
    p.add_argument("--state-dir", type=Path, default=STATE_DIR,
                   help=f"where the agent keeps its VMs' configs and PIDs (default {STATE_DIR})")
    p.add_argument("--name", help="this host's name in the cluster (default: the hostname)")
    p.add_argument("--detach", action="store_true",
                   help="serve in the background; print its PID once it answers")
    p.add_argument("--log", type=Path, default=Path("/var/log/vmft-agent.log"),
                   help="with --detach: its log file")
    p.set_defaults(func=cmd_agent)
