"""Bad input against a master's port while two correct peers keep all-reducing through it.

The master runs in its own process (``pccl master``), so its file descriptors and memory
are read from /proc and its log is what an operator would see. The fuzzer is a raw client
written from ``docs/protocol.md`` (:mod:`stress.chaos_fuzz`): random bytes, valid
prefixes with corrupt tails, lying length fields, messages that are wrong for the
connection's state, and floods of half-open connections. After every batch the two
correct peers must have gone on reducing, every result exact, and each offender must have
been dropped (its connection closed) and logged.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stress.chaos_fuzz import (
    CONTROL,
    DATA,
    HEARTBEAT,
    HELLO,
    RawClient,
    ReducingPair,
    control,
    drain,
    frame,
    launch_master,
    proc_fds,
    proc_rss_mib,
)

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Run:
    def __init__(self, proc: Any, address: str, log: Path, pair: ReducingPair) -> None:
        self.proc, self.address, self.log, self.pair = proc, address, log, pair
        self.port = int(address.rsplit(":", 1)[1])
        self.fds = proc_fds(proc.pid)
        self.rss = proc_rss_mib(proc.pid)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def serving(self) -> None:
        """The master is alive and the correct peers keep reducing."""
        assert self.proc.poll() is None, self.text()[-3000:]
        self.pair.progress(3)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    log = tmp_path_factory.mktemp("fuzz-master") / "master.log"
    proc, address = launch_master(log, heartbeat_timeout=2.0)
    pair = ReducingPair(address)
    try:
        pair.start()
        pair.progress(3)
        yield Run(proc, address, log, pair)
    finally:
        pair.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    assert "Traceback" not in log.read_text(errors="replace")


def register(group: int = 900, port: int = 9) -> bytes:
    return control("pccl.register", {"group": group, "p2p_port": port, "advertise_host": None})


@pytest.mark.timeout(60)
@FUZZ
@given(junk=st.binary(min_size=1, max_size=300))
def test_random_bytes_instead_of_a_hello_are_dropped(run: Run, junk: bytes) -> None:
    client = RawClient(run.port)
    client.send(junk)
    assert drain(client).closed


@pytest.mark.timeout(60)
@FUZZ
@given(registered=st.booleans(), tail=st.binary(min_size=1, max_size=200), cut=st.integers(0, 60))
def test_valid_prefix_with_a_corrupt_tail_is_dropped(run: Run, registered: bool, tail: bytes, cut: int) -> None:
    client = RawClient(run.port)
    client.handshake()
    prefix = register() if registered else b""
    # The tail starts inside a frame header (a cut-off valid frame) or right at a boundary.
    client.send(prefix + frame(HEARTBEAT)[:cut % 49] + tail)
    assert drain(client).closed


@pytest.mark.timeout(60)
@pytest.mark.parametrize("after_handshake", [False, True])
@pytest.mark.parametrize("frame_type, length", [(HELLO, 1 << 40), (CONTROL, (1 << 24) + 1), (CONTROL, (1 << 64) - 1),
                                                (DATA, 1 << 62), (HEARTBEAT, 1)])
def test_oversized_length_fields_are_refused_at_the_header(run: Run, after_handshake: bool, frame_type: int,
                                                            length: int) -> None:
    rss = proc_rss_mib(run.proc.pid)
    client = RawClient(run.port)
    if after_handshake:
        client.handshake()
    client.send(frame(frame_type, b"", length=length))
    # No FIN: the master must refuse the header itself, not wait for a payload that never comes.
    assert drain(client, half_close=False, timeout=3).closed
    assert proc_rss_mib(run.proc.pid) - rss < 16


def kicked_reason(client: RawClient) -> str:
    # No FIN from us: the master closes after the kick, and a FIN racing it could turn its
    # close into a reset that discards the kick before we read it.
    drained = drain(client, half_close=False)
    assert drained.closed
    kicks = [fields for name, fields in drained.messages() if name == "pccl.kicked"]
    assert kicks, drained.messages()
    return str(kicks[0]["reason"])


WRONG_FOR_THE_STATE = [
    ("vote first", [control("pccl.vote", {"kind": "update_topology"})], "first message must be Register"),
    ("welcome first", [control("pccl.welcome", {"peer_id": 1, "heartbeat_interval": 1.0,
                                                "heartbeat_timeout": 2.0})], "first message must be Register"),
    ("register twice", [register(), register()], "Register twice"),
    ("master's message", [register(), control("pccl.accepted", {})], "unexpected message"),
    ("vote while pending", [register(), control("pccl.vote", {"kind": "peers_pending"})], "before its connect"),
    ("collective while pending", [register(), control("pccl.collective_initiate", {"tag": 1, "descriptor": {}})],
     "before its connect"),
    ("links ready while pending", [register(), control("pccl.links_ready", {"epoch": 1})], "before being accepted"),
    ("bad group", [register(group=-5)], "out of range"),
    ("bad port", [register(port=0)], "not a valid TCP port"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("frames, reason", [c[1:] for c in WRONG_FOR_THE_STATE],
                         ids=[c[0] for c in WRONG_FOR_THE_STATE])
def test_messages_wrong_for_the_state_are_kicked_with_a_reason(run: Run, frames: list[bytes], reason: str) -> None:
    client = RawClient(run.port)
    client.handshake()
    client.send(b"".join(frames))
    assert reason in kicked_reason(client)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("payload", [
    control("pccl.register", {"group": "zero", "p2p_port": 9, "advertise_host": None}),  # wrong field type
    control("pccl.register", {"group": 1}),  # missing fields
    control("pccl.no_such_message", {}),
    frame(CONTROL, b"\xc1\x00\x00"),  # not msgpack
], ids=["field type", "missing fields", "unknown name", "not msgpack"])
def test_malformed_messages_close_the_connection_and_are_logged(run: Run, payload: bytes) -> None:
    before = run.text().count("protocol error")
    client = RawClient(run.port)
    client.handshake()
    client.send(payload)
    assert drain(client).closed
    deadline = time.monotonic() + 5
    while run.text().count("protocol error") <= before:
        assert time.monotonic() < deadline, "the protocol error was not logged"
        time.sleep(0.02)


_INT = st.integers(-(2**63), 2**64 - 1)
MESSAGES = st.one_of(
    st.builds(lambda k: control("pccl.vote", {"kind": k}), st.sampled_from(["update_topology", "peers_pending", "x"])),
    st.builds(lambda e: control("pccl.links_ready", {"epoch": e}), _INT),
    st.builds(lambda e, p: control("pccl.link_failed", {"epoch": e, "peer": p, "reason": "r"}), _INT, _INT),
    st.builds(lambda t: control("pccl.collective_initiate", {"tag": t, "descriptor": {"numel": 3}}), _INT),
    st.builds(lambda t, o, ok: control("pccl.collective_complete", {"tag": t, "op_id": o, "ok": ok, "reason": ""}),
              _INT, _INT, st.booleans()),
    st.builds(lambda s, ok: control("pccl.sync_done", {"sync_id": s, "ok": ok, "reason": ""}), _INT, st.booleans()),
    st.builds(lambda r: control("pccl.sync_report", {"revision": r, "strategy": "enforce_popular", "keys": ["a"],
                                                     "hashes": [b"h"], "dtypes": ["float32"], "shapes": [[1]],
                                                     "nbytes": [4], "allow_inequality": [False]}), _INT),
    st.just(control("pccl.heartbeat", {})),
    st.just(control("pccl.leave", {})),
    st.builds(lambda g, p: register(g, p), _INT, _INT),
)


@pytest.mark.timeout(90)
@FUZZ
@given(messages=st.lists(MESSAGES, min_size=1, max_size=6))
def test_any_sequence_of_messages_from_a_pending_peer_ends_in_a_kick_or_a_clean_close(
    run: Run, messages: list[bytes]
) -> None:
    client = RawClient(run.port)
    client.handshake()
    client.send(register() + b"".join(messages))
    assert drain(client).closed


@pytest.mark.timeout(60)
def test_every_kind_of_offender_is_logged_with_what_it_did(run: Run) -> None:
    before = run.text()
    offenders = [
        (b"GET / HTTP/1.1\r\n\r\n" + bytes(40), False, "handshake with"),  # not pccl at all
        (register(port=0), True, "refuse "),  # a registration the master refuses
        (register() + control("pccl.accepted", {}), True, "kick peer="),  # a message for the wrong side
        (frame(CONTROL, b"\xc1"), True, "protocol error"),  # a frame that does not decode
    ]
    for data, handshake, _ in offenders:
        client = RawClient(run.port)
        if handshake:
            client.handshake()
        client.send(data)
        assert drain(client, half_close=False).closed
    deadline = time.monotonic() + 5
    for _, _, line in offenders:
        while run.text().count(line) <= before.count(line):
            assert time.monotonic() < deadline, f"no new {line!r} line in the master's log"
            time.sleep(0.02)
    run.serving()


def half_open_flood(run: Run, count: int) -> None:
    """``count`` connections that never finish a handshake; a newcomer is served meanwhile."""
    flood = [RawClient(run.port) for _ in range(count)]
    for i, client in enumerate(flood[::3]):
        client.send(frame(HELLO)[: 1 + i % 40])  # a partial header; the rest never comes
    start = time.monotonic()
    newcomer = RawClient(run.port)
    newcomer.handshake()
    newcomer.send(register(group=901))
    got = newcomer.recv_frame()
    assert got is not None and got[0] == CONTROL and time.monotonic() - start < 2
    newcomer.close()
    run.pair.progress(3)
    # The handshake timeout (5 s) closes every one of them.
    for client in flood:
        assert drain(client, half_close=False, timeout=10).closed


@pytest.mark.timeout(90)
def test_half_open_floods_are_dropped_and_cost_no_lasting_memory(run: Run) -> None:
    half_open_flood(run, 300)
    after_one = proc_rss_mib(run.proc.pid)
    half_open_flood(run, 300)
    # Buffers of the first flood are reused by the second: memory does not keep growing.
    assert proc_rss_mib(run.proc.pid) - after_one < 16
    run.serving()


@pytest.mark.timeout(60)
def test_master_descriptors_are_back_to_where_they_were(run: Run) -> None:
    deadline = time.monotonic() + 10
    while proc_fds(run.proc.pid) > run.fds:
        assert time.monotonic() < deadline, (proc_fds(run.proc.pid), run.fds)
        time.sleep(0.05)
    run.serving()
