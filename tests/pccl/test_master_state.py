"""Example-based tests of the sans-IO master: one scenario per rule of ``docs/protocol.md`` §5."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from master_harness import TIMEOUT, Harness
from pccl import protocol as P
from pccl.master_rings import choose_drop, find_ring, ring_edges
from pccl.master_state import PeerLost, RegisterRequest, Tick


# --- rings ---------------------------------------------------------------------------------


def test_find_ring_keeps_a_valid_order_and_avoids_forbidden_pairs() -> None:
    assert find_ring([1, 2, 3], set()) == [1, 2, 3]
    assert find_ring([1, 2, 3], {(1, 2)}) == [1, 3, 2]
    assert find_ring([1, 2], {(2, 1)}) is None
    assert find_ring([7], {(7, 7)}) == [7]


@given(st.lists(st.integers(0, 50), min_size=1, max_size=7, unique=True), st.data())
def test_find_ring_result_is_a_permutation_without_forbidden_edges(peers: list[int], data: st.DataObject) -> None:
    pairs = [(a, b) for a in peers for b in peers if a != b]
    forbidden = set(data.draw(st.lists(st.sampled_from(pairs), max_size=6))) if pairs else set()
    ring = find_ring(peers, forbidden)
    if ring is not None:
        assert sorted(ring) == sorted(peers)
        assert not set(ring_edges(ring)) & forbidden
    else:
        # No valid ring exists: check by brute force over every order starting at peers[0].
        from itertools import permutations

        rest = peers[1:]
        assert all(set(ring_edges([peers[0], *p])) & forbidden for p in permutations(rest))


def test_choose_drop_prefers_the_most_involved_then_the_newest() -> None:
    assert choose_drop([1, 2, 3], {(1, 3), (2, 3)}, {1: 1, 2: 2, 3: 3}) == 3
    assert choose_drop([1, 2], {(1, 2)}, {1: 1, 2: 2}) == 2
    assert choose_drop([1, 2], {(1, 2)}, {1: 5, 2: 2}) == 1


# --- registration --------------------------------------------------------------------------


def test_first_peer_is_accepted_at_once_and_later_ones_wait_for_a_vote() -> None:
    h = Harness()
    a = h.register()
    assert [m.epoch for m in h.take(a, P.RingUpdate)] == [1]
    h.send(a, P.LinksReady(1))
    assert h.take(a, P.Accepted) and h.take(a, P.WorldInfo) == [P.WorldInfo(1, 1, 1)]
    b = h.register()
    assert h.state.pending() == [b] and not h.take(b, P.RingUpdate)
    h.send(a, P.Vote(P.UPDATE_TOPOLOGY))
    assert h.take(b, P.RingUpdate)[0].ring == [a, b]
    assert not h.take(a, P.VoteResult)  # waits for the links
    h.ready_all()
    assert h.take(a, P.VoteResult) == [P.VoteResult(P.UPDATE_TOPOLOGY, True)]
    # world_info comes before accepted, so connect() returns with the right sizes.
    inbox = h.inbox[b]
    assert inbox.index(P.WorldInfo(2, 1, 2)) < inbox.index(P.Accepted())


def test_peer_ids_increase_and_are_never_reused() -> None:
    h = Harness()
    a = h.register()
    h.feed(PeerLost(a, "gone"))
    assert h.register() == a + 1


def test_loopback_and_remote_addresses_are_not_mixed() -> None:
    h = Harness()
    h.register(host="127.0.0.1")
    assert h.register(host="10.0.0.2") == -1
    assert "loopback" in h.refusals[-1] and "advertise_host" in h.refusals[-1]
    # The advertised address decides, not the one the master sees.
    ok = h.register(host="10.0.0.2", advertise="127.0.0.1")
    assert ok > 0 and h.state.peers[ok].host == "127.0.0.1"


def test_bad_registration_fields_are_refused() -> None:
    h = Harness()
    h._conn += 1
    h.feed(RegisterRequest(h._conn, P.Register(0, 0), "127.0.0.1"))
    assert "not a valid TCP port" in h.refusals[-1]
    h.feed(RegisterRequest(h._conn + 1, P.Register(-1, 80), "127.0.0.1"))
    assert "out of range" in h.refusals[-1]


# --- votes -------------------------------------------------------------------------------------


def test_peer_dying_mid_vote_does_not_block_the_round() -> None:
    h = Harness()
    a, b, c = h.run_of(3)
    h.send(a, P.Vote(P.UPDATE_TOPOLOGY))
    h.send(b, P.Vote(P.UPDATE_TOPOLOGY))
    assert not h.take(a, P.VoteResult)
    h.feed(PeerLost(c, "connection reset"))
    h.ready_all()
    assert h.take(a, P.VoteResult) == h.take(b, P.VoteResult) == [P.VoteResult(P.UPDATE_TOPOLOGY, True)]
    assert h.state.groups[0].ring == [a, b]


def test_peers_pending_answers_every_voter_alike() -> None:
    h = Harness()
    a, b = h.run_of(2)
    h.register()
    h.send(a, P.Vote(P.PEERS_PENDING))
    h.send(b, P.Vote(P.PEERS_PENDING))
    assert [r.peers_pending for r in h.take(a, P.VoteResult) + h.take(b, P.VoteResult)] == [True, True]


def test_conflicting_membership_votes_fail_both_with_a_reason() -> None:
    h = Harness()
    a, b = h.run_of(2)
    h.send(a, P.Vote(P.UPDATE_TOPOLOGY))
    h.send(b, P.Vote(P.PEERS_PENDING))
    ra, rb = h.take(a, P.VoteResult)[0], h.take(b, P.VoteResult)[0]
    assert not ra.ok and not rb.ok and ra.error == rb.error == P.ERROR_USAGE
    assert "same order" in ra.reason and h.state.round is None


def test_optimize_topology_applies_the_optimizer_order() -> None:
    h = Harness(optimizer=lambda group, ring: list(reversed(ring)))
    a, b, c = h.run_of(3)
    for p in (a, b, c):
        h.send(p, P.Vote(P.OPTIMIZE_TOPOLOGY))
    assert h.take(a, P.RingUpdate)[-1].ring == [c, b, a]
    h.ready_all()
    assert all(h.take(p, P.VoteResult)[0].ok for p in (a, b, c))


# --- links ----------------------------------------------------------------------------------------


def test_failed_link_is_avoided_when_another_ring_exists() -> None:
    h = Harness()
    a, b = h.run_of(2)
    c = h.register()
    h.send(a, P.Vote(P.UPDATE_TOPOLOGY))
    h.send(b, P.Vote(P.UPDATE_TOPOLOGY))
    epoch = h.state.groups[0].epoch
    assert h.state.groups[0].ring == [a, b, c]
    h.send(b, P.LinkFailed(epoch, c, "connection refused"))
    ring = h.state.groups[0].ring
    assert (b, c) not in ring_edges(ring) and sorted(ring) == [a, b, c]
    h.ready_all()
    results = {p: h.take(p, P.VoteResult)[0] for p in (a, b)}
    assert results[a].ok  # not concerned
    assert not results[b].ok and results[b].error == P.ERROR_TOPOLOGY and "could not connect" in results[b].reason
    assert h.take(c, P.Accepted)  # the newcomer is in, on a ring that avoids the pair


def test_unlinkable_pair_of_two_drops_the_newcomer_after_a_grace() -> None:
    h = Harness()
    a = h.run_of(1)[0]
    b = h.register()
    h.send(a, P.Vote(P.UPDATE_TOPOLOGY))
    h.send(a, P.LinkFailed(h.state.groups[0].epoch, b, "timed out"))
    assert not h.kicks and h.state.groups[0].drop_at is not None
    h.now += 0.5
    h.feed(Tick())
    assert not h.kicks  # still within the grace
    h.now += 0.6
    h.send(a, P.Heartbeat())
    h.send(b, P.Heartbeat())
    h.feed(Tick())
    assert h.kicks[b].error == P.ERROR_TOPOLOGY and "could not connect" in h.kicks[b].reason
    h.ready_all()
    result = h.take(a, P.VoteResult)[0]
    assert not result.ok and result.error == P.ERROR_TOPOLOGY
    assert h.state.groups[0].ring == [a]


def test_unreachable_peer_that_dies_within_the_grace_costs_the_survivor_nothing() -> None:
    h = Harness()
    a, b = h.run_of(2)  # b was accepted after a: the tie-break alone would drop b...
    h.send(b, P.LinkFailed(h.state.groups[0].epoch, a, "connection refused"))
    h.feed(PeerLost(a, "killed"))  # ...but a was simply dead, which the master learns a moment later
    assert not h.kicks and h.state.groups[0].ring == [b] and h.state.groups[0].drop_at is None
    assert h.take(b, P.RingUpdate)[-1].ring == [b]


def test_old_epoch_reports_are_ignored_and_future_ones_kick() -> None:
    h = Harness()
    a, b = h.run_of(2)
    h.send(a, P.LinksReady(1))  # an epoch long gone
    assert a not in h.kicks
    h.send(a, P.LinksReady(h.state.groups[0].epoch + 3))
    assert "never announced" in h.kicks[a].reason


# --- collectives ---------------------------------------------------------------------------------


def test_collective_round_trip_and_abort_on_death() -> None:
    h = Harness()
    a, b, c = h.run_of(3)
    for p in (a, b, c):
        h.send(p, P.CollectiveInitiate(5, {"numel": 4}))
    starts = [h.take(p, P.CollectiveStart)[0] for p in (a, b, c)]
    assert len({s.op_id for s in starts}) == 1 and starts[0].ring == [a, b, c]
    op = starts[0].op_id
    h.send(a, P.CollectiveComplete(5, op, True))
    h.feed(PeerLost(c, "killed"))
    for p in (a, b):
        done = h.take(p, P.CollectiveDone)[0]
        assert not done.success and done.error == P.ERROR_PEER_LOST and f"peer {c}" in done.reason
    h.send(b, P.CollectiveComplete(5, op, True))  # late report of the aborted op: ignored
    assert b not in h.kicks


def test_descriptor_mismatch_names_the_difference() -> None:
    h = Harness()
    a, b = h.run_of(2)
    h.send(a, P.CollectiveInitiate(0, {"dtype": "float32", "numel": 10}))
    h.send(b, P.CollectiveInitiate(0, {"dtype": "float32", "numel": 12}))
    done = h.take(a, P.CollectiveDone)[0]
    assert done == h.take(b, P.CollectiveDone)[0]
    assert done.error == P.ERROR_USAGE and "'numel'" in done.reason and "10" in done.reason and "12" in done.reason


def test_collective_waits_for_links_of_the_current_epoch() -> None:
    h = Harness()
    a, b, c = h.run_of(3)
    h.feed(PeerLost(c, "killed"))  # new epoch: links not ready yet
    h.send(a, P.CollectiveInitiate(1, {}))
    h.send(b, P.CollectiveInitiate(1, {}))
    assert not h.take(a, P.CollectiveStart)
    h.ready_all()
    assert h.take(a, P.CollectiveStart)[0].ring == [a, b]


def test_one_failed_report_aborts_the_op_for_everyone_and_relinks() -> None:
    h = Harness()
    a, b, c = h.run_of(3)
    epoch = h.state.groups[0].epoch
    for p in (a, b, c):
        h.send(p, P.CollectiveInitiate(2, {}))
    op = h.take(a, P.CollectiveStart)[0].op_id
    h.send(b, P.CollectiveComplete(2, op, False, "link to 3 broke"))
    for p in (a, b, c):
        done = h.take(p, P.CollectiveDone)[0]
        assert not done.success and "link to 3 broke" in done.reason
    assert h.state.groups[0].epoch == epoch + 1 and h.state.groups[0].ring == [a, b, c]


# --- kicks and heartbeats ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "msg, words",
    [
        (P.Vote("elect_me"), "unknown vote kind"),
        (P.Register(0, 1), "Register twice"),
        (P.Accepted(), "unexpected message"),
        (P.CollectiveComplete(0, 77, True), "never started"),
        (P.SyncDone(50, True), "never existed"),
    ],
)
def test_illegal_messages_kick_with_a_reason(msg: Any, words: str) -> None:
    h = Harness()
    a, b = h.run_of(2)
    h.send(b, msg)
    assert words in h.kicks[b].reason and b in h.state.kicks and b not in h.state.peers
    assert h.state.groups[0].ring == [a]


def test_vote_with_collectives_in_flight_kicks() -> None:
    h = Harness()
    a, b = h.run_of(2)
    h.send(a, P.CollectiveInitiate(3, {}))
    h.send(a, P.Vote(P.UPDATE_TOPOLOGY))
    assert "in flight" in h.kicks[a].reason and h.kicks[a].error == P.ERROR_USAGE
    assert not h.take(b, P.CollectiveDone)  # b never initiated tag 3


def test_silent_peer_is_kicked_after_the_timeout_only() -> None:
    h = Harness()
    a, b = h.run_of(2)
    h.now = TIMEOUT - 0.01
    h.send(a, P.Heartbeat())
    h.feed(Tick())
    assert not h.kicks
    h.now = TIMEOUT + 0.02
    h.feed(Tick())
    assert list(h.kicks) == [b] and "heartbeat timeout" in h.kicks[b].reason


def test_deadlock_between_vote_and_collective_fails_both() -> None:
    h = Harness()
    a, b = h.run_of(2)
    h.send(a, P.Vote(P.UPDATE_TOPOLOGY))
    h.send(b, P.CollectiveInitiate(0, {}))
    vote, done = h.take(a, P.VoteResult)[0], h.take(b, P.CollectiveDone)[0]
    assert not vote.ok and not done.success
    assert vote.reason == done.reason and "waits for peer" in vote.reason
    assert not h.kicks and h.state.round is None


# --- shared state ------------------------------------------------------------------------------


def _report(revision: int, digest: bytes, strategy: str = "enforce_popular") -> P.SyncReport:
    return P.SyncReport(revision, strategy, ["w"], [digest], ["float32"], [[2]], [8], [False])


def test_sync_round_elects_plans_and_records_the_revision() -> None:
    h = Harness()
    a, b, c = h.run_of(3)
    good, bad = b"\x01" * 16, b"\x02" * 16
    h.send(a, _report(4, good))
    h.send(b, _report(4, good))
    h.send(c, _report(4, bad))
    plans = {p: h.take(p, P.SyncPlan)[0] for p in (a, b, c)}
    assert plans[a].fetch_keys == [] and plans[c].fetch_keys == ["w"] and sorted(plans[c].fetch_from[0]) == [a, b]
    assert plans[c].popular_hashes == [good] and set(plans[c].peer_ids) == {a, b}
    for p in (a, b, c):
        h.send(p, P.SyncDone(plans[p].sync_id, True))
    assert all(h.take(p, P.SyncResult)[0] == P.SyncResult(plans[a].sync_id, True, 4) for p in (a, b, c))
    assert h.state.groups[0].last_revision == 4
    # The next sync must be exactly +1: a peer reporting more is kicked by the election.
    h.send(a, _report(5, good))
    h.send(b, _report(5, good))
    h.send(c, _report(7, good))
    assert c in h.kicks and "revision" in h.kicks[c].reason and h.kicks[c].error == P.ERROR_SHARED_STATE


def test_failing_election_fails_the_round_instead_of_the_master() -> None:
    def broken(reports: Any, last: Any) -> Any:
        raise RuntimeError("bug")

    h = Harness(elect=broken)
    a = h.run_of(1)[0]
    h.send(a, _report(0, b"\x00" * 16))
    result = h.take(a, P.SyncResult)[0]
    assert not result.ok and "election failed" in result.reason
    assert h.state.groups[0].sync is None


def _sync_alone(h: Harness, peer: int, revision: int) -> P.SyncResult:
    """``peer``, its group's only member, syncs at ``revision``; the result it gets."""
    h.send(peer, _report(revision, b"\x01" * 16))
    plan = h.take(peer, P.SyncPlan)
    assert plan, h.kicks.get(peer)
    h.send(peer, P.SyncDone(plan[0].sync_id, True))
    result: P.SyncResult = h.take(peer, P.SyncResult)[0]
    return result


@pytest.mark.parametrize("revision", [2, 100])
def test_newcomer_to_an_emptied_group_makes_a_first_sync(revision: int) -> None:
    h = Harness()
    a = h.run_of(1)[0]
    assert _sync_alone(h, a, 5).revision == 5
    h.feed(PeerLost(a, "connection reset"))
    b = h.register(0)
    h.ready_all()
    assert h.state.accepted() == [b]
    result = _sync_alone(h, b, revision)  # e.g. resuming from a checkpoint
    assert result.ok and result.revision == revision and not h.kicks
    assert h.state.groups[0].last_revision == revision


@pytest.mark.parametrize("revision", [2, 100])
def test_joiner_whose_group_lost_every_synced_member_makes_a_first_sync(revision: int) -> None:
    h = Harness()
    a = h.run_of(1)[0]
    assert _sync_alone(h, a, 5).revision == 5
    b = h.register(0)
    h.send(a, P.Vote(P.UPDATE_TOPOLOGY))  # b is accepted while a still holds revision 5 ...
    h.ready_all()
    assert h.take(b, P.Accepted)
    h.feed(PeerLost(a, "connection reset"))  # ... then a dies before b ever synced
    h.ready_all()
    result = _sync_alone(h, b, revision)
    assert result.ok and result.revision == revision and not h.kicks


def test_revision_rule_holds_while_one_synced_member_is_left() -> None:
    h = Harness()
    a, b = h.run_of(2)
    for p in (a, b):
        h.send(p, _report(5, b"\x01" * 16))
    for p in (a, b):
        h.send(p, P.SyncDone(h.take(p, P.SyncPlan)[0].sync_id, True))
    c = h.register(0)
    h.send(a, P.Vote(P.UPDATE_TOPOLOGY))
    h.send(b, P.Vote(P.UPDATE_TOPOLOGY))
    h.ready_all()
    h.feed(PeerLost(a, "connection reset"))
    h.ready_all()
    assert h.state.groups[0].last_revision == 5  # b still holds it
    h.send(b, _report(6, b"\x01" * 16))
    h.send(c, _report(9, b"\x01" * 16))
    assert c in h.kicks and "revision" in h.kicks[c].reason
