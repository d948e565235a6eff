"""Queues of received control messages (``docs/protocol.md`` §3)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from transport.errors import PeerLostError
from transport.message import Message

if TYPE_CHECKING:
    from transport.connection import Connection

#: Reading pauses while this many received control messages wait to be consumed.
INBOX_HIGH_WATER = 1024


class Inbox:
    """Received control messages waiting for ``recv_message``; may be shared by several connections."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: deque[Message] = deque()
        self._waiters: deque[asyncio.Future[Message]] = deque()
        self._error: Callable[[], PeerLostError] | None = None
        self._paused: set[Connection] = set()

    def put(self, msg: Message, conn: Connection) -> None:
        """Deliver ``msg``; pauses ``conn`` when too many are waiting. Raises nothing."""
        if self._error is not None:
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(msg)
                return
        self._items.append(msg)
        if len(self._items) >= INBOX_HIGH_WATER:
            self._paused.add(conn)
            conn.pause_reading("inbox")

    async def get(self) -> Message:
        """The next message; after ``fail`` the queued ones, then the failure.

        Raises:
            PeerLostError: the source failed and nothing is queued.
        """
        if self._items:
            msg = self._items.popleft()
            if self._paused and len(self._items) < INBOX_HIGH_WATER // 2:
                for conn in self._paused:
                    conn.resume_reading("inbox")
                self._paused.clear()
            return msg
        if self._error is not None:
            raise self._error()
        waiter: asyncio.Future[Message] = self._loop.create_future()
        self._waiters.append(waiter)
        return await waiter

    def move_to(self, other: Inbox, conn: Connection) -> None:
        """Hand the queued messages of ``conn`` over to ``other`` (a link taking the connection over)."""
        items, self._items = self._items, deque()
        for msg in items:
            other.put(msg, conn)
        if conn in self._paused:
            self._paused.discard(conn)
            conn.resume_reading("inbox")

    def fail(self, error: Callable[[], PeerLostError], *, drop: bool = False) -> None:
        """Make pending and (once drained, or at once with ``drop``) later gets raise ``error()``."""
        if self._error is None:
            self._error = error
        if drop:
            self._items.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error())
