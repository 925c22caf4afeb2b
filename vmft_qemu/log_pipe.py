"""The pipe between a controller and its QEMU's replay log file.

QEMU opens `rrfile` with stdio; a named pipe there lets the controller take the
log from the recording QEMU as it is written and hand it to the replaying one
as it arrives.  The controller holds the pipe open for reading AND writing, so
the QEMU at the other end never sees end-of-file while the controller lives:
a replaying QEMU that reads EOF exits (qemu-rr-facts.md).
"""

from __future__ import annotations

import array
import fcntl
import os
import termios
from pathlib import Path


def open_fifo(path: Path) -> int:
    """Create the named pipe `path` (anew) and open it non-blocking, read-write."""
    path.unlink(missing_ok=True)
    os.mkfifo(path, 0o600)
    return os.open(path, os.O_RDWR | os.O_NONBLOCK)


def unread_bytes(fd: int) -> int:
    """Bytes written into the pipe that its reader has not taken yet."""
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf, True)
    return buf[0]
