"""Flush on request: the recording's log up to now, for the output gate's stamps.

Part of the output rule (`output_gate.py`): a frame the guest sends is
stamped with a log position at or after the instruction that sent it.  Under
record, that position is already in the log when the frame reaches the
controller: the guest's notify queues virtio-net's transmit bottom half as an
async event, and QEMU's vCPU thread logs the event before it runs the bottom
half that sends the frame.  But the log may still sit in QEMU's stdio buffer.

The logflush plugin (`qemu_plugins/logflush.c`, `flush_socket=`) answers
every datagram on its socket after a flush that began after the datagram
came.  So once `flush()` returns, the record pipe holds all the log QEMU had
written when it was called, the events that sent every frame that arrived
before among it.  One datagram each way replaces a QMP `query-replay`.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path

REQUEST = struct.Struct("<Q")  # a sequence number, echoed by the plugin


class FlushRequests:
    """The controller's end of the plugin's flush socket."""

    def __init__(self, plugin: Path, own: Path, retry_s: float = 0.05) -> None:
        """`plugin`: the socket the plugin binds; `own`: this end's address;
        `retry_s`: ask again after this long without an answer (a QEMU that
        has not bound its socket yet, or one replaced by a join)."""
        self._plugin = str(plugin)
        self._retry_s = retry_s
        own.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(own))
        self._sock.setblocking(False)
        self._own = own
        self._seq = 0
        self._answered: asyncio.Future[None] | None = None
        self.retries = 0
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._on_answer)

    async def flush(self) -> None:
        """Return once the recording has flushed its log after this call began."""
        while True:
            self._seq += 1
            self._answered = asyncio.get_running_loop().create_future()
            try:
                self._sock.sendto(REQUEST.pack(self._seq), self._plugin)
            except (FileNotFoundError, ConnectionRefusedError, BlockingIOError):
                pass  # no plugin listening yet: ask again after retry_s
            try:
                await asyncio.wait_for(self._answered, self._retry_s)
                return
            except TimeoutError:
                self.retries += 1

    def _on_answer(self) -> None:
        while True:
            try:
                answer = self._sock.recv(REQUEST.size)
            except BlockingIOError:
                return
            # An answer to an earlier request proves nothing about this one.
            if (len(answer) == REQUEST.size and REQUEST.unpack(answer)[0] == self._seq
                    and self._answered is not None and not self._answered.done()):
                self._answered.set_result(None)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()
        self._own.unlink(missing_ok=True)
