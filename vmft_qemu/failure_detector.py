"""Failure detection: is the partner still there?

Paper section 2.3: "VMware FT uses UDP heartbeating between servers that are
running fault-tolerant VMs to detect when a server may have crashed.  In
addition, VMware FT monitors the logging traffic ..."  Here each side sends a
small UDP datagram every `failure.heartbeat_ms`; the backup listens at
`backup.address:failure.heartbeat_port` and answers to wherever the primary's
heartbeats come from.  Every frame on the log channel counts as a sign of life
too.  The partner is declared failed when

- nothing (heartbeat or log frame) came for `failure.timeout_ms`, or
- heartbeats come but the log channel has been down for `channel_grace_ms`
  (for the primary counted from its start: a backup that never comes is failed
  too; a backup only watches a primary it has heard from):
  a primary that cannot ship its log can release no output, and a backup that
  gets no log can never catch up, so the pair is no longer fault tolerant.

A declared failure is only a suspicion: what happens next is decided by the
test-and-set on shared storage (`test_and_set`), never by this module.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from typing import Any

from .config import FTConfig
from .events import emit

log = logging.getLogger(__name__)

MAGIC = "vmft-heartbeat"
STALL_REPORT_S = 0.1  # an own stall this long is reported: the partner sees us silent


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, detector: "FailureDetector") -> None:
        self.detector = detector

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.detector._on_datagram(data, addr)


class FailureDetector:
    """UDP heartbeats to and from the partner, plus the log channel's liveness."""

    def __init__(self, config: FTConfig, role: str) -> None:
        self.config = config
        self.role = role
        self.vm = config.vm.name
        self.timeout = config.failure.timeout_ms / 1000
        self.grace = config.failure.channel_grace_ms / 1000
        self.every = config.failure.heartbeat_ms / 1000
        now = time.monotonic()
        self.started = now
        self.last_heard = now  # heartbeat or log frame
        self.channel_up = False
        self.ever_heard = False
        self.channel_changed = now
        self.heartbeats_in = 0
        self._partner: Any = None  # where to send: the backup's fixed address, or learnt
        self._transport: asyncio.DatagramTransport | None = None
        self._seq = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        backup = (self.config.backup.address, self.config.failure.heartbeat_port)
        if self.role == "backup":
            self._transport, _ = await loop.create_datagram_endpoint(
                lambda: _Endpoint(self), local_addr=backup)
        else:
            self._partner = backup
            self._transport, _ = await loop.create_datagram_endpoint(
                lambda: _Endpoint(self), family=socket.AF_INET)  # any local port

    def partner_at(self, address: str) -> None:
        """The primary's backup is now at `address` (a standby joined, `reprotect`)."""
        self._partner = (address, self.config.failure.heartbeat_port)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # --- signs of life ----------------------------------------------------------

    def heard(self) -> None:
        """A frame arrived on the log channel."""
        self.last_heard = time.monotonic()
        self.ever_heard = True

    def set_channel(self, up: bool) -> None:
        if up != self.channel_up:
            self.channel_up = up
            self.channel_changed = time.monotonic()
            if up:
                self.heard()

    def _on_datagram(self, data: bytes, addr: Any) -> None:
        try:
            beat = json.loads(data)
        except ValueError:
            return
        if not isinstance(beat, dict) or beat.get("magic") != MAGIC or beat.get("vm") != self.vm:
            return  # someone else's heartbeat: ignore, never count it
        if beat.get("role") == self.role:
            return
        self.heartbeats_in += 1
        self.last_heard = time.monotonic()
        self.ever_heard = True
        if self.role == "backup":
            self._partner = addr

    def _send(self) -> None:
        if self._transport is None or self._partner is None:
            return
        self._seq += 1
        beat = {"magic": MAGIC, "vm": self.vm, "role": self.role, "pid": os.getpid(),
                "seq": self._seq}
        try:
            self._transport.sendto(json.dumps(beat).encode(), self._partner)
        except OSError:
            pass  # the link is down: the partner will notice our silence

    # --- the verdict ------------------------------------------------------------

    def failure(self) -> str | None:
        """Why the partner counts as failed now, or None while it looks alive."""
        now = time.monotonic()
        if not self.ever_heard:
            waited = now - self.started
            if self.role == "backup" or waited <= self.grace:
                return None
            return f"no backup came within {waited * 1000:.0f} ms of the start"
        silent = now - self.last_heard
        if silent > self.timeout:
            return f"partner silent for {silent * 1000:.0f} ms (no heartbeat, no log traffic)"
        if not self.channel_up and now - self.channel_changed > self.grace:
            return (f"log channel down for {(now - self.channel_changed) * 1000:.0f} ms "
                    "while heartbeats still arrive")
        return None

    async def wait_failure(self) -> str:
        """Send heartbeats until the partner counts as failed; return why.

        The verdict is checked ten times per timeout, so a silent partner is
        declared failed at most timeout * 1.1 after it was last heard."""
        check = min(self.every, self.timeout / 10)
        next_beat = 0.0
        woke = time.monotonic()
        while True:
            now = time.monotonic()
            stalled = now - woke - check
            if stalled > check:
                # This process was not scheduled for a while: the partner's
                # silence over that time is no evidence (its heartbeats may be
                # waiting in our socket).  Only count time we were running.
                if stalled > STALL_REPORT_S:
                    emit(log, "controller-stalled", logging.WARNING, role=self.role,
                         ms=round(stalled * 1000, 1))
                self.last_heard += stalled
                self.channel_changed += stalled
                self.started += stalled
            if now >= next_beat:
                self._send()
                next_beat = now + self.every
            reason = self.failure()
            if reason is not None:
                await asyncio.sleep(0)  # take what is queued for us first
                reason = self.failure()
            if reason is not None:
                emit(log, "partner-failed", logging.WARNING, role=self.role, reason=reason,
                     heartbeats_in=self.heartbeats_in)
                return reason
            woke = time.monotonic()
            await asyncio.sleep(check)

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"heartbeats_in": self.heartbeats_in,
                "last_heard_ms": round((now - self.last_heard) * 1000, 1),
                "channel_up": self.channel_up}
