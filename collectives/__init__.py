"""Ring collectives: all-reduce, reduce-scatter, all-gather, broadcast, reduce ops, quantization.

Built on a small "link to a neighbour" interface (:class:`RingPeers`); the wire layout is in
``docs/protocol.md`` §7 and the layer's interfaces in ``docs/architecture.md``.
"""

from collectives.buffers import BufferPool
from collectives.engine import RingPeers
from collectives.peers import LinkRingPeers
from collectives.ring import ring_all_gather, ring_all_reduce, ring_broadcast, ring_reduce_scatter
from collectives.schedule import DEFAULT_PIECE_BYTES
from collectives.types import Quantization, ReduceInfo, ReduceOp

__all__ = [
    "DEFAULT_PIECE_BYTES",
    "BufferPool",
    "LinkRingPeers",
    "Quantization",
    "ReduceInfo",
    "ReduceOp",
    "RingPeers",
    "ring_all_gather",
    "ring_all_reduce",
    "ring_broadcast",
    "ring_reduce_scatter",
]
