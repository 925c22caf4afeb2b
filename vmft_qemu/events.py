"""The event log: every state change of a controller as one structured record.

Controllers call `emit(log, "event-name", **fields)`; the record goes through
`logging` like any other message (so it shows on the terminal) and, where
`to_jsonl()` installed the handler, as one JSON line in the run directory with
time, host, VM and role.

A controller's state (starting, protected, lagging, partner-lost, alone, ...)
changes only through `Stateful.set_state`, which makes every change one
`state-change` event with `from`, `to`, `reason` and the icount the VM stands
at: the event log is the pair's history, and `vmft report` draws it.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path
from typing import Any, ClassVar


def emit(log: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    text = " ".join(f"{k}={v}" for k, v in fields.items())
    log.log(level, "%s %s", event, text, extra={"event": event, "fields": fields})


class JsonLinesHandler(logging.Handler):
    """Writes records that carry an `event` as JSON lines."""

    def __init__(self, path: Path, vm: str, role: str) -> None:
        super().__init__()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", buffering=1)
        self._static = {"host": socket.gethostname(), "vm": vm, "role": role}

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "event", None)
        if event is None:
            return
        line = {"time": round(time.time(), 6), "event": event,
                "level": record.levelname.lower(), **self._static,
                **getattr(record, "fields", {})}
        self._file.write(json.dumps(line, default=str) + "\n")

    def close(self) -> None:
        self._file.close()
        super().close()


def to_jsonl(path: Path, vm: str, role: str) -> JsonLinesHandler:
    handler = JsonLinesHandler(path, vm, role)
    logging.getLogger("vmft_qemu").addHandler(handler)
    return handler


class CappedJsonLines:
    """An append-only JSON-lines file that never grows past `max_bytes`: a full
    NAME.jsonl becomes NAME.1.jsonl (the one before is dropped), because run
    directories may be on tmpfs and an FT pair runs for months."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.older = path.with_name(self.older_name(path.name))
        self.max_bytes = max_bytes
        self._file = open(path, "a", buffering=1)
        self._size = self._file.tell()  # counted from here: a text file's tell() is slow

    @staticmethod
    def older_name(name: str) -> str:
        """Where NAME.jsonl's older records are: NAME.1.jsonl."""
        stem, dot, suffix = name.rpartition(".")
        return f"{stem}.1.{suffix}" if dot else f"{name}.1"

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=str) + "\n"
        self._file.write(line)
        self._size += len(line)  # bytes: json.dumps escapes all but ASCII
        if self._size >= self.max_bytes:
            self._file.close()
            self.path.replace(self.older)
            self._file = open(self.path, "a", buffering=1)
            self._size = 0

    def close(self) -> None:
        self._file.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Stateful:
    """A controller's state: read `self.state`, change it with `set_state()`.

    The class says where its VM stands (`vm_icount()`); every change is one
    `state-change` event, so nothing changes state without leaving a trace."""

    role: ClassVar[str]
    _state: str | None = None
    state_since: float = 0.0  # time.time() of the last change

    @property
    def state(self) -> str:
        return self._state or "?"

    def vm_icount(self) -> int:
        raise NotImplementedError

    def set_state(self, to: str, reason: str, level: int = logging.INFO, **fields: Any) -> None:
        if to == self._state:
            return
        emit(logging.getLogger(type(self).__module__), "state-change", level,
             **{"from": self._state, "to": to, "reason": reason, "icount": self.vm_icount(),
                "controller": self.role}, **fields)
        self._state, self.state_since = to, time.time()
