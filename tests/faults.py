"""A TCP proxy for the log channel that damages one primary->backup LOG frame.

It forwards byte-exact in both directions and, on the `at`-th LOG frame of its
first connection, corrupts, truncates, duplicates or reorders it.  Later
connections (the primary's reconnect) pass untouched.
"""

from __future__ import annotations

import socket
import threading

from vmft_qemu import log_channel as lc

MODES = ("corrupt", "truncate", "duplicate", "reorder")


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


class FaultProxy:
    def __init__(self, target_port: int, mode: str, at: int = 20) -> None:
        assert mode in MODES
        self.target_port, self.mode, self.at = target_port, mode, at
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.injected = threading.Event()
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
                backend = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:  # the backup is not listening (yet): the primary retries
                client.close()
                continue
            self.connections += 1
            self._sockets += [client, backend]
            damage = self.connections == 1
            threading.Thread(target=self._pipe_raw, args=(backend, client), daemon=True).start()
            threading.Thread(target=self._pipe_frames, args=(client, backend, damage),
                             daemon=True).start()

    @staticmethod
    def _pipe_raw(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        _hang_up(src, dst)

    def _pipe_frames(self, src: socket.socket, dst: socket.socket, damage: bool) -> None:
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
                if damage and is_log and logs == self.at and length > 8:
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
