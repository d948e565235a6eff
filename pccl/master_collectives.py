"""Collective rounds of the master state machine (``docs/protocol.md`` §5.6).

Per group and tag: every ring member initiates with its descriptor; once all did,
the descriptors match and the group's links are ready, the master assigns an op id
and starts the operation; once every participant reported success, or as soon as
one reported a failure, it announces the outcome. A member lost in between aborts
every collective of its group at once, which is what unblocks survivors waiting for
data that will never come.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pccl import protocol as P

if TYPE_CHECKING:
    from pccl.master_state import GroupState, MasterState

MAX_TAG = 2**63 - 1


@dataclass
class CollectiveRound:
    """One tag of one group: initiations, then (once started) completions."""

    tag: int
    descriptors: dict[int, dict[str, Any]] = field(default_factory=dict)
    op_id: int = 0  # 0 until started
    epoch: int = 0
    ring: list[int] = field(default_factory=list)
    reports: dict[int, tuple[bool, str]] = field(default_factory=dict)

    def participants(self) -> list[int]:
        """Peers waiting for this round's outcome."""
        return list(self.ring) if self.op_id else sorted(self.descriptors)


def on_initiate(state: MasterState, peer: int, msg: P.CollectiveInitiate) -> None:
    """A member asks to run collective ``msg.tag`` (§5.6)."""
    info = state.peers[peer]
    if not info.accepted or info.joining:
        state.kick(peer, "initiated a collective before its connect() completed")
        return
    blocked = state.blocked_in(peer)
    if blocked is not None:
        state.kick(peer, f"initiated collective tag {msg.tag} while waiting in {blocked}", P.ERROR_USAGE)
        return
    if not 0 <= msg.tag <= MAX_TAG:
        state.kick(peer, f"collective tag {msg.tag} is out of range 0..{MAX_TAG}", P.ERROR_USAGE)
        return
    if msg.tag in info.in_flight:
        state.kick(peer, f"initiated collective tag {msg.tag} twice", P.ERROR_USAGE)
        return
    group = state.groups[info.group]
    coll = group.collectives.setdefault(msg.tag, CollectiveRound(msg.tag))
    # Started rounds hold every member, and a member never initiates a tag twice.
    assert not coll.op_id
    coll.descriptors[peer] = dict(msg.descriptor)
    info.in_flight.add(msg.tag)


def on_complete(state: MasterState, peer: int, msg: P.CollectiveComplete) -> None:
    """A participant finished its part of an operation (§5.6)."""
    entry = state.ops.get(msg.op_id)
    if entry is None:
        if not 0 < msg.op_id < state.next_op_id:
            state.kick(peer, f"reported completion of op {msg.op_id}, which was never started")
        return  # the op was aborted while this report was on its way
    gid, tag = entry
    coll = state.groups[gid].collectives[tag]
    if msg.tag != tag or peer not in coll.ring or peer in coll.reports:
        state.kick(peer, f"reported completion of op {msg.op_id} (tag {msg.tag}) out of turn")
        return
    coll.reports[peer] = (msg.ok, msg.reason)


def descriptor_difference(tag: int, descriptors: dict[int, dict[str, Any]]) -> str | None:
    """A reason naming the first difference between the members' descriptors, or ``None``."""
    peers = sorted(descriptors)
    ref_peer = peers[0]
    ref = descriptors[ref_peer]
    for peer in peers[1:]:
        other = descriptors[peer]
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
        if coll is None:
            continue
        if not coll.op_id:
            changed |= _try_start(state, group, coll)
        elif not all(ok for ok, _ in coll.reports.values()) or not set(coll.ring) - set(coll.reports):
            # One failure is enough: the others may be waiting for data from the
            # failed peer, so they are aborted now rather than when they time out.
            _finish(state, group, coll)
            changed = True
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
    coll.op_id, coll.epoch, coll.ring = state.next_op_id, group.epoch, list(group.ring)
    state.next_op_id += 1
    state.ops[coll.op_id] = (group.id, coll.tag)
    for peer in coll.ring:
        state.send(peer, P.CollectiveStart(coll.tag, coll.op_id, coll.epoch, list(coll.ring)))
    state.log("collective_start", group=group.id, tag=coll.tag, op_id=coll.op_id, ring=coll.ring)
    return True


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
        state.send(peer, done)
        info = state.peers.get(peer)
        if info is not None:
            info.in_flight.discard(coll.tag)
    state.ops.pop(coll.op_id, None)
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
