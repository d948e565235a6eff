"""Bad input against a peer's p2p port while it keeps all-reducing with its neighbour.

Two correct peers (in this process, :class:`stress.chaos_fuzz.ReducingPair`) reduce in
lockstep, every result checked exactly, while a raw client written from
``docs/protocol.md`` sends peer A's p2p server random bytes, handshakes followed by
garbage, lying length fields, connections that are not links, link pools that never
complete, links from strangers that then misbehave, and floods of half-open
connections. Every offender must be dropped, the pair must never notice, and A must not
keep anything of the strangers (sockets, link table entries) once they are gone.

Not covered, by design: a stranger that claims the peer id of a real neighbour replaces
that neighbour's link (the run recovers through a failed collective and a re-link).
Without a secret anyone may speak for anyone; with one, the handshake refuses strangers.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stress.chaos_fuzz import (
    CLOSE,
    CONTROL,
    DATA,
    HEARTBEAT,
    RawClient,
    ReducingPair,
    control,
    drain,
    frame,
    free_port,
    launch_master,
    proc_fds,
)

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
STRANGER = 10**9  # peer ids from here on are nobody in the run


class Run:
    def __init__(self, pair: ReducingPair, port: int) -> None:
        self.pair, self.port = pair, port
        session = pair.comms[0]._session  # noqa: SLF001 - its link table is under test
        assert session is not None
        self.links = session.links
        self.fds = proc_fds()

    def serving(self) -> None:
        self.pair.progress(3)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    log = tmp_path_factory.mktemp("fuzz-p2p") / "master.log"
    proc, address = launch_master(log, heartbeat_timeout=2.0)
    port = free_port()
    pair = ReducingPair(address, p2p_ports=(port, 0))
    try:
        pair.start()
        pair.progress(3)
        yield Run(pair, port)
    finally:
        pair.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def stranger(port: int, rng: random.Random, role: str = "p2p", pool: int = 1) -> list[RawClient]:
    """A complete link of ``pool`` connections from a peer id nobody in the run has."""
    link_id, peer = rng.getrandbits(64), STRANGER + rng.randrange(10**6)
    clients = [RawClient(port) for _ in range(pool)]
    for i, client in enumerate(clients):
        client.handshake(role=role, peer_id=peer, link_id=link_id, index=i, pool_size=pool)
    got = clients[0].recv_frame()  # transport.link_ready: the pool is assembled (§4)
    assert got is not None and got[0] == CONTROL, got
    return clients


@pytest.mark.timeout(60)
@FUZZ
@given(junk=st.binary(min_size=1, max_size=300))
def test_random_bytes_are_dropped(run: Run, junk: bytes) -> None:
    client = RawClient(run.port)
    client.send(junk)
    assert drain(client).closed


@pytest.mark.timeout(60)
def test_a_connection_that_is_not_a_link_is_closed_with_a_reason(run: Run) -> None:
    client = RawClient(run.port)
    client.handshake(role="p2p", peer_id=STRANGER)
    drained = drain(client, half_close=False)
    assert drained.closed
    assert any(t == CLOSE and b"links only" in p for t, p in drained.frames), drained.frames


@pytest.mark.timeout(60)
@FUZZ
@given(role=st.sampled_from(["p2p", "shared_state", "bandwidth", "nonsense"]), pool=st.integers(1, 3),
       tail=st.binary(min_size=1, max_size=200), cut=st.integers(0, 48), seed=st.integers(0, 2**32))
def test_a_strangers_link_that_turns_to_garbage_is_dropped(
    run: Run, role: str, pool: int, tail: bytes, cut: int, seed: int
) -> None:
    clients = stranger(run.port, random.Random(seed), role, pool)
    victim = clients.pop(seed % pool)
    victim.send(frame(HEARTBEAT)[:cut] + tail)
    assert drain(victim).closed  # the tail ends with our FIN, inside a frame or not
    # One broken connection takes the whole pool down (§4).
    for client in clients:
        assert drain(client, half_close=False).closed


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad", [
    frame(CONTROL, length=(1 << 24) + 1),
    frame(DATA, length=1 << 62, total=1 << 62),
    frame(DATA, b"x" * 8, offset=10, total=12),  # runs past its transfer's end
    frame(CONTROL, b"\xc1"),
    control("transport.link_ready", {"link_id": "not an int"}),
], ids=["control too long", "data too long", "data past total", "not msgpack", "bad field"])
def test_bad_frames_on_a_strangers_link_close_it_at_once(run: Run, bad: bytes) -> None:
    (client,) = stranger(run.port, random.Random(bad))
    client.send(bad)
    assert drain(client, half_close=False, timeout=3).closed


@pytest.mark.timeout(60)
def test_incomplete_link_pools_and_half_open_connections_are_dropped(run: Run) -> None:
    rng = random.Random(5)
    waiting: list[RawClient] = []
    for k in range(20):  # pools of 4 of which only some connections ever come
        link_id = rng.getrandbits(64)
        for i in range(k % 3 + 1):
            client = RawClient(run.port)
            client.handshake(role="p2p", peer_id=STRANGER + k, link_id=link_id, index=i, pool_size=4)
            waiting.append(client)
    half_open = [RawClient(run.port) for _ in range(200)]
    for i, client in enumerate(half_open[::4]):
        client.send(frame(HEARTBEAT)[: 1 + i % 40])
    run.serving()  # the pair does not notice any of it
    # Handshake timeout (5 s) for the half-open ones, link timeout (10 s) for the pools.
    for client in half_open + waiting:
        assert drain(client, half_close=False, timeout=15).closed
    run.serving()


@pytest.mark.timeout(60)
def test_nothing_of_the_strangers_is_kept(run: Run) -> None:
    run.serving()
    deadline = time.monotonic() + 10
    while proc_fds() > run.fds or any(p >= STRANGER for p in run.links.inbound):
        assert time.monotonic() < deadline, (proc_fds(), run.fds, sorted(run.links.inbound))
        time.sleep(0.05)
    run.serving()
