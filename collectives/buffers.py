"""Scratch memory the ring executor reuses across calls instead of allocating per piece."""

from __future__ import annotations

import torch

from .quantize import Workspace

__all__ = ["BufferPool"]

# Buffers are allocated in multiples of this, so pieces of slightly different sizes share them.
_GRANULE = 64 * 1024


class BufferPool:
    """A free list of uint8 scratch tensors and codec workspaces, kept by the caller across calls.

    One pool may serve several operations in flight on the same event loop (they take disjoint
    buffers); it is not thread-safe. Memory stays allocated until :meth:`clear` or the pool is
    dropped; ``allocated_bytes`` counts the buffers it made and still holds or has lent out.
    """

    def __init__(self) -> None:
        self._free: dict[int, list[torch.Tensor]] = {}  # by size, a multiple of the granule
        self._workspaces: list[Workspace] = []
        self.allocated_bytes = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of at least ``nbytes`` bytes (contents undefined); give it back later."""
        size = max(_GRANULE, -(-nbytes // _GRANULE) * _GRANULE)
        fits = [k for k, bufs in self._free.items() if k >= size and bufs]
        if fits:
            return self._free[min(fits)].pop()
        self.allocated_bytes += size
        return torch.empty(size, dtype=torch.uint8)

    def give(self, buf: torch.Tensor) -> None:
        """Return a buffer obtained from :meth:`take`; nothing may read or write it any more."""
        self._free.setdefault(buf.numel(), []).append(buf)

    def take_workspace(self) -> Workspace:
        """A codec workspace for one worker (see :class:`collectives.quantize.Workspace`)."""
        return self._workspaces.pop() if self._workspaces else Workspace()

    def give_workspace(self, ws: Workspace) -> None:
        """Return a workspace obtained from :meth:`take_workspace`."""
        self._workspaces.append(ws)

    def clear(self) -> None:
        """Drop every cached buffer (buffers currently taken are unaffected)."""
        self.allocated_bytes -= sum(buf.numel() for bufs in self._free.values() for buf in bufs)
        self._free.clear()
        self._workspaces.clear()
