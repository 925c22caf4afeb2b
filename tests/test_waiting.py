"""The bounded waits: the condition's value once it holds, TimeoutError after the bound."""

from __future__ import annotations

import asyncio
import time
from typing import Callable

import pytest

from vmft_qemu.waiting import wait_for, wait_until


def _true_on_call(n: int) -> tuple[Callable[[], dict[str, int] | None], list[int]]:
    """A condition false for its first n - 1 calls, then a truthy dict; and its call count."""
    calls = [0]

    def condition() -> dict[str, int] | None:
        calls[0] += 1
        return {"calls": calls[0]} if calls[0] >= n else None
    return condition, calls


def test_wait_for_returns_the_conditions_truthy_value() -> None:
    condition, calls = _true_on_call(3)
    assert wait_for(condition, 5, "the third call", every=0.01) == {"calls": 3}
    assert calls == [3]


def test_wait_for_does_not_sleep_when_the_condition_holds_at_once() -> None:
    start = time.monotonic()
    assert wait_for(lambda: "ready", 5, "nothing", every=10) == "ready"
    assert time.monotonic() - start < 1


def test_wait_for_raises_timeout_error_naming_what_after_the_bound() -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="waiting for the moon to turn blue"):
        wait_for(lambda: 0, 0.2, "the moon to turn blue", every=0.02)
    took = time.monotonic() - start
    assert 0.2 <= took < 2, f"gave up after {took:.2f} s"


def test_wait_for_passes_on_the_conditions_own_error() -> None:
    def exited() -> bool:
        raise ChildProcessError("exited with 1")
    with pytest.raises(ChildProcessError, match="exited with 1"):
        wait_for(exited, 5, "a child that died")


def test_wait_until_returns_the_conditions_truthy_value() -> None:
    condition, calls = _true_on_call(3)
    assert asyncio.run(wait_until(condition, 5, "the third call", every=0.01)) == {"calls": 3}
    assert calls == [3]


def test_wait_until_raises_timeout_error_naming_what_after_the_bound() -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="waiting for the moon to turn blue"):
        asyncio.run(wait_until(lambda: [], 0.2, "the moon to turn blue", every=0.02))
    took = time.monotonic() - start
    assert 0.2 <= took < 2, f"gave up after {took:.2f} s"


def test_wait_until_lets_the_event_loop_run_between_polls() -> None:
    async def scenario() -> str:
        ready = asyncio.Event()
        asyncio.get_running_loop().call_later(0.05, ready.set)
        return await wait_until(lambda: ready.is_set() and "set", 2, "the event", every=0.01)

    assert asyncio.run(scenario()) == "set"
