"""The bounded waits every part uses: poll a condition (never sleep as a way
to synchronise), always with a bound, TimeoutError naming what was awaited."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable


def wait_for(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    """Poll `condition` until it returns something true; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
    return result


async def wait_until(condition: Callable[[], Any], timeout: float, what: str,
                     every: float = 0.1) -> Any:
    """wait_for in a coroutine: the event loop runs between polls of `condition`."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(every)
    return result
