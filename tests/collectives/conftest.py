"""Shared set-up for the collectives tests.

These tests run every rank of a ring in one process. As DESIGN.md §5 prescribes for several peers
on one machine, each test runs with one torch intra-op thread (restored afterwards): with the
default thread count, torch's thread pool stalls for tens of milliseconds whenever the machine's
cores are busy, and the ranks, all on one thread, queue up behind every stall.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
