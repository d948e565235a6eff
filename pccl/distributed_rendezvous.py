"""Rendezvous of the torch.distributed backend "pccl": the master and the rank-ordered join.

Every rank of a torch process group becomes one peer of a pccl run. Rank 0 hosts an
embedded :class:`pccl.Master` (unless ``PCCL_MASTER`` names an external one) and publishes
its address in the torch ``Store``. The master builds the ring in the order peers were
accepted (by peer id, ``docs/protocol.md`` §5.3), so the ranks join strictly one after
another: rank ``r`` registers only once rank ``r - 1`` was accepted, and the ranks already
in the run vote it in (``update_topology``). The ring then equals the rank order, which
:func:`join` verifies, so ring position == torch rank for every collective.
"""

from __future__ import annotations

import ipaddress
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from pccl.communicator import Communicator
from pccl.errors import PCCLError
from pccl.master import Master

__all__ = ["Joined", "join", "master_host"]

_KEY = "pccl/"
# How often the ranks already in the run ask whether the next rank has registered.
_PENDING_POLL_S = 0.005


@dataclass
class Joined:
    """The outcome of :func:`join`: this rank's Communicator, and the master it hosts (rank 0)."""

    comm: Communicator
    master: Master | None
    peer_ids: list[int]


def master_host(store: Any) -> str:
    """The address other ranks can reach rank 0 at: the TCPStore's host, else ``MASTER_ADDR``.

    ``PCCL_MASTER_HOST`` overrides both; ``127.0.0.1`` is the last resort.
    """
    explicit = os.environ.get("PCCL_MASTER_HOST")
    if explicit:
        return explicit
    inner = store
    for _ in range(8):  # PrefixStore wraps the real store, maybe several times
        if isinstance(inner, dist.TCPStore):
            return str(inner.host)
        nxt = getattr(inner, "underlying_store", None)
        if nxt is None:
            break
        inner = nxt
    return os.environ.get("MASTER_ADDR") or "127.0.0.1"


def _bind_host(host: str) -> str:
    """Bind to loopback when the advertised address is loopback, else to every interface."""
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        if host == "localhost":
            return "127.0.0.1"
    return "0.0.0.0"


def _start_master(
    store: Any, heartbeat_timeout: float, secret: str | None, encrypt: bool
) -> tuple[Master | None, str]:
    external = os.environ.get("PCCL_MASTER")
    if external:
        return None, external
    host = master_host(store)
    master = Master(
        host=_bind_host(host), port=0, secret=secret, heartbeat_timeout=heartbeat_timeout, encrypt=encrypt
    )
    master.start()
    return master, f"{host}:{master.port}"


def join(
    store: Any,
    rank: int,
    size: int,
    timeout: timedelta,
    *,
    connections: int,
    heartbeat_timeout: float,
    secret: str | None,
    encrypt: bool = False,
) -> Joined:
    """Bring every rank into one pccl ring whose order is the rank order.

    Raises:
        PCCLError: the master could not be started or reached, or a rank could not join.
        RuntimeError: the torch store timed out waiting for another rank.
        DistBackendError: the ring the master built is not the rank order.
    """
    store.set_timeout(timeout)
    master: Master | None = None
    if rank == 0:
        master, address = _start_master(store, heartbeat_timeout, secret, encrypt)
        store.set(_KEY + "master", address)
    address = store.get(_KEY + "master").decode()
    comm = Communicator(address, connections=connections, secret=secret, encrypt=encrypt)
    try:
        if rank > 0:
            store.wait([f"{_KEY}accepted/{rank - 1}"])
        store.set(f"{_KEY}joining/{rank}", "1")
        comm.connect(timeout=timeout.total_seconds())
        store.set(f"{_KEY}accepted/{rank}", str(comm.peer_id))
        for later in range(rank + 1, size):
            _admit(comm, store, later, timeout.total_seconds())
        ids = [int(store.get(f"{_KEY}accepted/{r}")) for r in range(size)]
        if comm.ring != ids:
            raise dist.DistBackendError(
                f"pccl: the master's ring {comm.ring} is not the rank order {ids}; "
                "another peer joined the run (is PCCL_MASTER shared with another job?)"
            )
    except BaseException:
        comm.close()
        if master is not None:
            master.stop()
        raise
    return Joined(comm, master, ids)


def _admit(comm: Communicator, store: Any, later: int, timeout: float) -> None:
    """Vote rank ``later`` into the run, together with every rank already in it.

    The vote is a round of all accepted peers, so each of them polls ``are_peers_pending``
    (every peer gets the same answer, so the loops stay in step) until ``later`` registered.
    """
    store.wait([f"{_KEY}joining/{later}"])
    deadline = time.monotonic() + timeout
    while not comm.are_peers_pending():
        if time.monotonic() > deadline:
            raise PCCLError(f"rank {later} did not register with the pccl master within {timeout:.0f} s")
        time.sleep(_PENDING_POLL_S)
    comm.update_topology()
