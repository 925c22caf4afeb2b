"""The `vmft` command: run either side of an FT pair, watch it, build the guest.

    vmft primary --config vm.toml     run the guest under record, ship the log
    vmft backup  --config vm.toml     replay the primary's log in lock-step
    vmft protect --config vm.toml     stand by as the new backup of a VM running alone
    vmft status  [--config vm.toml]   every controller here: state, lag, log rate, gate
    vmft report  RUNDIR               plots and a summary of a run, from its run dirs
    vmft lock show --config vm.toml   who holds the pair's go-live lock (test-and-set)
    vmft image build                  build the guest kernel, initramfs and disk
    vmft disk compare --config vm.toml  do both sides' disk copies hold the same blocks?
    vmft config example               print an annotated configuration
    vmft demo                         a guest under FT on netns hosts; its primary's host dies
    vmft cluster show|start|stop|pull-plug ...   FT VMs on several hosts, over SSH
    vmft agent serve                  the host agent `vmft cluster` talks to
    vmft libvirt xml --config F --role R   a side's QEMU as a libvirt domain (virsh create)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from . import agent, cluster, libvirt_domain
from . import config as cfg
from . import disk_identity
from . import status as st
from .events import to_jsonl


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)


def _load_config(path: Path) -> cfg.FTConfig:
    try:
        return cfg.load(path)
    except cfg.ConfigError as e:
        raise SystemExit(f"vmft: config error: {e}") from None


def _run_side(args: argparse.Namespace, role: str) -> int:
    from .backup import BackupController
    from .go_live import SNAPSHOT
    from .images import ImageMissing, locate
    from .primary import PrimaryController

    config = _load_config(args.config)
    try:
        image = locate(config.vm.image_cache)
    except ImageMissing as e:
        raise SystemExit(f"vmft: {e}") from None
    run_dir = config.primary.run_dir if role == "primary" else config.backup.run_dir
    standby = role == "protect"
    role = "backup" if standby else role
    to_jsonl(run_dir / "events.jsonl", config.vm.name, role)
    # The controller's heartbeats and gate must not wait behind its QEMU's CPU
    # use: a starved controller looks dead to its partner (QEMU runs at 0).
    os.setpriority(os.PRIO_PROCESS, 0, CONTROLLER_NICE)

    async def serve(controller: PrimaryController | BackupController) -> Any:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Whichever QEMU runs then (a join replaces the primary's).
            loop.add_signal_handler(sig, lambda: controller.machine.terminate())
        return await controller.run()

    async def main() -> int:
        if role == "primary":
            return await serve(PrimaryController(config, image))
        backup = BackupController(config, image, standby=standby)
        outcome = await serve(backup)
        if outcome != "live":
            return BACKUP_EXIT[outcome]
        # This side won the go-live lock: the VM runs on here, alone, in the
        # pair's generation (a joined backup's lock epoch is its pair's).
        return await serve(PrimaryController(backup.config, image, host="backup",
                                             resume=SNAPSHOT, resume_icount=backup.live_icount))

    return asyncio.run(main())


CONTROLLER_NICE = -10

# The backup's exit status for each way its replay can end.
BACKUP_EXIT = {"shut-down": 0, "failed": 1, "lost-lock": 3}


def cmd_primary(args: argparse.Namespace) -> int:
    return _run_side(args, "primary")


def cmd_backup(args: argparse.Namespace) -> int:
    return _run_side(args, "backup")


def cmd_protect(args: argparse.Namespace) -> int:
    return _run_side(args, "protect")


def cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console, Group
    from rich.live import Live

    run_dirs = [(run_dir, {"vm": config.vm.name, "role": role})
                for config in map(_load_config, args.config)
                for role, run_dir in (("primary", config.primary.run_dir),
                                      ("backup", config.backup.run_dir))]
    targets = st.discover(run_dirs, args.scan)
    snapshots: list[dict[str, Any]] = []

    def title() -> str:
        where = "from the configs" if args.config else f"under {args.scan}"
        return (f"vmft status {time.strftime('%H:%M:%S')}: {len(targets)} controller(s) {where}"
                + ("" if targets else " (none found; give --config or --scan)"))

    if args.json:
        snapshots = st.gather(targets)
        print(json.dumps(snapshots, default=str, indent=1))
    elif args.once or not sys.stdout.isatty():
        snapshots = st.gather(targets)
        console = Console(width=None if sys.stdout.isatty() else 180)
        console.print(st.table(snapshots, title()))
        for snap in snapshots:
            console.print(st.render(snap), highlight=False, markup=False)
    else:
        with Live(auto_refresh=False) as live:
            try:
                while True:
                    snapshots = st.gather(targets)
                    live.update(Group(st.table(snapshots, title()),
                                      *[f"{s['vm']} {s['role']}: {e}" for s in snapshots
                                        for e in s.get("errors", [])[-1:]]), refresh=True)
                    time.sleep(args.interval)
            except KeyboardInterrupt:
                pass
    return 0 if snapshots and all(map(st.answering, snapshots)) else 1


def cmd_report(args: argparse.Namespace) -> int:
    from .report import NoRunData, write_report

    try:
        written = write_report(args.rundir, args.out)
    except NoRunData as e:
        print(f"vmft report: {e}", file=sys.stderr)
        return 2
    print(f"report: {written.markdown}\nplots:  {written.png}")
    return 0


def cmd_lock(args: argparse.Namespace) -> int:
    from . import test_and_set as tas

    config = _load_config(args.config)
    epoch = args.epoch or config.lock.epoch
    try:
        lock = tas.open_lock(config.lock)
        if lock is None:
            print(f"{config.vm.name}: lock.backend is \"none\": this pair never goes live alone")
            return 1
        where = f"{lock}/{tas.lock_name(config.vm.name, epoch)}"
        holder = asyncio.run(tas.read_holder(lock, config.vm.name, epoch,
                                             config.lock.timeout_ms / 1000))
    except tas.LockUnavailable as e:
        print(f"vmft: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"lock": where, "holder": holder and holder.to_json()}))
    elif holder is None:
        print(f"{where}: not held (or its holder is still writing it)")
    else:
        print(f"{where}: held by the {holder.role} on host {holder.host} (pid {holder.pid}) "
              f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.time))}")
    return 0 if holder else 1


def cmd_image(args: argparse.Namespace) -> int:
    from . import images

    argv = ["build"] + (["--cache", str(args.cache)] if args.cache else [])
    return images.main(argv + (["--force"] if args.force else []))


def _show_digest(label: str, found: disk_identity.DiskDigest) -> str:
    at = f" @{found.snapshot}" if found.snapshot else ""
    return f"{label}{found.path}{at}: sha256 {found.sha256} ({found.size / 2**20:.1f} MiB)"


def cmd_disk_digest(args: argparse.Namespace) -> int:
    try:
        found = disk_identity.digest(args.disk, args.snapshot)
    except disk_identity.DiskReadError as e:
        print(f"vmft: {e}", file=sys.stderr)
        return 2
    print(json.dumps(found.to_json()) if args.json else _show_digest("", found))
    return 0


def cmd_disk_compare(args: argparse.Namespace) -> int:
    from .machine import MachinePaths

    config = _load_config(args.config)
    snapshots = dict(args.snapshot)
    try:
        sides = {role: disk_identity.digest(MachinePaths(run_dir).disk, snapshots.get(role))
                 for role, run_dir in (("primary", config.primary.run_dir),
                                       ("backup", config.backup.run_dir))}
    except disk_identity.DiskReadError as e:
        print(f"vmft: {e}", file=sys.stderr)
        return 2
    differing = sides["primary"].differing(sides["backup"])
    if args.json:
        print(json.dumps({"identical": not differing, "differing": differing,
                          **{role: d.to_json() for role, d in sides.items()}}))
    else:
        for role, found in sides.items():
            print(_show_digest(f"{config.vm.name} {role}: ", found))
        print("identical: both copies hold the same guest-visible blocks" if not differing else
              "DIFFERENT at " + ", ".join(f"{a / 2**20:.0f}-{b / 2**20:.0f} MiB"
                                          for a, b in differing))
    return 1 if differing else 0


def _side_snapshot(text: str) -> tuple[str, str]:
    side, _, name = text.partition("=")
    if side not in ("primary", "backup") or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: give primary=NAME or backup=NAME")
    return side, name


def cmd_config(args: argparse.Namespace) -> int:
    print(cfg.__doc__.split("\n\n", 2)[2].replace("\n    ", "\n").strip())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(seconds=args.seconds, workdir=args.workdir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmft",
        description="Fault-tolerant VMs on QEMU record/replay, after VMware FT. "
                    "A primary QEMU records every non-deterministic input into a replay "
                    "log; a backup QEMU replays it live from a TCP log channel.",
        epilog="Start the backup first, then the primary, with the same --config. "
               "`vmft config example` prints a configuration to start from.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def side(name: str, func, text: str) -> None:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", type=Path, required=True, help="the pair's TOML file")
        p.set_defaults(func=func)

    side("primary", cmd_primary,
         "Run the guest under icount record and ship its replay log to the backup.")
    side("backup", cmd_backup,
         "Listen for the primary's log channel and replay the log live.")
    p = sub.add_parser(
        "protect", help="make this host the new backup of a VM that runs alone",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Make this host the new backup of a VM that runs alone (after a "
        "takeover): wait as a standby at backup.address:log_port until the VM's primary "
        "joins it.\n\nThe primary of a VM running alone looks for a standby at every "
        "protect.hosts entry of its config (when protect.auto is true, the default).  It "
        "pauses its guest for a moment to take a snapshot (savevm), sends the VM state and "
        "the disk as of that snapshot over the log channel, and streams the log from the "
        "snapshot on; this host's replay starts from the snapshot and follows it.  Once this "
        "host has the log up to the present, the primary holds its output for this host's "
        "ACKs again: the VM is protected, and the pair races for the next lock epoch if one "
        "of them fails.  Until then this host never goes live.  Runs until the guest shuts "
        "down, like `vmft backup`, and goes live the same way if the primary fails.")
    p.add_argument("--config", type=Path, required=True,
                   help="the VM's TOML file as on this host (backup.* is this host)")
    p.set_defaults(func=cmd_protect)
    p.epilog = ("example, on the spare host (its config's backup.address is this host's):\n"
                "  vmft protect --config /etc/vmft/vm.toml")

    p = sub.add_parser(
        "status", help="every FT controller on this host: state, lag, log rate, gate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Ask the FT controllers on this host for their view, one row each: "
                    "the state (protected, lagging, alone, ...) and for how long, the icount, "
                    "the lag (ms of the primary's running time and instructions; a backup shows "
                    "the log it has still to replay), log KiB/s, ACK delay, the output gate "
                    "(frames held / released / last hold in ms), when the partner was last "
                    "heard and the share of time lag control slows the primary.  Then the "
                    "details of each.\n\nWhich controllers: both sides of each --config (shown "
                    "as not answering when not running here), else every status.sock under "
                    "--scan (default /run/vmft, where run_dir lives by default).\n\nOn a "
                    "terminal the view refreshes live until Ctrl-C; piped, or with --once, it "
                    "prints once.  --json prints the controllers' snapshots as a JSON list, the "
                    "same data the metrics endpoint and metrics.jsonl carry.  Exit status 0: "
                    "every controller answered; 1: none found or one did not answer.",
        epilog="examples:\n  vmft status                       live view of this host\n"
               "  vmft status --config vm.toml --once\n"
               "  vmft status --json | jq '.[] | {vm, role, state, lag_ms}'")
    p.add_argument("--config", type=Path, action="append", default=[],
                   help="a pair's TOML (repeatable): show both of its sides")
    p.add_argument("--scan", type=Path, default=st.RUN_ROOT, metavar="DIR",
                   help="without --config, find status sockets under DIR (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the snapshots as JSON, once")
    p.add_argument("--once", action="store_true", help="print once, even on a terminal")
    p.add_argument("--interval", type=float, default=1.0, metavar="S",
                   help="live refresh period in seconds (default 1)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "report", help="plots and a markdown summary of a run (lag, log, gate, failovers)",
        description="Read a run's record: every controller run dir under RUNDIR (its "
                    "metrics.jsonl, sampled twice a second from the controller's status; "
                    "events.jsonl, its state changes; gate.jsonl, every frame the output gate "
                    "held) and write report.png (lag, log bandwidth and output hold time over "
                    "time, failovers marked) and report.md (the state timeline, failovers, and "
                    "lag, bandwidth and hold-time figures).  RUNDIR is one controller's run_dir "
                    "or a directory above several (a pair's, a demo's workdir).",
        epilog="example: vmft report /run/vmft/demo")
    p.add_argument("rundir", type=Path, metavar="RUNDIR")
    p.add_argument("--out", type=Path, help="write the report here (default RUNDIR)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("lock", help="show who holds the go-live lock",
                       description="Read the pair's go-live lock (the test-and-set on shared "
                                   "storage, [lock] in the config) and print its holder.  Exit "
                                   "status 0: held, 1: not held, 2: storage unreachable.")
    p.add_argument("action", choices=["show"])
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--epoch", type=int, help="this epoch instead of lock.epoch")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lock)

    p = sub.add_parser("image", help="build the guest image",
                       description="Build the guest (Debian kernel, busybox initramfs, ext4 "
                                   "disk) from Debian's packages into a cache.")
    p.add_argument("action", choices=["build"])
    p.add_argument("--cache", type=Path, help="cache directory (default /var/cache/vmft/images)")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=cmd_image)

    disk = sub.add_parser(
        "disk", help="check that both sides' disk copies hold the same guest-visible blocks",
        description="Each host of the pair runs the guest on its own qcow2 copy of the disk "
                    "(the paper's non-shared disks), and the backup's replay repeats every "
                    "write.  These commands read what the guest sees on a copy (the bytes of "
                    "/dev/vda, not the qcow2 file), read-only, even while a QEMU has it open.",
        epilog="Compare when both QEMUs have stopped (after a clean shutdown both have made "
               "the same writes): while the pair runs, the backup is behind by the writes "
               "it has not replayed yet.  After a go-live, `--snapshot backup=vmft-go-live` "
               "reads the new primary's copy as of the moment its replay stopped.")
    actions = disk.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("digest", help="sha256 of the guest-visible blocks of one copy",
                           description="Print the sha256 of what the guest sees on DISK "
                                       "(what each host of a real pair would send the other).")
    p.add_argument("disk", type=Path, help="a disk copy (qcow2 or raw)")
    p.add_argument("--snapshot", metavar="NAME", help="as of this internal snapshot")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_disk_digest)
    p = actions.add_parser("compare", help="compare both sides' copies of a pair",
                           description="Digest both sides' copies (run_dir/disk.qcow2 of "
                                       "[primary] and [backup]) and name the MiB ranges that "
                                       "differ.  Exit status 0: identical, 1: different, 2: a "
                                       "copy could not be read.")
    p.add_argument("--config", type=Path, required=True, help="the pair's TOML file")
    p.add_argument("--snapshot", type=_side_snapshot, action="append", default=[],
                   metavar="SIDE=NAME",
                   help="read that side's copy as of an internal snapshot (primary=NAME or "
                        "backup=NAME; repeatable)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_disk_compare)

    p = sub.add_parser("config", help="print an annotated example configuration")
    p.add_argument("action", choices=["example"])
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("demo", help="a guest under FT on netns hosts; kill the primary's host",
                       description="As root: make a LAN and two FT hosts as network "
                                   "namespaces, start the backup on one and the primary on the "
                                   "other, let a client increment the guest's counter through "
                                   "the output gate while both sides are shown live, then pull "
                                   "the plug on the primary's host and watch the backup take "
                                   "over; report lost work (none), the time the guest was gone "
                                   "and whether the console carried on.")
    p.add_argument("--seconds", type=float, default=20,
                   help="how long to run protected before the kill (default 20)")
    p.add_argument("--workdir", type=Path, default=Path("/run/vmft/demo"))
    p.set_defaults(func=cmd_demo)

    agent.add_cli(sub)
    cluster.add_cli(sub)
    libvirt_domain.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
