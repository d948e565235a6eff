"""Event loops: uvloop when available, and a loop in a daemon thread for blocking callers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from transport.errors import InvalidUsageError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long ``run`` waits for a timed-out coroutine to finish its cancellation
#: before giving up on it (it may still be touching the caller's buffers).
_CANCEL_GRACE_S = 5.0

_fallback_logged = threading.Event()  # "log once per process", nothing else is kept


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A fresh event loop: uvloop's when importable, else asyncio's default (logged once).

    uvloop keeps the memoryviews it is handed instead of copying unsent bytes,
    which is what lets sends stay zero-copy (DESIGN §5). Raises nothing.
    """
    try:
        import uvloop
    except ImportError:
        if not _fallback_logged.is_set():
            _fallback_logged.set()
            log.info("uvloop is not installed; using the default asyncio event loop")
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether the calling thread is running ``loop`` (transports may only be touched there)."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class LoopThread:
    """One event loop running in a daemon thread, driven from blocking code.

    >>> lt = LoopThread("pccl-io")
    >>> lt.run(asyncio.sleep(0, result=3))
    3
    >>> lt.stop()
    """

    def __init__(self, name: str = "pccl-loop") -> None:
        self.loop = new_event_loop()
        self._stopped = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            asyncio.set_event_loop(None)

    def _check_caller(self, what: str) -> None:
        if self._stopped:
            raise InvalidUsageError(f"LoopThread.{what}() after stop()")
        if threading.current_thread() is self._thread:
            raise InvalidUsageError(
                f"LoopThread.{what}() called from its own loop thread would deadlock; await instead"
            )

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and block until it finishes; return its result.

        The coroutine's own exception is re-raised unchanged. On timeout (or if
        the calling thread is interrupted) the coroutine is cancelled and waited
        for, so it no longer touches the caller's buffers when this returns.

        Raises:
            TimeoutError: ``timeout`` seconds passed first.
            InvalidUsageError: called from the loop thread itself, or after ``stop()``.
        """
        try:
            self._check_caller("run")
        except InvalidUsageError:
            coro.close()
            raise
        finished = threading.Event()
        box: list[asyncio.Task[T]] = []

        def start() -> None:
            task = self.loop.create_task(coro)
            task.add_done_callback(lambda _t: finished.set())
            box.append(task)

        self.loop.call_soon_threadsafe(start)
        try:
            in_time = finished.wait(timeout)
        except BaseException:  # KeyboardInterrupt in the caller: do not leave it running
            self._cancel_and_wait(box, finished)
            raise
        if not in_time:
            self._cancel_and_wait(box, finished)
            task = box[0]
            if not (task.done() and not task.cancelled()):
                raise TimeoutError(f"operation did not finish within {timeout} s")
        return box[0].result()

    def _cancel_and_wait(self, box: list[asyncio.Task[Any]], finished: threading.Event) -> None:
        # The task is only cancelled once the loop gets to it; wait until it
        # really ended so it no longer touches the caller's buffers.
        self.loop.call_soon_threadsafe(lambda: box[0].cancel() if box else None)
        finished.wait(_CANCEL_GRACE_S)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; the returned future resolves with its outcome.

        Raises:
            InvalidUsageError: after ``stop()``.
        """
        if self._stopped:
            coro.close()
            raise InvalidUsageError("LoopThread.submit() after stop()")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Call ``fn(*args)`` on the loop thread as soon as possible (thread-safe).

        Raises:
            InvalidUsageError: after ``stop()``.
        """
        if self._stopped:
            raise InvalidUsageError("LoopThread.call_soon() after stop()")
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self) -> None:
        """Cancel every task still on the loop, wait for them, stop the loop and join the thread.

        Idempotent. Raises:
            InvalidUsageError: called from the loop thread itself.
        """
        if self._stopped:
            return
        if threading.current_thread() is self._thread:
            raise InvalidUsageError("LoopThread.stop() called from its own loop thread")
        self._stopped = True
        done = asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop)
        try:
            done.result(_CANCEL_GRACE_S * 2)
        except Exception as exc:  # shutdown trouble must not keep the caller from joining
            log.warning("LoopThread shutdown did not complete cleanly: %r", exc)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()

    async def _shutdown(self) -> None:
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.loop.shutdown_asyncgens()

    def __enter__(self) -> LoopThread:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def invoke_callback(fn: Callable[[Any], Any], arg: Any, what: str) -> None:
    """Call a user callback; if it returns an awaitable, run it as a task. Errors are logged."""
    try:
        result = fn(arg)
    except Exception:
        log.exception("%s callback failed", what)
        return
    if inspect.isawaitable(result):
        task = asyncio.ensure_future(result)
        task.add_done_callback(lambda t: _log_task_error(t, what))


def _log_task_error(task: asyncio.Future[Any], what: str) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s callback failed", what, exc_info=task.exception())
