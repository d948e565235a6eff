"""Running blocking pccl calls of several in-process peers at once, for the tests."""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable


def in_parallel(*calls: Callable[[], Any], timeout: float = 20) -> list[Any]:
    """Run blocking calls on threads at once; each one's result or raised exception, in order.

    A call still running after ``timeout`` seconds fails the test (it stays blocked until
    its Communicator is closed, as the fixtures do).
    """
    pool = concurrent.futures.ThreadPoolExecutor(len(calls))
    futures = [pool.submit(call) for call in calls]
    try:
        out = []
        for fut in futures:
            try:
                out.append(fut.result(timeout))
            except concurrent.futures.TimeoutError:
                raise AssertionError(f"no outcome within {timeout} s: the calls hang") from None
            except Exception as exc:  # the test asserts on it
                out.append(exc)
        return out
    finally:
        pool.shutdown(wait=False)
