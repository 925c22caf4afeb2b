"""Failure detection over real UDP on loopback: heartbeats, silence, strangers."""

from __future__ import annotations

import asyncio
import json
import socket
import time

from vmft_qemu import config as cfg
from vmft_qemu.failure_detector import MAGIC, FailureDetector
from vmft_qemu.pair import free_port


def _config(port: int, **failure: int) -> cfg.FTConfig:
    return cfg.from_dict({"vm": {"name": "fd"}, "failure": {"heartbeat_port": port, **failure}})


def test_partners_hear_each_other_and_a_silent_one_is_failed_within_the_timeout() -> None:
    config = _config(free_port(), timeout_ms=250)

    async def scenario() -> tuple[float, str, int]:
        backup, primary = FailureDetector(config, "backup"), FailureDetector(config, "primary")
        await backup.start()
        await primary.start()
        watching = asyncio.create_task(backup.wait_failure())
        primary_watch = asyncio.create_task(primary.wait_failure())
        await asyncio.sleep(1.0)  # a second of healthy heartbeats both ways
        assert not watching.done() and not primary_watch.done()
        assert backup.heartbeats_in >= 10 and primary.heartbeats_in >= 10
        primary_watch.cancel()
        primary.close()  # the primary dies: no more heartbeats
        died = time.monotonic()
        reason = await asyncio.wait_for(watching, 5)
        backup.close()
        return time.monotonic() - died, reason, backup.heartbeats_in

    took, reason, _ = asyncio.run(scenario())
    assert "silent" in reason
    assert took <= 0.25 * 1.2, f"declared failed {took * 1000:.0f} ms after the last heartbeat"


def test_log_channel_down_for_the_grace_time_counts_as_failed() -> None:
    config = _config(free_port(), channel_grace_ms=300)

    async def scenario() -> str:
        backup, primary = FailureDetector(config, "backup"), FailureDetector(config, "primary")
        await backup.start()
        await primary.start()
        beating = asyncio.create_task(primary.wait_failure())
        backup.set_channel(True)
        backup.set_channel(False)  # heartbeats go on, the channel does not come back
        try:
            return await asyncio.wait_for(backup.wait_failure(), 5)
        finally:
            beating.cancel()
            primary.close()
            backup.close()

    assert "log channel down" in asyncio.run(scenario())


def test_heartbeats_of_another_vm_or_garbage_do_not_count() -> None:
    port = free_port()
    config = _config(port, timeout_ms=250)

    async def scenario() -> tuple[int, str | None]:
        backup = FailureDetector(config, "backup")
        await backup.start()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for payload in (b"not json", json.dumps({"magic": MAGIC, "vm": "other",
                                                     "role": "primary"}).encode(),
                            json.dumps({"magic": MAGIC, "vm": "fd", "role": "backup"}).encode()):
                s.sendto(payload, ("127.0.0.1", port))
        await asyncio.sleep(0.5)  # twice the timeout: a window for a wrong verdict
        backup.close()
        return backup.heartbeats_in, backup.failure()

    # Nothing counted as the primary, and a backup that never heard a primary
    # has nobody to declare failed.
    assert asyncio.run(scenario()) == (0, None)


def test_a_primary_whose_backup_never_comes_declares_it_failed() -> None:
    config = _config(free_port(), channel_grace_ms=300)

    async def scenario() -> str:
        primary = FailureDetector(config, "primary")
        await primary.start()
        try:
            return await asyncio.wait_for(primary.wait_failure(), 5)
        finally:
            primary.close()

    assert "no backup came" in asyncio.run(scenario())
