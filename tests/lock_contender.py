"""A contender for the go-live lock, run by tests/test_test_and_set.py in a host's netns.

    python lock_contender.py --host a --vm VM --role primary (--nfs SERVER EXPORT | --dir D)

For each epoch read from stdin (one per line) it runs one test-and-set and
prints the outcome as a JSON line; it exits at end of input.  The test writes
the same epoch to every contender at once: each line is a starting gun.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from vmft_qemu.test_and_set import GoLiveLock, LockOwner, LockUnavailable, NfsLock, PathLock


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--vm", required=True)
    parser.add_argument("--role", default="backup")
    parser.add_argument("--timeout-ms", type=int, default=2000)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--nfs", nargs=2, metavar=("SERVER", "EXPORT"))
    where.add_argument("--dir")
    args = parser.parse_args()
    lock: GoLiveLock = NfsLock(*args.nfs, args.timeout_ms) if args.nfs else PathLock(args.dir)
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        owner = LockOwner(args.host, os.getpid(), args.vm, int(line), args.role)
        try:
            verdict = lock.test_and_set(owner)
            out = {"won": verdict.won, "holder": verdict.holder and verdict.holder.to_json()}
        except LockUnavailable as e:
            out = {"error": str(e)}
        print(json.dumps({"epoch": owner.epoch, "pid": owner.pid, **out}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
