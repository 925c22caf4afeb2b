"""A TCP proxy for the log channel that damages one primary->backup LOG frame.

It forwards byte-exact in both directions and, on the first LOG frame of its
first connection from the `at`-th on that carries more than a few bytes,
corrupts, truncates, duplicates or reorders it.  Later
connections (the primary's reconnect) pass untouched.  Mode "tamper" is
different: it changes one byte of the first ARP packet the guest receives
(an ASYNC_NET event in the log) and re-seals the frame with a valid checksum,
so the backup replays a different input: what the divergence check is for.

`LogProxy`, the forwarding it is built on, serves `stepper.py` too.

Run as a program (`python -m tests.faults LISTEN_PORT TARGET_HOST TARGET_PORT
MODE`) it prints "injected" when it has done its work: for a netns host.
"""

from __future__ import annotations

import dataclasses
import socket
import sys
import threading

from vmft_qemu import log_channel as lc
from vmft_qemu.replay_log import ReplayLogReader

MODES = ("corrupt", "truncate", "duplicate", "reorder")
NET_EVENT = 9  # ASYNC_NET: an inbound packet
NET_PACKET = 10  # its packet starts after kind, filter id, flags and length
ARP = b"\x08\x06"  # the Ethernet type of ARP
ARP_SENDER_MAC_LAST = 14 + 8 + 5  # Ethernet header, ARP header, sender MAC


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _hang_up(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class LogProxy:
    """A TCP proxy for the log channel: backup -> primary byte-exact, primary ->
    backup through `_pipe_frames`, which each kind of proxy defines."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1",
                 listen_port: int = 0) -> None:
        self.target_port, self.target_host = target_port, target_host
        self.listener = socket.create_server(("127.0.0.1", listen_port))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        for s in [self.listener, *self._sockets]:
            try:
                s.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                backend = socket.create_connection((self.target_host, self.target_port))
            except OSError:  # the backup is not listening (yet): the primary retries
                client.close()
                continue
            self.connections += 1
            self._sockets += [client, backend]
            threading.Thread(target=self._pipe_raw, args=(backend, client), daemon=True).start()
            threading.Thread(target=self._pipe_frames, args=(client, backend, self.connections),
                             daemon=True).start()

    @staticmethod
    def _pipe_raw(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        _hang_up(src, dst)

    def _pipe_frames(self, src: socket.socket, dst: socket.socket, connection: int) -> None:
        raise NotImplementedError


class FaultProxy(LogProxy):
    def __init__(self, target_port: int, mode: str, at: int = 20,
                 target_host: str = "127.0.0.1", listen_port: int = 0) -> None:
        assert mode in MODES + ("tamper",)
        self.mode, self.at = mode, at
        self.injected = threading.Event()
        super().__init__(target_port, target_host, listen_port)

    def _pipe_frames(self, src: socket.socket, dst: socket.socket, connection: int) -> None:
        damage = connection == 1  # later connections (the primary's reconnect) pass untouched
        logs = 0
        held: bytes | None = None
        try:
            while (header := _read_exact(src, lc.HEADER.size)) is not None:
                length = lc.HEADER.unpack(header)[7]
                payload = _read_exact(src, length)
                if payload is None:
                    break
                frame = header + payload
                is_log = header[5] == lc.FrameType.LOG
                logs += is_log
                if damage and is_log and self.mode == "tamper":
                    frame = self._tamper(frame)
                elif (damage and is_log and logs >= self.at and length > 8
                      and not self.injected.is_set()):
                    frame = self._damage(frame, dst)
                    if frame is None:  # truncated and half-closed: the backup hangs up
                        return
                    if self.mode == "reorder":
                        held, frame = frame, b""
                elif held is not None and is_log:
                    frame, held = frame + held, None
                dst.sendall(frame)
        except OSError:
            pass
        _hang_up(src, dst)

    def _tamper(self, raw: bytes) -> bytes:
        """Change the sender MAC inside the first ARP packet the guest receives,
        in the log, and re-seal the frame: the backup's guest then answers a
        different MAC than the primary's did."""
        if self.injected.is_set():
            return raw
        frame = lc.decode(raw)
        for event in ReplayLogReader().feed(frame.payload):
            packet = event.offset + NET_PACKET
            if event.kind == NET_EVENT and frame.payload[packet + 12:packet + 14] == ARP:
                payload = bytearray(frame.payload)
                payload[packet + ARP_SENDER_MAC_LAST] ^= 0x01
                self.injected.set()
                return dataclasses.replace(frame, payload=bytes(payload)).encode()
        return raw

    def _damage(self, frame: bytes, dst: socket.socket) -> bytes | None:
        self.injected.set()
        if self.mode == "corrupt":
            raw = bytearray(frame)
            raw[lc.HEADER.size + 3] ^= 0x5A
            return bytes(raw)
        if self.mode == "truncate":
            dst.sendall(frame[: lc.HEADER.size + (len(frame) - lc.HEADER.size) // 2])
            dst.shutdown(socket.SHUT_WR)
            return None
        if self.mode == "duplicate":
            return frame + frame
        return frame  # reorder: the caller holds it back


if __name__ == "__main__":
    listen, host, port, mode = sys.argv[1:5]
    proxy = FaultProxy(int(port), mode, target_host=host, listen_port=int(listen))
    print("listening", flush=True)
    proxy.injected.wait()
    print("injected", flush=True)
    threading.Event().wait()  # keep forwarding until killed
