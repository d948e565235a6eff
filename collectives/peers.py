"""A :class:`~collectives.engine.RingPeers` over two transport links: to the next and from the previous rank."""

from __future__ import annotations

from transport.link import Link

__all__ = ["LinkRingPeers"]


class LinkRingPeers:
    """This rank's place in the ring: it sends on ``next_link`` and receives on ``prev_link``.

    With two ranks both may be the same link (each direction is separate on the wire). Transfers
    are the link's ``(tag, seq)`` transfers (``docs/protocol.md`` §4, §7.2).
    """

    def __init__(self, rank: int, world_size: int, next_link: Link, prev_link: Link) -> None:
        self._rank = rank
        self._world_size = world_size
        self.next_link = next_link
        self.prev_link = prev_link

    @property
    def rank(self) -> int:
        """This rank's position in ring order."""
        return self._rank

    @property
    def world_size(self) -> int:
        """Number of ranks in the ring."""
        return self._world_size

    async def send_next(self, tag: int, seq: int, buf: memoryview) -> None:
        """Send ``buf`` to the next rank; returns once the kernel holds every byte.

        Raises:
            PeerLostError: the link aborted or the tag was forgotten.
        """
        await self.next_link.send(tag, seq, buf)

    async def recv_prev(self, tag: int, seq: int, buf: memoryview) -> None:
        """Receive exactly ``len(buf)`` bytes of ``(tag, seq)`` from the previous rank into ``buf``.

        Raises:
            PeerLostError: the link aborted or the tag was forgotten.
            ProtocolError: the sender's transfer has another size.
        """
        await self.prev_link.recv_into(tag, seq, buf)

    def forget(self, tag: int) -> None:
        """Drop held data of ``tag`` on both links and refuse its late frames; the neighbours
        are not told (use after a success). Raises nothing."""
        self.next_link.forget(tag)
        if self.prev_link is not self.next_link:
            self.prev_link.forget(tag)

    def abort(self, tag: int, reason: str) -> None:
        """Forget ``tag`` on both links and tell both neighbours, whose transfers of ``tag`` then
        fail with ``PeerLostError`` naming ``reason`` (``docs/protocol.md`` §4, §7.6).

        Raises:
            InvalidUsageError: ``tag`` is not an unsigned 64-bit integer.
        """
        self.next_link.abort_tag(tag, reason)
        if self.prev_link is not self.next_link:
            self.prev_link.abort_tag(tag, reason)
