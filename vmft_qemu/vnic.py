"""The guest's network path on one host: QEMU <-> controller <-> the LAN.

The guest has one virtio NIC (fixed MAC, the same on both sides: it is one
VM).  Its QEMU netdev is a unix datagram socket pair with the controller, one
Ethernet frame per datagram, so the controller sees every frame the guest
sends and decides what the LAN gets: on the primary, the output gate; on the
backup, nothing.  The controller reaches the LAN through a TAP device of its
host, bridged there to the LAN link.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import os
import socket
import struct
from pathlib import Path
from typing import Callable

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
MAX_FRAME = 65536


class Port:
    """One end of a frame path: a non-blocking fd read by the event loop."""

    def __init__(self, fd: int, send: Callable[[bytes], object],
                 close: Callable[[], None]) -> None:
        self.fd = fd
        self._send = send
        self._close = close
        self.sent = 0
        self.received = 0
        self.dropped = 0

    def send(self, frame: bytes) -> None:
        try:
            self._send(frame)
            self.sent += 1
        except (BlockingIOError, ConnectionRefusedError, FileNotFoundError):
            self.dropped += 1  # like a full NIC queue: the sender's TCP retransmits

    def listen(self, on_frame: Callable[[bytes], None]) -> None:
        def readable() -> None:
            while True:
                try:
                    frame = os.read(self.fd, MAX_FRAME)
                except BlockingIOError:
                    return
                self.received += 1
                on_frame(frame)

        asyncio.get_running_loop().add_reader(self.fd, readable)

    def close(self) -> None:
        try:
            asyncio.get_running_loop().remove_reader(self.fd)
        except RuntimeError:
            pass
        self._close()


def open_tap(name: str) -> Port:
    """Attach to the existing TAP device `name` (created by the host's set-up)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    except OSError as e:
        os.close(fd)
        raise OSError(e.errno, f"cannot attach to TAP device {name!r}: {e.strerror}") from None
    return Port(fd, lambda frame: os.write(fd, frame), lambda: os.close(fd))


def open_dgram_port(own: Path, qemu: Path) -> Port:
    """Bind `own` and send to `qemu`: the controller's side of a unix datagram
    path to its QEMU (the guest NIC's netdev, logflush's flush socket)."""
    own.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(own))
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return Port(sock.fileno(), lambda frame: sock.sendto(frame, str(qemu)), sock.close)


def gratuitous_arp(mac: str, ip: str) -> bytes:
    """A broadcast ARP request for `ip` from `mac` (`ip` may carry a /prefix).

    Sent once the guest runs on a new host, so the LAN's bridges learn the
    port its MAC is behind now and hosts refresh their ARP caches."""
    hw = bytes.fromhex(mac.replace(":", ""))
    addr = ipaddress.ip_interface(ip).ip.packed
    broadcast = b"\xff" * 6
    arp = struct.pack(">HHBBH", 1, 0x0800, 6, 4, 1) + hw + addr + b"\x00" * 6 + addr
    return broadcast + hw + struct.pack(">H", 0x0806) + arp
