"""Optimistic starts of collectives (``docs/protocol.md`` §5.6.2) and the master's fast path (§5.11).

The master's rules are driven sans-IO; the members' transfer tags are checked as pure
bookkeeping; then real Communicators on 127.0.0.1 start operations before the master
answered and have them confirmed, or dropped — by a peer that does not start optimistically,
by a descriptor mismatch whose bytes already crossed the links, and by a peer killed while
the attempts wait for it. Results are checked against float64 references computed here.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any, Callable, Iterator
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from collective_helpers import check_result, inputs, kill_all, start_groups, wait_for
from collective_peer import link_stats
from collectives.ring import ring_all_reduce
from parallel import in_parallel
from pccl import InvalidUsageError, ReduceOp
from pccl import master_collectives as colls
from pccl import protocol as P
from pccl.collective_session import MAX_COUNTED_TAGS, TransferTags, optimistic_tag
from pccl.collective_staging import descriptor
from pccl.communicator import Communicator
from pccl.master import Master
from pccl.master_state import Kick, MasterState, PeerLost, Received, RegisterRequest, Send
from pccl.peer_session import CollectiveContext

BIT = 1 << 63


# --- the master (sans-IO) ----------------------------------------------------------------


class Harness:
    """A MasterState with ``n`` accepted, linked peers in group 0; records every action."""

    def __init__(self, n: int = 3) -> None:
        self.state = MasterState(5.0)
        self.actions: list[Any] = []
        self.peers = [self._register(i) for i in range(n)]
        self.ready()
        if n > 1:
            self.feed(Received(self.peers[0], P.Vote(P.UPDATE_TOPOLOGY)))
            self.ready()
        assert self.state.accepted() == self.peers
        self.actions.clear()

    def _register(self, i: int) -> int:
        self.feed(RegisterRequest(i, P.Register(0, 6000 + i), "127.0.0.1"))
        return i + 1

    def feed(self, event: Any) -> list[Any]:
        out = self.state.handle(0.0, event)
        self.actions += out
        return out

    def ready(self) -> None:
        group = self.state.groups.get(0)
        for peer in list(group.ring) if group else []:
            self.feed(Received(peer, P.LinksReady(group.epoch)))  # type: ignore[union-attr]

    @property
    def epoch(self) -> int:
        return self.state.groups[0].epoch

    def sent(self, peer: int, kind: type) -> list[Any]:
        return [a.msg for a in self.actions if isinstance(a, Send) and a.peer == peer and isinstance(a.msg, kind)]


def test_equal_proposals_for_the_current_epoch_are_confirmed_by_the_outcome_alone() -> None:
    h = Harness(3)
    xtag = optimistic_tag(h.epoch, 4, 0)
    for peer in h.peers:
        h.feed(Received(peer, P.CollectiveInitiate(4, {"numel": 8}, h.epoch, xtag)))
    assert not [a for a in h.actions if isinstance(a, Send)]  # running already: no start
    assert h.state.ops == {(0, xtag): 4} and h.state.next_op_id == 1
    for peer in h.peers:
        h.feed(Received(peer, P.CollectiveComplete(4, xtag, True)))
    assert all(h.sent(p, P.CollectiveDone) == [P.CollectiveDone(4, xtag, True)] for p in h.peers)
    assert not h.state.ops and not [a for a in h.actions if isinstance(a, Kick)]


def test_reports_of_attempts_that_precede_the_last_initiate_count_once_confirmed() -> None:
    h = Harness(3)
    xtag = optimistic_tag(h.epoch, 1, 0)
    a, b, c = h.peers
    for peer in (a, b):
        h.feed(Received(peer, P.CollectiveInitiate(1, {}, h.epoch, xtag)))
        h.feed(Received(peer, P.CollectiveComplete(1, xtag, True)))
    assert not h.sent(a, P.CollectiveDone)
    h.feed(Received(c, P.CollectiveInitiate(1, {}, h.epoch, xtag)))
    assert not h.sent(a, P.CollectiveDone)  # c's part is still running
    h.feed(Received(c, P.CollectiveComplete(1, xtag, False, "link broke")))
    done = h.sent(a, P.CollectiveDone)
    assert len(done) == 1 and not done[0].success and "link broke" in done[0].reason
    assert h.state.groups[0].dirty is False and h.epoch == 3  # failed: re-linked (epoch 2 -> 3)


def test_early_reports_are_moot_when_the_master_starts_its_own_op() -> None:
    h = Harness(2)
    a, b = h.peers
    xtag = optimistic_tag(h.epoch, 0, 0)
    h.feed(Received(a, P.CollectiveInitiate(0, {}, h.epoch, xtag)))
    h.feed(Received(a, P.CollectiveComplete(0, xtag, True)))  # its attempt is over
    h.feed(Received(b, P.CollectiveInitiate(0, {})))  # b did not start optimistically
    start = h.sent(a, P.CollectiveStart)
    assert [s.op_id for s in start] == [1] and h.sent(b, P.CollectiveStart) == start
    h.feed(Received(a, P.CollectiveComplete(0, xtag, True)))  # a late copy: ignored
    for peer in (a, b):
        h.feed(Received(peer, P.CollectiveComplete(0, 1, True)))
    assert h.sent(b, P.CollectiveDone) == [P.CollectiveDone(0, 1, True)]
    assert not [x for x in h.actions if isinstance(x, Kick)]


def test_two_groups_run_the_same_optimistic_tag_side_by_side() -> None:
    # Groups have links of their own: the same epoch, tag and use give the same tag in both.
    h = Harness(2)
    for i in (2, 3):
        h.feed(RegisterRequest(i, P.Register(1, 6000 + i), "127.0.0.1"))
    h.feed(Received(1, P.Vote(P.UPDATE_TOPOLOGY)))
    h.feed(Received(2, P.Vote(P.UPDATE_TOPOLOGY)))
    for g in (0, 1):
        for peer in list(h.state.groups[g].ring):
            h.feed(Received(peer, P.LinksReady(h.state.groups[g].epoch)))
    groups = {g: list(h.state.groups[g].ring) for g in (0, 1)}
    for peer in groups[1]:  # a failed op re-links group 1: now both groups are at epoch 2
        h.feed(Received(peer, P.CollectiveInitiate(9, {})))
    h.feed(Received(groups[1][0], P.CollectiveComplete(9, h.state.next_op_id - 1, False, "x")))
    for peer in groups[1]:
        h.feed(Received(peer, P.LinksReady(h.state.groups[1].epoch)))
    assert h.state.groups[0].epoch == h.state.groups[1].epoch and all(len(r) == 2 for r in groups.values())
    xtag = optimistic_tag(h.state.groups[0].epoch, 0, 0)
    for g, ring in groups.items():
        for peer in ring:
            h.feed(Received(peer, P.CollectiveInitiate(0, {}, h.state.groups[g].epoch, xtag)))
    assert h.state.ops == {(0, xtag): 0, (1, xtag): 0}
    for g, ring in groups.items():
        for peer in ring:
            h.feed(Received(peer, P.CollectiveComplete(0, xtag, True)))
    assert not [a for a in h.actions if isinstance(a, Kick)]
    for ring in groups.values():
        assert all([d for d in h.sent(p, P.CollectiveDone) if d.tag == 0] == [P.CollectiveDone(0, xtag, True)]
                   for p in ring)


FALLBACKS: dict[str, Callable[[int, int], list[tuple[int, int]]]] = {
    "one differs": lambda e, x: [(e, x), (e, x), (e, x + 1)],
    "one not optimistic": lambda e, x: [(e, x), (0, 0), (e, x)],
    "stale epoch": lambda e, x: [(e - 1, x)] * 3,
    "none optimistic": lambda e, x: [(0, 0)] * 3,
}


@pytest.mark.parametrize("case", sorted(FALLBACKS))
def test_anything_but_equal_current_proposals_gets_a_counted_op_id(case: str) -> None:
    h = Harness(3)
    xtag = optimistic_tag(h.epoch, 2, 0)
    for peer, (epoch, tag) in zip(h.peers, FALLBACKS[case](h.epoch, xtag)):
        h.feed(Received(peer, P.CollectiveInitiate(2, {}, epoch, tag)))
    assert {s.op_id for p in h.peers for s in h.sent(p, P.CollectiveStart)} == {1}


def test_a_tag_still_running_is_not_confirmed_twice() -> None:
    h = Harness(2)
    xtag = optimistic_tag(h.epoch, 1, 0)
    for tag in (1, 2):  # two tags proposing the same transfer tag (a wrapped field)
        for peer in h.peers:
            h.feed(Received(peer, P.CollectiveInitiate(tag, {}, h.epoch, xtag)))
    assert h.state.ops == {(0, xtag): 1, (0, 1): 2}
    assert [s.op_id for s in h.sent(1, P.CollectiveStart)] == [1]  # only the second needs a start


def test_late_reports_of_optimistic_ops_are_ignored_but_bad_tags_and_repeats_kick() -> None:
    h = Harness(2)
    h.feed(Received(1, P.CollectiveComplete(0, BIT | 12345, True)))
    assert not [a for a in h.actions if isinstance(a, Kick)]
    xtag = optimistic_tag(h.epoch, 3, 0)
    for peer in h.peers:
        h.feed(Received(peer, P.CollectiveInitiate(3, {}, h.epoch, xtag)))
    h.feed(Received(1, P.CollectiveComplete(3, xtag, True)))
    h.feed(Received(1, P.CollectiveComplete(3, xtag, True)))
    assert [a.peer for a in h.actions if isinstance(a, Kick)] == [1]
    h = Harness(2)
    h.feed(Received(2, P.CollectiveInitiate(0, {}, h.epoch, 77)))
    kicks = [a for a in h.actions if isinstance(a, Kick)]
    assert [k.peer for k in kicks] == [2] and "bit 63" in kicks[0].reason


# The same random collective traffic, with and without the fast path: the master must act
# exactly alike (same messages, kicks and log lines, in the same order).
INIT = st.tuples(st.just("init"), st.integers(0, 2), st.integers(0, 1), st.integers(0, 1), st.integers(0, 3))
COMPLETE = st.tuples(st.just("complete"), st.integers(0, 2), st.integers(0, 2), st.booleans(), st.integers(0, 2))
# Mostly collective traffic (the fast path), now and then what takes it away: a lost peer
# (a new epoch), a membership vote (an open round), links reported ready.
EVENT = st.one_of(
    INIT, INIT, INIT, COMPLETE, COMPLETE,
    st.tuples(st.just("lost"), st.integers(0, 2)),
    st.tuples(st.just("ready")),
    st.tuples(st.just("vote"), st.integers(0, 2)),
)
ROUND_TRIP = [("init", 0, 0, 0, 1), ("init", 1, 0, 0, 1), ("complete", 1, 0, True, 1), ("init", 2, 0, 0, 1),
              ("complete", 0, 0, True, 0), ("complete", 1, 0, False, 0), ("complete", 2, 0, True, 0)]


def _apply(h: Harness, event: tuple[Any, ...]) -> list[Any]:
    kind, args = event[0], event[1:]
    if kind == "ready":
        before = len(h.actions)
        h.ready()
        return h.actions[before:]
    peer = h.peers[args[0]]
    if kind == "lost":
        return h.feed(PeerLost(peer, "gone"))
    if kind == "vote":
        return h.feed(Received(peer, P.Vote(P.PEERS_PENDING)))
    group = h.state.groups.get(0)
    epoch = group.epoch if group else 0
    if kind == "init":
        tag, desc, proposal = args[1:]
        epoch, xtag = [(0, 0), (epoch, BIT | 5), (epoch, BIT | 6), (epoch - 1, BIT | 5)][proposal]
        return h.feed(Received(peer, P.CollectiveInitiate(tag, {"numel": desc}, epoch, xtag)))
    tag, ok, which = args[1:]  # which: the running op's id, an optimistic tag, another id
    coll = group.collectives.get(tag) if group else None
    op_id = [coll.op_id if coll is not None and coll.op_id else 1 + tag, BIT | 5, 1 + tag][which]
    return h.feed(Received(peer, P.CollectiveComplete(tag, op_id, ok)))


@settings(max_examples=200, deadline=None)
@given(st.lists(EVENT, max_size=40))
@example(ROUND_TRIP)
@example(ROUND_TRIP[:3] + [("lost", 2)] + ROUND_TRIP[:2] + [("ready",)] + ROUND_TRIP[3:5])
def test_the_fast_path_acts_exactly_like_the_full_settle(events: list[tuple[Any, ...]]) -> None:
    fast, slow = Harness(3), Harness(3)
    got_fast = [_apply(fast, e) for e in events]
    with mock.patch.object(colls, "quiet_group", lambda *args: None):
        got_slow = [_apply(slow, e) for e in events]
    assert got_fast == got_slow


# --- the members' transfer tags ------------------------------------------------------------


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**19 - 1), st.integers(0, 2**12 - 1),
       st.integers(0, 2**32 - 1), st.integers(0, 2**19 - 1), st.integers(0, 2**12 - 1))
def test_optimistic_tags_set_bit_63_and_differ_within_their_field_ranges(
    e1: int, t1: int, u1: int, e2: int, t2: int, u2: int
) -> None:
    a, b = optimistic_tag(e1, t1, u1), optimistic_tag(e2, t2, u2)
    assert BIT <= a < 2**64 and BIT <= b < 2**64
    assert (a == b) == ((e1, t1, u1) == (e2, t2, u2))


@given(st.lists(st.tuples(st.integers(1, 3), st.integers(0, 5)), max_size=40))
def test_members_that_saw_the_same_starts_propose_the_same_tags(starts: list[tuple[int, int]]) -> None:
    a, b = TransferTags(), TransferTags()
    for epoch, tag in sorted(starts, key=lambda s: s[0]):  # epochs only grow on the wire
        for tags in (a, b):
            tags.started(epoch, tag)
    for tag in range(6):
        assert a.propose(3, tag, []) == b.propose(3, tag, [])
        uses = sum(1 for e, t in starts if (e, t) == (3, tag) and a.epoch == 3)
        assert a.propose(3, tag, []) == optimistic_tag(3, tag, uses)


def test_burnt_tags_are_skipped_and_tags_in_flight_never_proposed() -> None:
    tags = TransferTags()
    first = tags.propose(7, 1, [])
    assert first == optimistic_tag(7, 1, 0)
    assert tags.propose(7, 1, [first]) == 0
    tags.burn(7, first)  # a confirmed operation under it failed
    assert tags.burnt(first) and tags.propose(7, 1, []) == optimistic_tag(7, 1, 1)
    for use in range(1, 40):
        tags.burn(7, optimistic_tag(7, 1, use))
    assert tags.propose(7, 1, []) == 0  # a bounded search: then the master's op id it is
    assert tags.propose(8, 1, []) == optimistic_tag(8, 1, 0)  # a new epoch: nothing is burnt
    assert not tags.burnt(first) and tags.propose(7, 1, []) == 0  # nor proposed for an old ring


def test_dropped_attempts_burn_their_tag_and_back_off_exponentially() -> None:
    tags = TransferTags()
    proposals = []
    for _ in range(12):  # every attempt is dropped: a member never starts optimistically
        xtag = tags.propose(3, 0, [])
        proposals.append(xtag != 0)
        if xtag:
            tags.settled(3, 0, xtag, confirmed=False)
            assert tags.burnt(xtag)
        tags.started(3, 0)  # the master's fallback start
    # attempt, skip 1, attempt, skip 3, attempt, skip 7 (cut short here)
    assert proposals == [True, False, True, False, False, False, True] + [False] * 5
    xtag = tags.propose(4, 0, [])  # a new epoch starts afresh
    assert xtag == optimistic_tag(4, 0, 0)
    tags.settled(4, 0, xtag, confirmed=True)
    assert not tags.burnt(xtag) and tags.propose(4, 0, []) == xtag  # reused after a success


def test_starts_are_counted_per_tag_in_the_newest_epoch() -> None:
    tags = TransferTags()
    tags.started(7, 1)
    assert tags.propose(7, 1, []) == optimistic_tag(7, 1, 1)
    assert tags.propose(7, 2, []) == optimistic_tag(7, 2, 0)
    tags.started(6, 1)  # an older epoch's start: not counted
    assert tags.propose(7, 1, []) == optimistic_tag(7, 1, 1)
    tags.started(8, 2)  # a newer epoch counts afresh
    assert tags.propose(8, 1, []) == optimistic_tag(8, 1, 0)
    assert tags.propose(8, 2, []) == optimistic_tag(8, 2, 1)


def test_the_count_forgets_the_least_recently_started_tag_first() -> None:
    tags = TransferTags()
    for tag in range(MAX_COUNTED_TAGS + 1):
        tags.started(1, tag)
    assert tags.propose(1, 0, []) == optimistic_tag(1, 0, 0)  # forgotten
    assert tags.propose(1, 1, []) == optimistic_tag(1, 1, 1)


# --- real Communicators --------------------------------------------------------------------


@pytest.fixture(scope="module")
def master() -> Iterator[Master]:
    with Master("127.0.0.1", 0, heartbeat_timeout=5.0) as m:
        yield m


@pytest.fixture
def pair(master: Master) -> Iterator[list[Communicator]]:
    """Two connected Communicators in a group of their own, in this process."""
    comms = [Communicator(master.address, peer_group=70, connections=2) for _ in range(2)]
    try:
        comms[0].connect(timeout=20)
        joining = threading.Thread(target=comms[1].connect, kwargs={"timeout": 20})
        joining.start()
        wait_for(lambda: master.status()["pending"], 20, "the second peer to register")
        comms[0].update_topology()
        joining.join()
        yield comms
    finally:
        for comm in comms:
            comm.close()
        wait_for(lambda: not master.status()["accepted"], 20, "the peers to leave the run")


def _reduced(xs: list[torch.Tensor], got: torch.Tensor) -> None:
    ref = np.sum([x.double().numpy() for x in xs], axis=0)
    assert np.abs(got.double().numpy() - ref).max() <= 4 * np.finfo(np.float32).eps * np.abs(ref).max()


@pytest.mark.timeout(60)
def test_a_confirmed_start_reduces_correctly_and_a_non_optimistic_peer_forces_a_clean_rerun(
    pair: list[Communicator],
) -> None:
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(300_001, generator=g) for _ in range(2)]
    ys = [x.clone() for x in xs]
    infos = in_parallel(
        lambda: pair[0].all_reduce(ys[0], tag=5),
        lambda: pair[1].all_reduce(ys[1], tag=5),
        timeout=30,
    )
    assert [i.world_size for i in infos] == [2, 2] and torch.equal(ys[0], ys[1])
    _reduced(xs, ys[0])
    assert [link_stats(c)["confirmed"] for c in pair] == [1, 1]

    # Peer 1 runs the same reduction through a body that may not run twice: the master
    # cannot confirm peer 0's attempt, whose bytes already went to peer 1.
    ys = [x.clone() for x in xs]

    async def once(ctx: CollectiveContext) -> int:
        assert ctx.peers is not None and ctx.op_id < BIT
        await ring_all_reduce(ctx.peers, ctx.op_id, ys[1].clone(), ys[1])
        return ctx.world_size

    desc = descriptor("all_reduce", ys[1], ReduceOp.SUM, None)
    got = in_parallel(
        lambda: pair[0].all_reduce(ys[0], tag=5),
        lambda: pair[1]._collective_blocking(5, desc, once),
        timeout=30,
    )
    assert got[0].world_size == 2 and got[1] == 2 and torch.equal(ys[0], ys[1])
    _reduced(xs, ys[0])
    stats = [link_stats(c) for c in pair]
    assert [s["dropped"] for s in stats] == [1, 0] and [s["held"] for s in stats] == [0, 0], stats


@pytest.mark.timeout(60)
def test_a_mismatch_found_after_bytes_crossed_fails_both_with_usage_and_leaves_clean_links(
    pair: list[Communicator],
) -> None:
    # 12 MiB against 6 MiB: two pieces per chunk against one, so each side sends transfers
    # the other never posts (they wait in its side buffer) and some of the same size.
    xs = [torch.ones(3 << 20), torch.ones(3 << 19)]
    ys = [x.clone() for x in xs]
    errors = in_parallel(
        lambda: pair[0].all_reduce(ys[0], tag=1),
        lambda: pair[1].all_reduce(ys[1], tag=1),
        timeout=30,
    )
    for error in errors:
        assert isinstance(error, InvalidUsageError) and "disagree on 'numel'" in str(error), errors
    assert all(torch.equal(x, y) for x, y in zip(xs, ys))  # restored
    stats = [link_stats(c) for c in pair]
    assert [s["dropped"] for s in stats] == [1, 1] and [s["held"] for s in stats] == [0, 0], stats
    # The links carry on with the same tag: once through the master (the tag backs off),
    # then optimistically again (the burnt transfer tag skipped); both correct.
    g = torch.Generator().manual_seed(4)
    for confirmed in ([0, 0], [1, 1]):
        xs = [torch.randn(1 << 20, generator=g) for _ in range(2)]
        ys = [x.clone() for x in xs]
        in_parallel(
            lambda: pair[0].all_reduce(ys[0], tag=1),
            lambda: pair[1].all_reduce(ys[1], tag=1),
            timeout=30,
        )
        assert torch.equal(ys[0], ys[1])
        _reduced(xs, ys[0])
        assert [link_stats(c)["confirmed"] for c in pair] == confirmed


@pytest.mark.timeout(90)
def test_a_peer_killed_while_the_others_run_optimistically_fails_them_with_inputs_restored(tmp_path: Path) -> None:
    spec = {"op": "sum", "dtype": "float32", "numel": 3_000_001, "name": "k", "tag": 8, "seed": 8}
    with Master("127.0.0.1", 0, heartbeat_timeout=2.0) as master:
        peers = start_groups(master, {0: 3})[0]
        try:
            a, b, victim = peers
            for peer in (a, b):
                assert peer.call("start", **spec) == {"done": False}
            # The victim never initiates, so the master starts nothing; yet the attempts run:
            # the peer after the first one has already reduced data into its tensor.
            wait_for(lambda: any(p.call("changed", name="k") for p in (a, b)), 20, "an attempt to write")
            assert master.status()["collectives"][0] == {8: sorted([a.peer_id, b.peer_id])}
            victim.signal(signal.SIGKILL)
            outcomes = [p.call("wait", name="k", timeout=10) for p in (a, b)]
            assert [o.get("error") for o in outcomes] == ["PeerLostError"] * 2, outcomes
            assert all(o["input_unchanged"] for o in outcomes), outcomes
            stats = [p.call("stats") for p in (a, b)]
            assert [s["dropped"] for s in stats] == [1, 1] and [s["held"] for s in stats] == [0, 0], stats
            # The survivors' next reduction runs optimistically on the ring of two, correctly.
            spec = {"op": "sum", "dtype": "float32", "numel": 1003, "seed": 9, "tag": 8}
            for i, peer in enumerate((a, b)):
                peer.send("cases", cases=[spec], dump=str(tmp_path / "r.pt") if i == 0 else None)
            results = [p.reply(30)["result"][0] for p in (a, b)]
            assert [r["info"][0] for r in results] == [2, 2] and results[0]["hash"] == results[1]["hash"]
            assert [p.call("stats")["confirmed"] for p in (a, b)] == [1, 1]
            check_result("sum", torch.float32, inputs(spec, [a.peer_id, b.peer_id]), torch.load(tmp_path / "r.pt")[0])
        finally:
            kill_all(peers)
