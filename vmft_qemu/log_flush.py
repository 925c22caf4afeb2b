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
import struct
from pathlib import Path

from .vnic import open_dgram_port

REQUEST = struct.Struct("<Q")  # a sequence number, echoed by the plugin


class FlushRequests:
    """The controller's end of the plugin's flush socket."""

    def __init__(self, plugin: Path, own: Path, retry_s: float = 0.05) -> None:
        """`plugin`: the socket the plugin binds; `own`: this end's address;
        `retry_s`: ask again after this long without an answer (a QEMU that
        has not bound its socket yet, or one replaced by a join)."""
        self._retry_s = retry_s
        self._own = own
        self._port = open_dgram_port(own, plugin)
        self._port.listen(self._on_answer)
        self._seq = 0
        self._answered: asyncio.Future[None] | None = None
        self.retries = 0

    async def flush(self) -> None:
        """Return once the recording has flushed its log after this call began."""
        while True:
            self._seq += 1
            self._answered = asyncio.get_running_loop().create_future()
            # With no plugin listening yet the request is dropped: asked again after retry_s.
            self._port.send(REQUEST.pack(self._seq))
            try:
                await asyncio.wait_for(self._answered, self._retry_s)
                return
            except TimeoutError:
                self.retries += 1

    def _on_answer(self, answer: bytes) -> None:
        # An answer to an earlier request proves nothing about this one.
        if (len(answer) == REQUEST.size and REQUEST.unpack(answer)[0] == self._seq
                and self._answered is not None and not self._answered.done()):
            self._answered.set_result(None)

    def close(self) -> None:
        self._port.close()
        self._own.unlink(missing_ok=True)
