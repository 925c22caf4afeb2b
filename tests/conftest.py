"""Shared fixtures: the guest image, and FT pairs of real controllers.

Every process a test starts is stopped at the end (by process group, and any
QEMU left over by its command line); every wait has a deadline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from vmft_qemu import images
from vmft_qemu.pair import LocalPair


@pytest.fixture(scope="session")
def image() -> images.GuestImage:
    return images.locate()


@pytest.fixture
def pair_factory(tmp_path: Path, image: images.GuestImage) -> Iterator[Callable[..., LocalPair]]:
    made: list[LocalPair] = []

    def make(**kwargs: Any) -> LocalPair:
        pair = LocalPair(tmp_path / f"pair{len(made)}", **kwargs)
        made.append(pair)
        return pair

    yield make
    for pair in made:
        pair.stop()
