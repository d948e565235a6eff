"""DiLoCo where each pccl peer is one rank of a multi-process FSDP2 replica.

```python
dist.init_process_group("gloo", ...)              # the replica's own ranks (intra-replica FSDP)
fully_shard(block) for each block; fully_shard(model)
comm = connect_shard(master, group)               # peer_group = this rank's shard index
wait_for_replicas(comm, shards=group.size(), min_replicas=R)   # before ANY FSDP forward
diloco = shard_diloco(comm, model, inner_opt, inner_steps=H)
with replica_guard(comm, group):                  # a dead sibling rank: leave as a whole replica
    for batch in loader:
        loss_fn(model(batch)).backward()
        diloco.step()
```

**Layout.** Ranks holding the same shard in different replicas form one pccl peer group (the
group index is the rank inside the replica's FSDP process group), so DiLoCo's collectives and
shared state run per shard and no byte crosses between shards. DiLoCo itself is unchanged: it
operates on :class:`LocalShards`, a module whose parameters alias the local shards of the FSDP
parameters (``DTensor.to_local()``), so its ``θ_local ← θ_outer`` writes straight into the
storage FSDP all-gathers from, and its outer parameters and momentum hold the local shard only,
on CPU.

**Why the wait.** Membership votes in pccl are global: accepting a newcomer needs every accepted
peer, of every group, to call ``update_topology``. A rank that starts an FSDP forward blocks in
an intra-replica all-gather until its sibling ranks join it; if a sibling is itself still waiting
to be accepted, the vote it needs never comes and the run deadlocks. So no rank trains until
every rank of every replica is accepted: ``global_world_size == shards × largest_peer_group_size``
(each group then holds one rank of each replica), with at least ``min_replicas`` replicas. The
condition is evaluated right after the membership phase; since the world only changes through
``update_topology``, which every peer runs together, every peer reaches the same verdict on the
same update and all leave the wait together.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import time
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import pccl
from pccl import TopologyUpdateError
from training.diloco import Comm, DiLoCo

__all__ = [
    "IncompleteReplicasError",
    "LocalShards",
    "ReplicaLostError",
    "connect_shard",
    "replica_guard",
    "replicas_complete",
    "shard_diloco",
    "wait_for_replicas",
]

log = logging.getLogger("training.fsdp")


class IncompleteReplicasError(RuntimeError):
    """The pccl world does not (or no longer does) consist of whole replicas in time."""


class ReplicaLostError(IncompleteReplicasError):
    """A rank of this peer's own replica is gone; this rank left the pccl run (its communicator
    is closed) so that the other replicas go on without the broken one."""


def _local(p: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 parameter (the tensor itself for a plain one), no autograd."""
    with torch.no_grad():
        return p.to_local() if isinstance(p, DTensor) else p.detach()


class LocalShards(torch.nn.Module):
    """A module whose parameters alias the local shards of ``model``'s (FSDP2) parameters.

    Names are ``model``'s with dots replaced by ``/`` (a module's parameter names may not contain
    dots). Writing into these parameters in place writes into the FSDP shard storage, which is
    what FSDP all-gathers at the next forward. Give :class:`training.diloco.DiLoCo` this module
    instead of ``model``; its inner optimizer still steps ``model``'s own (DTensor) parameters.

    Raises:
        ValueError: a local shard is empty (a dimension smaller than the number of shards);
            pccl's shared state needs a non-empty tensor per name on every peer.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        for name, p in model.named_parameters():
            local = _local(p)
            if local.numel() == 0:
                raise ValueError(f"parameter {name!r} has an empty local shard; shard a larger dimension")
            # nn.Parameter(t) aliases t's storage: in-place writes reach the FSDP shard.
            self.register_parameter(name.replace(".", "/"), torch.nn.Parameter(local, requires_grad=False))


def connect_shard(
    master: str | tuple[str, int],
    process_group: dist.ProcessGroup | None = None,
    *,
    timeout: float = 120.0,
    **kwargs: Any,
) -> pccl.Communicator:
    """A connected :class:`pccl.Communicator` with ``peer_group`` = this rank's shard index.

    The shard index is the rank inside ``process_group`` (the replica's FSDP group; default the
    whole default group). ``kwargs`` go to :class:`pccl.Communicator`.

    Raises:
        pccl.PCCLError: the connection failed (the communicator is closed again).
    """
    shard = dist.get_rank(process_group)
    comm = pccl.Communicator(master, peer_group=shard, **kwargs)
    try:
        comm.connect(timeout=timeout)
    except BaseException:
        comm.close()
        raise
    log.info("shard %d connected as peer %d", shard, comm.peer_id)
    return comm


def replicas_complete(comm: pccl.Communicator, shards: int, min_replicas: int = 1) -> bool:
    """Whether the pccl world is exactly whole replicas of ``shards`` ranks, at least ``min_replicas``."""
    largest = comm.largest_peer_group_size
    return (comm.num_peer_groups == shards and largest >= min_replicas
            and comm.global_world_size == shards * largest)


def wait_for_replicas(
    comm: pccl.Communicator,
    shards: int,
    min_replicas: int = 1,
    *,
    poll_interval: float = 0.1,
    timeout: float = 120.0,
    retries: int = 5,
) -> None:
    """Accept peers until every rank of every replica is in (see the module docstring). Call it
    on every rank after :func:`connect_shard` and before the first FSDP forward.

    Raises:
        IncompleteReplicasError: the world was not whole replicas within ``timeout`` seconds.
        pccl.TopologyUpdateError: ``update_topology`` failed ``retries`` times in a row.
        pccl.MasterConnectionError: kicked, or the master is gone.
    """
    deadline = time.monotonic() + timeout
    while True:
        while comm.are_peers_pending():
            for attempt in range(1, retries + 1):
                try:
                    comm.update_topology()
                    break
                except TopologyUpdateError:
                    if attempt == retries:
                        raise
        if replicas_complete(comm, shards, min_replicas):
            log.info("all replicas in: %d peers in %d groups", comm.global_world_size, shards)
            return
        if time.monotonic() > deadline:
            raise IncompleteReplicasError(
                f"not whole replicas after {timeout:.0f} s: {comm.global_world_size} peers, "
                f"{comm.num_peer_groups} of {shards} groups, largest {comm.largest_peer_group_size}, "
                f"need at least {min_replicas} replicas"
            )
        time.sleep(poll_interval)


def shard_diloco(
    comm: Comm,
    model: torch.nn.Module,
    inner_optimizer: torch.optim.Optimizer,
    inner_steps: int,
    **kwargs: Any,
) -> DiLoCo:
    """:class:`training.diloco.DiLoCo` over the local shards of a ``fully_shard``ed ``model``.

    ``inner_optimizer`` steps ``model``'s parameters (DTensors); the outer parameters and outer
    optimizer state cover this rank's shard only and live on CPU. ``kwargs`` go to ``DiLoCo``
    (``min_peers`` counts replicas; after :func:`wait_for_replicas` leave it at 1). Every rank of
    every replica must make this call at the same point: it runs the group's membership phase
    and first shared-state sync, and copies the group's outer state into the shards.

    Raises: as :class:`training.diloco.DiLoCo`.
    """
    return DiLoCo(comm, LocalShards(model), inner_optimizer, inner_steps, **kwargs)


def _replica_alive(process_group: dist.ProcessGroup | None, timeout: float) -> bool:
    """Whether every rank of the replica answers a barrier within ``timeout`` seconds."""
    try:
        dist.monitored_barrier(process_group, timeout=datetime.timedelta(seconds=timeout))
    except RuntimeError:
        return False
    return True


@contextlib.contextmanager
def replica_guard(
    comm: pccl.Communicator, process_group: dist.ProcessGroup | None = None, *, probe_timeout: float = 5.0
) -> Iterator[None]:
    """Wrap the training loop: a sibling rank's death takes this whole replica out of the run.

    When a rank of the replica dies, its siblings' next FSDP collective fails (Gloo reports the
    closed connection at once). Left alone, the survivor would stay a pccl peer that no longer
    trains, or hang; instead, on a ``RuntimeError`` from the body this probes the replica with a
    monitored barrier (Gloo; ``probe_timeout`` seconds): if a rank does not answer, it closes
    ``comm`` (the master drops this peer; every group's survivors go on with one replica fewer,
    DiLoCo's reduces shrinking as for any lost peer) and raises :class:`ReplicaLostError`. pccl
    errors and errors on a healthy replica propagate unchanged.

    Raises:
        ReplicaLostError: a rank of this replica is gone (chained to the original error).
    """
    try:
        yield
    except pccl.PCCLError:
        raise
    except RuntimeError as exc:
        if isinstance(exc, IncompleteReplicasError) or _replica_alive(process_group, probe_timeout):
            raise
        message = (f"shard {comm.peer_group}: a rank of this replica is gone ({exc}); "
                   "this replica left the pccl run, the others go on")
        comm.close()
        raise ReplicaLostError(message) from exc
