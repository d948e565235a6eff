"""Several all-reduces in flight, retried on the smaller ring after a lost peer (``docs/protocol.md`` §5.6.1).

Every member runs the same loop, and the master tells every member the same outcome of each
operation, so the members agree on which tensors are done. The rule that picks what to run
must keep them agreeing on what to *start*: a tag one member initiates and another never does
waits forever (collectives waiting on collectives are not a cycle the master breaks, §5.10).
Here every member keeps exactly the ``max_in_flight`` lowest-numbered unfinished tensors in
flight; a failed one stays among them and is restarted at once. Once every outcome has
arrived, every member has the same unfinished set, hence the same operations in flight, and
each of them can start.
"""

from __future__ import annotations

import concurrent.futures
from typing import Callable

from collectives import ReduceInfo
from pccl.errors import PCCLError, PeerLostError

__all__ = ["reduce_multiple_with_retry"]

Start = Callable[[int], "concurrent.futures.Future[ReduceInfo]"]


def reduce_multiple_with_retry(count: int, max_in_flight: int, start: Start) -> ReduceInfo:
    """Run operations ``0..count-1`` via ``start(i)`` until each succeeded once.

    ``start(i)`` launches operation ``i`` and returns its future (raising at once for
    misuse). A ``PeerLostError`` outcome restarts the operation; any other error stops
    launching, waits for the operations still in flight, and is raised.

    Returns the smallest world size among the results and the summed byte counts.

    Raises:
        PCCLError: the first error other than ``PeerLostError`` (``TooFewPeersError`` once
            the group is down to this peer).
    """
    results: dict[int, ReduceInfo] = {}
    running: dict[concurrent.futures.Future[ReduceInfo], int] = {}
    error: PCCLError | None = None
    while True:
        if error is None:
            error = _top_up(count, max_in_flight, start, results, running)
        if not running:
            break
        finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in finished:
            i = running.pop(future)
            try:
                results[i] = future.result()
            except PeerLostError:
                continue  # its tensor was restored; _top_up restarts it on the new ring
            except PCCLError as exc:
                error = error or exc
    if error is not None:
        raise error
    return ReduceInfo(
        min(info.world_size for info in results.values()),
        sum(info.tx_bytes for info in results.values()),
        sum(info.rx_bytes for info in results.values()),
    )


def _top_up(
    count: int,
    max_in_flight: int,
    start: Start,
    results: dict[int, ReduceInfo],
    running: dict[concurrent.futures.Future[ReduceInfo], int],
) -> PCCLError | None:
    """Start the lowest unfinished operations not yet running, up to ``max_in_flight`` of them."""
    active = set(running.values())
    wanted = [i for i in range(count) if i not in results][:max_in_flight]
    for i in wanted:
        if i in active:
            continue
        try:
            running[start(i)] = i
        except PCCLError as exc:
            return exc
    return None
