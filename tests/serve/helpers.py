"""Shared by the in-process serving tests: one torch thread while they run, and a bounded wait."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """The server decodes in the test process: on a shared 2-core machine, torch's spinning worker
    threads make tiny-model steps 10x slower and timings noisy. Restored afterwards. A module that
    imports this fixture gets it for all its tests."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def wait_for(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll ``cond`` every 10 ms; fail the test if it is not true within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)
