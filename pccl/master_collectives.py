"""Collective rounds of the master state machine (``docs/protocol.md`` §5.6).

Per group and tag: every ring member initiates with its descriptor; once all did,
the descriptors match and the group's links are ready, the master assigns an op id
and starts the operation; once every participant reported success, or as soon as
one reported a failure, it announces the outcome. A member lost in between aborts
every collective of its group at once, which is what unblocks survivors waiting for
data that will never come.

The op id is the members' own optimistic transfer tag when every member proposed
the same one for the current epoch (§5.6.2), else the next value of the master's
counter. A confirmed optimistic op gets no ``collective_start``: its members are
running it already and may even have reported (their reports wait in ``early``); its
``collective_done`` confirms and ends it at once. Initiate and complete messages take
a fast path while no membership round, sync or re-link is pending: only their own round
can change then (§5.11).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pccl import protocol as P

if TYPE_CHECKING:
    from pccl.master_state import GroupState, MasterState

MAX_TAG = 2**63 - 1
# Optimistic transfer tags have this bit set; the master's counted op ids never do (§5.6.2).
OPTIMISTIC_BIT = 1 << 63
_U64_MAX = (1 << 64) - 1


@dataclass
class CollectiveRound:
    """One tag of one group: initiations, then (once started) completions."""

    tag: int
    descriptors: dict[int, dict[str, Any]] = field(default_factory=dict)
    # peer -> (epoch, transfer tag) it already started the operation with (§5.6.2).
    proposals: dict[int, tuple[int, int]] = field(default_factory=dict)
    # Reports of optimistic attempts that arrived before the op started (§5.6.2).
    early: dict[int, tuple[bool, str]] = field(default_factory=dict)
    op_id: int = 0  # 0 until started
    epoch: int = 0
    ring: list[int] = field(default_factory=list)
    reports: dict[int, tuple[bool, str]] = field(default_factory=dict)

    def participants(self) -> list[int]:
        """Peers waiting for this round's outcome."""
        return list(self.ring) if self.op_id else sorted(self.descriptors)


def on_initiate(state: MasterState, peer: int, msg: P.CollectiveInitiate) -> CollectiveRound | None:
    """A member asks to run collective ``msg.tag`` (§5.6); its round, or None if the peer was kicked."""
    info = state.peers[peer]
    if not info.accepted or info.joining:
        state.kick(peer, "initiated a collective before its connect() completed")
        return None
    blocked = state.blocked_in(peer)
    if blocked is not None:
        state.kick(peer, f"initiated collective tag {msg.tag} while waiting in {blocked}", P.ERROR_USAGE)
        return None
    if not 0 <= msg.tag <= MAX_TAG:
        state.kick(peer, f"collective tag {msg.tag} is out of range 0..{MAX_TAG}", P.ERROR_USAGE)
        return None
    if msg.transfer_tag and not OPTIMISTIC_BIT <= msg.transfer_tag <= _U64_MAX:
        state.kick(peer, f"optimistic transfer tag {msg.transfer_tag} lacks bit 63 or exceeds 64 bits")
        return None
    if msg.tag in info.in_flight:
        state.kick(peer, f"initiated collective tag {msg.tag} twice", P.ERROR_USAGE)
        return None
    group = state.groups[info.group]
    coll = group.collectives.setdefault(msg.tag, CollectiveRound(msg.tag))
    # Started rounds hold every member, and a member never initiates a tag twice.
    assert not coll.op_id
    coll.descriptors[peer] = dict(msg.descriptor)
    if msg.transfer_tag:
        coll.proposals[peer] = (msg.epoch, msg.transfer_tag)
    info.in_flight.add(msg.tag)
    return coll


def on_complete(state: MasterState, peer: int, msg: P.CollectiveComplete) -> CollectiveRound | None:
    """A participant finished its part of an operation (§5.6); its round, or None if it is over."""
    info = state.peers[peer]
    tag = state.ops.get((info.group, msg.op_id)) if info.accepted else None
    if tag is None and msg.op_id >= OPTIMISTIC_BIT:
        return _early_report(state, peer, msg)
    if tag is None:
        if not 0 < msg.op_id < state.next_op_id:
            state.kick(peer, f"reported completion of op {msg.op_id}, which was never started")
        return None  # the op was aborted while this report was on its way
    coll = state.groups[info.group].collectives[tag]
    if msg.tag != tag or peer not in coll.ring or peer in coll.reports:
        state.kick(peer, f"reported completion of op {msg.op_id} (tag {msg.tag}) out of turn")
        return None
    coll.reports[peer] = (msg.ok, msg.reason)
    return coll


def _early_report(state: MasterState, peer: int, msg: P.CollectiveComplete) -> CollectiveRound | None:
    """The end of an optimistic attempt, reported before the op started (§5.6.2).

    Kept for the op if the master confirms the attempt; anything else — the op was
    started under a counted id, failed, or ended — makes it moot, and it is ignored
    (optimistic ids are not counted, so no report of one can be told to be bogus).
    """
    info = state.peers[peer]
    group = state.groups.get(info.group) if info.accepted else None
    coll = group.collectives.get(msg.tag) if group is not None else None
    proposal = coll.proposals.get(peer) if coll is not None and not coll.op_id else None
    if coll is None or proposal is None or proposal[1] != msg.op_id or peer in coll.early:
        return None
    coll.early[peer] = (msg.ok, msg.reason)
    return coll


def quiet_group(state: MasterState, peer: int, msg: Any) -> GroupState | None:
    """The group of ``peer`` when ``msg`` may take the fast path, else None (§5.11).

    The fast path applies to collective initiate/complete messages while no
    membership round, no shared-state sync and no re-link is pending: then no
    operation can wait on another through a blocked peer (§5.10), no ring or stats
    change, and only the message's own collective round can make progress.
    """
    if type(msg) not in (P.CollectiveInitiate, P.CollectiveComplete) or state.round is not None:
        return None
    info = state.peers.get(peer)
    if info is None or not info.accepted or info.joining:
        return None
    group = state.groups.get(info.group)
    if group is None or group.dirty or group.drop_at is not None:
        return None
    if any(g.sync is not None for g in state.groups.values()):
        return None
    return group


def on_message(
    state: MasterState, peer: int, msg: P.CollectiveInitiate | P.CollectiveComplete
) -> CollectiveRound | None:
    """Record a collective message (fast path); the round it touched, if any."""
    if isinstance(msg, P.CollectiveInitiate):
        return on_initiate(state, peer, msg)
    return on_complete(state, peer, msg)


def descriptor_difference(tag: int, descriptors: dict[int, dict[str, Any]]) -> str | None:
    """A reason naming the first difference between the members' descriptors, or ``None``."""
    peers = sorted(descriptors)
    ref_peer = peers[0]
    ref = descriptors[ref_peer]
    for peer in peers[1:]:
        other = descriptors[peer]
        if other == ref and all(type(other[k]) is type(v) for k, v in ref.items()):
            continue
        for key in sorted(set(ref) | set(other)):
            a, b = ref.get(key), other.get(key)
            # Type-strict: True == 1 and 1 == 1.0 in Python, not on the wire.
            if type(a) is not type(b) or a != b:
                return (
                    f"collective tag {tag}: peers disagree on {key!r}: peer {ref_peer} has "
                    f"{a!r}, peer {peer} has {b!r}"
                )
    return None


def progress(state: MasterState, group: GroupState) -> bool:
    """Start or finish ``group``'s collectives that can be; True if anything changed."""
    changed = False
    for tag in sorted(group.collectives):
        coll = group.collectives.get(tag)
        if coll is not None:
            changed |= progress_round(state, group, coll)
    return changed


def progress_round(state: MasterState, group: GroupState, coll: CollectiveRound) -> bool:
    """Start or finish one collective if it can be; True if it changed."""
    changed = False
    if not coll.op_id:
        changed = _try_start(state, group, coll)
        if not coll.op_id or group.collectives.get(coll.tag) is not coll:
            return changed  # not started, or failed on the spot
    if len(coll.reports) == len(coll.ring) or not all(ok for ok, _ in coll.reports.values()):
        # One failure is enough: the others may be waiting for data from the failed
        # peer, so they are aborted now rather than when they time out. (A confirmed
        # optimistic op may be over as it starts: its members reported early.)
        _finish(state, group, coll)
        return True
    return changed


def _try_start(state: MasterState, group: GroupState, coll: CollectiveRound) -> bool:
    if not group.ring or set(group.ring) - set(coll.descriptors):
        return False
    diff = descriptor_difference(coll.tag, coll.descriptors)
    if diff is not None:
        fail(state, group, coll.tag, diff, P.ERROR_USAGE)
        return True
    if not group.links_ready():
        return False  # started once every member reported links for this epoch (§5.4)
    op_id = confirmed_tag(state, group, coll)
    coll.epoch, coll.ring = group.epoch, list(group.ring)
    if op_id is not None:
        # Every member runs it already under this tag: no start to send (§5.6.2).
        coll.op_id, coll.reports = op_id, {p: r for p, r in coll.early.items() if p in coll.ring}
    else:
        coll.op_id = op_id = state.next_op_id
        state.next_op_id += 1
        start = P.CollectiveStart(coll.tag, op_id, coll.epoch, list(coll.ring))  # one object: encoded once
        for peer in coll.ring:
            state.send(peer, start)
    coll.early = {}
    state.ops[(group.id, op_id)] = coll.tag
    state.log("collective_start", group=group.id, tag=coll.tag, op_id=op_id, ring=coll.ring)
    return True


def confirmed_tag(state: MasterState, group: GroupState, coll: CollectiveRound) -> int | None:
    """The optimistic transfer tag every member already runs the operation with, if the
    master can confirm it (§5.6.2): the same tag from every member, proposed for the
    current epoch, and not the op id of an operation of the group still running. (Other
    groups may run the same tag at the same time: they have links of their own.)"""
    proposal = coll.proposals.get(group.ring[0])
    if proposal is None or proposal[0] != group.epoch or (group.id, proposal[1]) in state.ops:
        return None
    if any(coll.proposals.get(peer) != proposal for peer in group.ring):
        return None
    return proposal[1]


def _finish(state: MasterState, group: GroupState, coll: CollectiveRound) -> None:
    failures = [f"peer {p}: {coll.reports[p][1]}" for p in coll.ring if not coll.reports.get(p, (True, ""))[0]]
    success = not failures
    reason = "; ".join(failures)
    error = "" if success else P.ERROR_PEER_LOST
    _close(state, group, coll, P.CollectiveDone(coll.tag, coll.op_id, success, reason, error))
    if not success:
        # A link may have broken under the op: make every member re-check its links
        # (a healthy link is kept) before the next collective starts (§5.4).
        group.dirty = True
    state.log("collective_done", group=group.id, tag=coll.tag, op_id=coll.op_id, success=success, reason=reason)


def _close(state: MasterState, group: GroupState, coll: CollectiveRound, done: P.CollectiveDone) -> None:
    for peer in coll.participants():
        state.send(peer, done)  # one object for every participant: the server encodes it once
        info = state.peers.get(peer)
        if info is not None:
            info.in_flight.discard(coll.tag)
    state.ops.pop((group.id, coll.op_id), None)
    del group.collectives[coll.tag]


def fail(state: MasterState, group: GroupState, tag: int, reason: str, error: str) -> None:
    """End collective ``tag`` of ``group`` unsuccessfully for every participant."""
    coll = group.collectives[tag]
    _close(state, group, coll, P.CollectiveDone(tag, coll.op_id, False, reason, error))
    state.log("collective_failed", group=group.id, tag=tag, op_id=coll.op_id, reason=reason)


def abort_group(state: MasterState, group: GroupState, reason: str) -> None:
    """A member is gone: abort every collective of ``group`` on the survivors (§5.6)."""
    for tag in sorted(group.collectives):
        fail(state, group, tag, reason, P.ERROR_PEER_LOST)
