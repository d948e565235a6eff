"""A driver of the sans-IO master for the tests: feeds it events, keeps every peer's inbox."""

from __future__ import annotations

from typing import Any

from pccl import protocol as P
from pccl.master_state import Bind, Kick, MasterState, Received, Refuse, RegisterRequest, Send

TIMEOUT = 2.0  # the heartbeat timeout unless a test asks for another


class Harness:
    """Drives a MasterState (heartbeat timeout ``timeout``) and keeps every peer's inbox."""

    def __init__(self, timeout: float = TIMEOUT, **kwargs: Any) -> None:
        self.state = MasterState(timeout, **kwargs)
        self.now = 0.0
        self.inbox: dict[int, list[Any]] = {}
        self.kicks: dict[int, Kick] = {}
        self.refusals: list[str] = []
        self._conn = 0

    def feed(self, event: Any) -> None:
        for action in self.state.handle(self.now, event):
            if isinstance(action, Bind):
                self.inbox[action.peer] = []
            elif isinstance(action, Send):
                self.inbox[action.peer].append(action.msg)
            elif isinstance(action, Kick):
                self.kicks[action.peer] = action
            elif isinstance(action, Refuse):
                self.refusals.append(action.reason)

    def register(self, group: int = 0, host: str = "127.0.0.1", advertise: str | None = None) -> int:
        self._conn += 1
        before = set(self.inbox)
        self.feed(RegisterRequest(self._conn, P.Register(group, 5000 + self._conn, advertise), host))
        new = set(self.inbox) - before
        return new.pop() if new else -1

    def send(self, peer: int, msg: Any) -> None:
        self.feed(Received(peer, msg))

    def take(self, peer: int, kind: type) -> list[Any]:
        """Messages of ``kind`` received by ``peer`` since the last take."""
        got = [m for m in self.inbox[peer] if isinstance(m, kind)]
        self.inbox[peer] = [m for m in self.inbox[peer] if not isinstance(m, kind)]
        return got

    def ready_all(self) -> None:
        """Every member reports links ready for its group's current epoch."""
        for group in list(self.state.groups.values()):
            for peer in list(group.ring):
                if group.id in self.state.groups and peer in group.ring:
                    self.send(peer, P.LinksReady(group.epoch))

    def run_of(self, n: int, group: int = 0) -> list[int]:
        """``n`` accepted, linked peers of ``group``."""
        first = self.register(group)
        self.ready_all()
        peers = [first] + [self.register(group) for _ in range(n - 1)]
        if n > 1:
            self.send(first, P.Vote(P.UPDATE_TOPOLOGY))
            self.ready_all()
        assert self.state.accepted() == sorted(peers)
        for peer in peers:
            self.inbox[peer].clear()
        return peers
