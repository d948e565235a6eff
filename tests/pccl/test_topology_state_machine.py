"""The master state machine of ``test_master_state_machine`` with bandwidth measurement on.

Every rule of the membership machine still applies (deaths, silence, illegal messages,
collectives, syncs, time passing); on top, simulated peers answer bandwidth probes
(some fail, some never answer) and the invariants of §5.12 are checked after every
step: one probe per sender and per receiver at a time, probes only between live
members of one group, the matrix only about live peers, and a measuring round always
able to finish.
"""

from __future__ import annotations

from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import invariant, rule

from pccl import protocol as P
from pccl.master_state import MasterState
from test_master_state_machine import TIMEOUT, MasterMachine, SimPeer  # the membership machine


class TopologyMachine(MasterMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = MasterState(TIMEOUT, measure_bandwidth=True)
        self.asked: dict[int, tuple[int, int]] = {}  # probe id -> (sender, receiver), not yet answered

    def deliver(self, sim: SimPeer, msg: Any) -> None:
        if isinstance(msg, P.BandwidthProbe):
            # Only voters of an optimize round measure, never towards themselves.
            assert sim.waiting_vote == P.OPTIMIZE_TOPOLOGY and sim.id is not None and msg.peer != sim.id
            target = self.state.peers.get(msg.peer)  # None if removed later in the same event
            assert target is None or (target.group == sim.group and target.accepted)
            assert msg.probe_id not in self.asked
            self.asked[msg.probe_id] = (sim.id, msg.peer)
        elif isinstance(msg, P.Bandwidths):
            assert sim.waiting_vote == P.OPTIMIZE_TOPOLOGY
            pairs = list(zip(msg.senders, msg.receivers))
            assert len(pairs) == len(set(pairs)) == len(msg.bytes_per_second)
            assert {p for pair in pairs for p in pair} <= set(self.state.groups[sim.group].ring)
        else:
            super().deliver(sim, msg)

    def _answer(self, probe_id: int, ok: bool, rate: float) -> None:
        src, _ = self.asked.pop(probe_id)
        sim = self.by_id[src]
        if sim.gone is None and not sim.silent:
            self.send(sim, P.BandwidthReport(probe_id, ok, rate if ok else 0.0, "" if ok else "refused"))

    @rule()
    def optimize_everyone(self) -> None:
        """Every idle peer calls optimize_topology (the round then measures)."""
        for sim in self.live():
            rnd = self.state.round
            if sim.can_vote() and (rnd is None or (rnd.kind == P.OPTIMIZE_TOPOLOGY and not rnd.linking)):
                sim.waiting_vote = P.OPTIMIZE_TOPOLOGY
                self.send(sim, P.Vote(P.OPTIMIZE_TOPOLOGY))

    @rule(data=st.data(), ok=st.booleans(), rate=st.sampled_from([1e6, 1e8, 1e9]))
    def report(self, data: st.DataObject, ok: bool, rate: float) -> None:
        if self.asked:
            self._answer(data.draw(st.sampled_from(sorted(self.asked))), ok, rate)

    @rule(data=st.data())
    def report_late_or_twice(self, data: st.DataObject) -> None:
        """A report for a probe the master already settled is ignored, never a kick."""
        done = [i for i in range(1, self.state.next_probe_id) if i not in self.asked]
        live = [s for s in self.live() if not s.silent]
        if done and live:
            sim = data.draw(st.sampled_from(live))
            rnd = self.state.round
            running = rnd.probes.running if rnd is not None and rnd.probes is not None else {}
            probe_id = data.draw(st.sampled_from(done))
            if probe_id not in running:
                self.send(sim, P.BandwidthReport(probe_id, True, 1.0))
                assert sim.gone is None

    def _behave_once(self) -> bool:
        for probe_id in sorted(self.asked):
            src, _ = self.asked[probe_id]
            sim = self.by_id[src]
            if sim.gone is None and not sim.silent:
                self._answer(probe_id, True, 1e9)
                return True
        return super()._behave_once()

    @invariant()
    def probes_are_scheduled_safely(self) -> None:
        rnd = self.state.round
        if rnd is None or rnd.probes is None:
            return
        running = list(rnd.probes.running.values())
        assert len({p.src for p in running}) == len(running)
        assert len({p.dst for p in running}) == len(running)
        for probe in running + [type("Pair", (), {"src": a, "dst": b})() for a, b in rnd.probes.todo]:
            a, b = self.state.peers.get(probe.src), self.state.peers.get(probe.dst)
            assert a is not None and b is not None and a.accepted and b.accepted and a.group == b.group
        # While measuring, every accepted peer voted: only the probes stand between the
        # round and its end, and they all end (reports, or the master's deadline).
        assert not set(self.state.accepted()) - rnd.voters

    @invariant()
    def matrix_only_holds_live_peers(self) -> None:
        for a, b in self.state.bandwidth:
            assert a in self.state.peers and b in self.state.peers and a != b
        assert all(v >= 0 for v in self.state.bandwidth.values())

    @invariant()
    def rounds_resolve_once_everyone_voted(self) -> None:
        rnd = self.state.round
        if rnd is not None and rnd.probes is not None:
            return  # measuring: checked by probes_are_scheduled_safely
        super().rounds_resolve_once_everyone_voted()


TopologyMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestTopologyMachine = TopologyMachine.TestCase
