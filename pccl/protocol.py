"""Control messages between the master and its peers (``docs/protocol.md`` §5.2).

Each message is a frozen dataclass declared with transport's ``@message`` decorator,
which gives it a msgpack schema that every decoded payload is validated against. The
master's state machine consumes and produces these objects directly; the server only
moves them over connections.

Error kinds carried by :class:`Kicked` and :class:`VoteResult` tell the peer which
exception to raise (§5.7): see :data:`ERROR_KINDS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transport.message import message

# Membership vote kinds (§5.5).
UPDATE_TOPOLOGY = "update_topology"
PEERS_PENDING = "peers_pending"
OPTIMIZE_TOPOLOGY = "optimize_topology"
VOTE_KINDS = (UPDATE_TOPOLOGY, PEERS_PENDING, OPTIMIZE_TOPOLOGY)

# Error kinds (§5.7): which pccl error the peer raises for a kick or a failed round.
ERROR_MASTER = "master"  # MasterConnectionError
ERROR_TOPOLOGY = "topology"  # TopologyUpdateError
ERROR_USAGE = "usage"  # InvalidUsageError
ERROR_SHARED_STATE = "shared_state"  # SharedStateError
ERROR_PEER_LOST = "peer_lost"  # PeerLostError
ERROR_KINDS = (ERROR_MASTER, ERROR_TOPOLOGY, ERROR_USAGE, ERROR_SHARED_STATE, ERROR_PEER_LOST)

Scalar = int | float | str | bool | None


# --- peer -> master -------------------------------------------------------------


@message("pccl.register")
@dataclass(frozen=True)
class Register:
    """First message on a master connection: join the run (§5.3).

    ``p2p_port`` is where this peer's link server listens; ``advertise_host`` is the
    address other peers should dial (``None``: the address the master sees).
    """

    group: int
    p2p_port: int
    advertise_host: str | None = None


@message("pccl.heartbeat")
@dataclass(frozen=True)
class Heartbeat:
    """Sent both ways every heartbeat interval; any message also counts as a sign of life (§5.8)."""


@message("pccl.leave")
@dataclass(frozen=True)
class Leave:
    """The peer closes on purpose; the master removes it without waiting for the socket (§5.3)."""


@message("pccl.vote")
@dataclass(frozen=True)
class Vote:
    """A membership vote; ``kind`` is one of :data:`VOTE_KINDS` (§5.5)."""

    kind: str


@message("pccl.links_ready")
@dataclass(frozen=True)
class LinksReady:
    """This peer holds its outbound link to NEXT and its inbound link from PREV of ``epoch`` (§5.4)."""

    epoch: int


@message("pccl.link_failed")
@dataclass(frozen=True)
class LinkFailed:
    """This peer could not connect to ``peer`` (its NEXT in ``epoch``) (§5.4)."""

    epoch: int
    peer: int
    reason: str


@message("pccl.collective_initiate")
@dataclass(frozen=True)
class CollectiveInitiate:
    """Ask to run collective ``tag``; ``descriptor`` must be equal on every group member (§5.6).

    ``transfer_tag`` (0: none) is the tag this peer already started the operation with
    on the ring of ``epoch`` (an optimistic start, §5.6.2).
    """

    tag: int
    descriptor: dict[str, Scalar] = field(default_factory=dict)
    epoch: int = 0
    transfer_tag: int = 0


@message("pccl.collective_complete")
@dataclass(frozen=True)
class CollectiveComplete:
    """This peer finished its part of operation ``op_id`` (§5.6)."""

    tag: int
    op_id: int
    ok: bool
    reason: str = ""


@message("pccl.sync_report")
@dataclass(frozen=True)
class SyncReport:
    """Vote to sync the group's shared state (§5.9); entry metadata is column-wise, one index per key."""

    revision: int
    strategy: str
    keys: list[str] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    dtypes: list[str] = field(default_factory=list)
    shapes: list[list[int]] = field(default_factory=list)
    nbytes: list[int] = field(default_factory=list)
    allow_inequality: list[bool] = field(default_factory=list)


@message("pccl.sync_done")
@dataclass(frozen=True)
class SyncDone:
    """This peer fetched what its plan of round ``sync_id`` asked (``ok``) or failed (§5.9)."""

    sync_id: int
    ok: bool
    reason: str = ""


# --- master -> peer -------------------------------------------------------------


@message("pccl.welcome")
@dataclass(frozen=True)
class Welcome:
    """Registration accepted: the peer's id and the heartbeat timing (§5.3, §5.8)."""

    peer_id: int
    heartbeat_interval: float
    heartbeat_timeout: float


@message("pccl.kicked")
@dataclass(frozen=True)
class Kicked:
    """The master removes this peer; the connection closes after it (§5.7)."""

    reason: str
    error: str = ERROR_MASTER


@message("pccl.ring_update")
@dataclass(frozen=True)
class RingUpdate:
    """The group's ring for ``epoch`` with every member's p2p address (§5.4)."""

    group: int
    epoch: int
    ring: list[int]
    hosts: list[str]
    ports: list[int]


@message("pccl.world_info")
@dataclass(frozen=True)
class WorldInfo:
    """Run-wide sizes, sent to every accepted peer when they change (§5.3)."""

    global_world_size: int
    num_peer_groups: int
    largest_peer_group_size: int


@message("pccl.accepted")
@dataclass(frozen=True)
class Accepted:
    """The run accepted this peer and its links are ready: ``connect()`` returns (§5.5)."""


@message("pccl.vote_result")
@dataclass(frozen=True)
class VoteResult:
    """Outcome of a membership round for one voter (§5.5)."""

    kind: str
    ok: bool
    reason: str = ""
    error: str = ""
    peers_pending: bool = False


@message("pccl.collective_start")
@dataclass(frozen=True)
class CollectiveStart:
    """Every member initiated ``tag`` with equal descriptors: run it as ``op_id`` on ``ring`` (§5.6)."""

    tag: int
    op_id: int
    epoch: int
    ring: list[int]


@message("pccl.collective_done")
@dataclass(frozen=True)
class CollectiveDone:
    """Final outcome of ``tag``; ``op_id`` is 0 when it failed before starting (§5.6).

    ``error`` (one of :data:`ERROR_KINDS`, empty on success) names the error to raise.
    """

    tag: int
    op_id: int
    success: bool
    reason: str = ""
    error: str = ""


@message("pccl.sync_plan")
@dataclass(frozen=True)
class SyncPlan:
    """What this peer must fetch in sync round ``sync_id`` (§5.9).

    ``fetch_keys[i]`` is fetched from the peers ``fetch_from[i]`` (preference order);
    ``popular_*`` is the elected hash of every key; ``peer_ids``/``peer_hosts``/
    ``peer_ports`` are the p2p addresses of the distributors named.
    """

    sync_id: int
    revision: int
    fetch_keys: list[str] = field(default_factory=list)
    fetch_from: list[list[int]] = field(default_factory=list)
    popular_keys: list[str] = field(default_factory=list)
    popular_hashes: list[bytes] = field(default_factory=list)
    peer_ids: list[int] = field(default_factory=list)
    peer_hosts: list[str] = field(default_factory=list)
    peer_ports: list[int] = field(default_factory=list)


@message("pccl.sync_result")
@dataclass(frozen=True)
class SyncResult:
    """End of sync round ``sync_id``: ``ok`` only if every member fetched its plan (§5.9)."""

    sync_id: int
    ok: bool
    revision: int
    reason: str = ""


# --- bandwidth measurement and ring optimisation (§5.12) -----------------------------


@message("pccl.bandwidth_probe")
@dataclass(frozen=True)
class BandwidthProbe:
    """Master -> peer: measure how fast you send to ``peer`` (p2p server ``host:port``) for ``seconds``."""

    probe_id: int
    peer: int
    host: str
    port: int
    seconds: float


@message("pccl.bandwidth_report")
@dataclass(frozen=True)
class BandwidthReport:
    """Peer -> master: probe ``probe_id`` measured ``bytes_per_second`` (``ok``), or failed (``reason``)."""

    probe_id: int
    ok: bool
    bytes_per_second: float = 0.0
    reason: str = ""


@message("pccl.bandwidths")
@dataclass(frozen=True)
class Bandwidths:
    """Master -> peer: the measured directed bandwidths of the peer's group, one column entry per pair.

    ``bytes_per_second[i]`` is from ``senders[i]`` to ``receivers[i]``; 0 means the
    measurement failed (the pair counts as unreachable).
    """

    senders: list[int] = field(default_factory=list)
    receivers: list[int] = field(default_factory=list)
    bytes_per_second: list[float] = field(default_factory=list)


PEER_TO_MASTER = (
    Register, Heartbeat, Leave, Vote, LinksReady, LinkFailed,
    CollectiveInitiate, CollectiveComplete, SyncReport, SyncDone,
    BandwidthReport,
)
MASTER_TO_PEER = (
    Welcome, Kicked, RingUpdate, WorldInfo, Accepted, VoteResult,
    CollectiveStart, CollectiveDone, SyncPlan, SyncResult, Heartbeat,
    BandwidthProbe, Bandwidths,
)
