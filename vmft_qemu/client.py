"""The outside world: a client of the guest's services.

The output rule exists for clients like this one: what it has seen
acknowledged must never be contradicted.  It talks to the guest's TCP counter
service (`INC` -> the new value, `GET` -> the value) and its web server, one
request at a time, and reports every answer with its latency as JSON, so
tests and benchmarks can check that all answers are right and measure them.

    python -m vmft_qemu.client counter --host 192.168.77.10 --count 100
    python -m vmft_qemu.client http --host 192.168.77.10 --path /ft.html --count 20
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import sys
import time
from typing import Any

COUNTER_PORT = 7000
HTTP_PORT = 80


def counter(host: str, count: int, timeout: float, command: str = "INC",
            retries: int = 0, duration: float | None = None) -> dict[str, Any]:
    """`count` requests on one connection (or as many as fit in `duration`
    seconds); every answer and its latency, and when (time.monotonic(), the
    same clock in every process of this machine) the first request went out
    and the last answer came, for throughput over several clients.

    With `retries`, a broken connection is replaced by a new one (at most that
    many times) and the requests go on; each replacement is reported, with
    the error that caused it and the request that had no answer."""
    answers: list[int] = []
    latencies: list[float] = []
    reconnects: list[dict[str, Any]] = []
    error = None
    started = ended = None
    end = time.monotonic() + duration if duration else float("inf")
    while len(answers) < count and time.monotonic() < end:
        try:
            with socket.create_connection((host, COUNTER_PORT), timeout=timeout) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                stream = sock.makefile("rwb", buffering=0)
                while len(answers) < count and time.monotonic() < end:
                    start = time.monotonic()
                    started = started or start
                    stream.write(f"{command}\n".encode())
                    line = stream.readline()
                    if not line:
                        raise ConnectionError("the service closed the connection")
                    ended = time.monotonic()
                    latencies.append((ended - start) * 1000)
                    answers.append(int(line))
        except (OSError, ValueError) as e:
            error = f"{type(e).__name__}: {e}"
            if len(reconnects) >= retries:
                break
            reconnects.append({"after_answers": len(answers), "error": error})
            error = None
    return {"answers": answers, "latency_ms": latencies, "error": error,
            "reconnects": reconnects, "started": started, "ended": ended}


def http(host: str, path: str, count: int, timeout: float) -> dict[str, Any]:
    """`count` GETs of `path`, one connection each; status, body digest, latency."""
    pages: list[dict[str, Any]] = []
    error = None
    try:
        for _ in range(count):
            start = time.perf_counter()
            with socket.create_connection((host, HTTP_PORT), timeout=timeout) as sock:
                sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            status = int(head.split()[1]) if head.startswith(b"HTTP/") else 0
            pages.append({"status": status, "bytes": len(body),
                          "sha256": hashlib.sha256(body).hexdigest(),
                          "latency_ms": (time.perf_counter() - start) * 1000})
    except (OSError, ValueError, IndexError) as e:
        error = f"{type(e).__name__}: {e}"
    return {"pages": pages, "error": error}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmft_qemu.client", description=__doc__)
    parser.add_argument("service", choices=["counter", "http"])
    parser.add_argument("--host", required=True)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--path", default="/index.html")
    parser.add_argument("--get", action="store_true", help="counter: GET instead of INC")
    parser.add_argument("--timeout", type=float, default=30.0, help="per socket operation")
    parser.add_argument("--duration", type=float, default=None,
                        help="counter: stop after this many seconds (or --count requests)")
    parser.add_argument("--retries", type=int, default=0,
                        help="counter: reconnect this many times after a broken connection")
    args = parser.parse_args(argv)
    if args.service == "counter":
        result = counter(args.host, args.count, args.timeout, "GET" if args.get else "INC",
                         args.retries, args.duration)
    else:
        result = http(args.host, args.path, args.count, args.timeout)
    json.dump(result, sys.stdout)
    print()
    return 0 if result["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
