"""The master's status: the sans-IO snapshot, its terminal table, the HTTP endpoint and ``pccl status``.

Snapshots are checked against values written out by hand from the events fed (not
against the implementation); the endpoint against a live master with real peer
processes on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pccl import protocol as P
from pccl import status as status_mod
from pccl.cli import main as cli_main
from pccl.master import Master
from pccl.master_state import RECENT_REMOVALS, Bind, MasterState, PeerLost, Received, RegisterRequest, Tick
from pccl.status import bandwidth_matrix, format_rate, format_status, snapshot
from pccl.status_cli import status_url
from pccl.status_http import MAX_CLIENTS, MAX_HEAD, Request, RequestError, StatusServer, parse_request

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 5.0
HB = 2.0


class Harness:
    """Drives a MasterState with a hand-held clock; registered peers get port 6000 + n."""

    def __init__(self) -> None:
        self.state = MasterState(TIMEOUT)
        self.now = 0.0
        self._conn = 0

    def feed(self, event: Any) -> list[Any]:
        return self.state.handle(self.now, event)

    def register(self, group: int = 0) -> int:
        self._conn += 1
        actions = self.feed(RegisterRequest(self._conn, P.Register(group, 6000 + self._conn, None), "127.0.0.1"))
        return next(a.peer for a in actions if isinstance(a, Bind))

    def send(self, peer: int, msg: Any) -> None:
        self.feed(Received(peer, msg))

    def ready(self) -> None:
        for group in list(self.state.groups.values()):
            for peer in list(group.ring):
                self.send(peer, P.LinksReady(group.epoch))

    def snap(self) -> dict[str, Any]:
        return snapshot(self.state, self.now, master="127.0.0.1:48148")


def three_peers(h: Harness) -> tuple[int, int, int]:
    """Peers 1, 2 (group 0) and 3 (group 1), all accepted and linked."""
    a = h.register(0)
    h.ready()
    b, c = h.register(0), h.register(1)
    h.send(a, P.Vote(P.UPDATE_TOPOLOGY))
    h.ready()
    assert (a, b, c) == (1, 2, 3) and h.state.accepted() == [1, 2, 3]
    return a, b, c


# --- snapshot ------------------------------------------------------------------------------


def test_snapshot_of_an_empty_master() -> None:
    assert Harness().snap() == {
        "version": 1, "master": "127.0.0.1:48148", "heartbeat_timeout": TIMEOUT,
        "world": {"global_world_size": 0, "num_peer_groups": 0, "largest_peer_group_size": 0},
        "peers": [], "groups": [], "round": None, "collectives": [],
        "bandwidth": {"peers": [], "bytes_per_s": []}, "recent_kicks": [], "recent_departures": [],
    }


def test_peers_show_state_address_group_and_heartbeat_age() -> None:
    h = Harness()
    h.now = 10.0
    a = h.register(0)
    h.ready()
    h.now = 11.0
    b = h.register(7)
    h.now = 12.5
    h.send(a, P.Heartbeat())
    h.now = 14.0
    snap = h.snap()
    assert snap["peers"] == [
        {"id": a, "address": "127.0.0.1:6001", "group": 0, "state": "accepted", "heartbeat_age": 1.5,
         "waiting_in": None, "in_flight": []},
        {"id": b, "address": "127.0.0.1:6002", "group": 7, "state": "pending", "heartbeat_age": 3.0,
         "waiting_in": None, "in_flight": []},
    ]
    assert snap["world"] == {"global_world_size": 1, "num_peer_groups": 1, "largest_peer_group_size": 1}
    assert snap["groups"] == [{"id": 0, "ring": [a], "epoch": 1, "links_ready": True, "revision": None,
                               "revision_holders": [], "sync": None}]


def test_a_voted_in_peer_is_joining_until_its_links_are_ready() -> None:
    h = Harness()
    a = h.register()
    h.ready()
    b, c = h.register(), h.register()
    h.send(a, P.Vote(P.UPDATE_TOPOLOGY))
    snap = h.snap()
    assert [(p["id"], p["state"]) for p in snap["peers"]] == [(a, "accepted"), (b, "joining"), (c, "joining")]
    assert snap["round"] == {"kind": P.UPDATE_TOPOLOGY, "phase": "linking", "voters": [a], "joiners": [b, c],
                             "waiting_for": []}
    assert snap["groups"][0]["links_ready"] is False and sorted(snap["groups"][0]["ring"]) == [a, b, c]
    assert [p["waiting_in"] for p in snap["peers"]] == [P.UPDATE_TOPOLOGY, "connect", "connect"]
    h.ready()
    assert [p["state"] for p in h.snap()["peers"]] == ["accepted"] * 3 and h.snap()["round"] is None


def test_an_open_vote_lists_who_it_waits_for() -> None:
    h = Harness()
    a, b, c = three_peers(h)
    h.send(b, P.Vote(P.PEERS_PENDING))
    assert h.snap()["round"] == {"kind": P.PEERS_PENDING, "phase": "voting", "voters": [b], "joiners": [],
                                 "waiting_for": [a, c]}


def test_collectives_in_flight_from_initiation_to_completion() -> None:
    h = Harness()
    a, b, c = three_peers(h)
    h.send(a, P.CollectiveInitiate(7, {"kind": "all_reduce", "numel": 4}))
    assert h.snap()["collectives"] == [{"group": 0, "tag": 7, "kind": "all_reduce", "op_id": None,
                                        "state": "initiating", "participants": [a], "waiting_for": [b]}]
    h.send(b, P.CollectiveInitiate(7, {"kind": "all_reduce", "numel": 4}))
    h.send(c, P.CollectiveInitiate(0, {"kind": "broadcast"}))  # group 1 is c alone: starts at once
    snap = h.snap()
    op_id = snap["collectives"][0]["op_id"]
    assert op_id is not None and op_id > 0
    assert snap["collectives"] == [
        {"group": 0, "tag": 7, "kind": "all_reduce", "op_id": op_id, "state": "running", "participants": [a, b],
         "waiting_for": [a, b]},
        {"group": 1, "tag": 0, "kind": "broadcast", "op_id": op_id + 1, "state": "running", "participants": [c],
         "waiting_for": [c]},
    ]
    assert [p["in_flight"] for p in snap["peers"]] == [[7], [7], [0]]
    h.send(a, P.CollectiveComplete(7, op_id, True, ""))
    assert h.snap()["collectives"][0]["waiting_for"] == [b]
    h.send(b, P.CollectiveComplete(7, op_id, True, ""))
    assert [c_["tag"] for c_ in h.snap()["collectives"]] == [0]


def _report(revision: int) -> P.SyncReport:
    return P.SyncReport(revision, "enforce_popular", ["w"], [b"\x01" * 16], ["float32"], [[2]], [8], [False])


def test_shared_state_revision_per_group() -> None:
    h = Harness()
    a, b, c = three_peers(h)
    h.send(a, _report(4))
    sync = h.snap()["groups"][0]["sync"]
    assert sync is not None and sync["phase"] == "reporting" and sync["waiting_for"] == [b]
    h.send(b, _report(4))
    sync = h.snap()["groups"][0]["sync"]
    assert sync["phase"] == "fetching" and sync["revision"] == 4 and sync["waiting_for"] == [a, b]
    for peer in (a, b):
        h.send(peer, P.SyncDone(sync["sync_id"], True))
    groups = h.snap()["groups"]
    assert [(g["id"], g["revision"], g["revision_holders"], g["sync"]) for g in groups] == [
        (0, 4, [a, b], None), (1, None, [], None)]


def test_kicks_and_departures_are_listed_newest_first_with_reasons() -> None:
    h = Harness()
    a, b, c = three_peers(h)
    h.now = 1.0
    h.send(b, P.Leave())
    h.now = 2.0
    h.feed(PeerLost(c, "connection reset by peer"))
    h.now = 2.0 + TIMEOUT + 0.5  # a has been silent since t=0
    h.feed(Tick())
    h.now += 1.0
    snap = h.snap()
    assert snap["peers"] == []
    assert snap["recent_departures"] == [
        {"peer": c, "group": 1, "age": TIMEOUT + 1.5, "reason": "connection reset by peer"},
        {"peer": b, "group": 0, "age": TIMEOUT + 2.5, "reason": "left the run"},
    ]
    [kick] = snap["recent_kicks"]
    assert (kick["peer"], kick["group"], kick["age"], kick["error"]) == (a, 0, 1.0, P.ERROR_MASTER)
    assert kick["reason"].startswith("silent for 7.50 s") and "heartbeat timeout" in kick["reason"]


def test_recent_kicks_are_bounded() -> None:
    h = Harness()
    peers = [h.register() for _ in range(RECENT_REMOVALS + 5)]
    for i, peer in enumerate(peers):
        h.now = float(i)
        h.send(peer, P.Vote(P.UPDATE_TOPOLOGY))  # a pending peer may not vote: kicked
    kicks = h.snap()["recent_kicks"]
    assert [k["peer"] for k in kicks] == peers[::-1][:RECENT_REMOVALS]
    assert all("before its connect() completed" in k["reason"] for k in kicks)
    assert len(h.state.kicks) == len(peers)  # the full record is kept apart


def test_bandwidth_matrix_is_empty_until_measured_and_square_over_live_peers(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness()
    a, b, c = three_peers(h)
    assert bandwidth_matrix(h.state) == {}
    assert h.snap()["bandwidth"] == {"peers": [a, b, c], "bytes_per_s": [[None] * 3] * 3}
    # 99 is long gone: not shown; 0 is a failed measurement; JSON has no infinity.
    measured = {(a, b): 1.5e9, (b, a): 2.0e6, (a, 99): 5.0, (c, a): 0.0, (b, c): float("inf")}
    monkeypatch.setattr(status_mod, "bandwidth_matrix", lambda state: measured)
    assert h.snap()["bandwidth"] == {
        "peers": [a, b, c],
        "bytes_per_s": [[None, 1.5e9, None], [2.0e6, None, None], [0.0, None, None]],
    }
    lines = format_status(h.snap()).splitlines()
    matrix = lines[lines.index("BANDWIDTH (bytes/s, row sends to column)") + 1:][:4]
    assert [row.split() for row in matrix] == [
        ["from\\to", "1", "2", "3"], ["1", ".", "1.5", "GB/s", "-"], ["2", "2", "MB/s", ".", "-"],
        ["3", "failed", "-", "."]]


def test_snapshot_survives_a_json_round_trip() -> None:
    h = Harness()
    a, b, c = three_peers(h)
    h.send(a, P.CollectiveInitiate(3, {"kind": "x"}))
    h.send(b, _report(1))
    h.feed(PeerLost(c, "gone"))
    snap = h.snap()
    assert json.loads(json.dumps(snap)) == snap


events = st.one_of(
    st.tuples(st.just("register"), st.integers(0, 2)),
    st.tuples(st.just("ready"), st.just(0)),
    st.tuples(st.sampled_from(["vote", "heartbeat", "lost", "leave", "initiate", "sync"]), st.integers(1, 6)),
    st.tuples(st.just("tick"), st.integers(1, 8)),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(events, max_size=25))
def test_snapshot_is_json_and_agrees_with_the_state_after_any_events(script: list[tuple[str, int]]) -> None:
    h = Harness()
    for kind, arg in script:
        if kind == "register":
            h.register(arg)
        elif kind == "ready":
            h.ready()
        elif kind == "tick":
            h.now += arg
            h.feed(Tick())
        elif arg in h.state.peers:
            msg: Any = {"vote": P.Vote(P.UPDATE_TOPOLOGY), "heartbeat": P.Heartbeat(), "leave": P.Leave(),
                        "initiate": P.CollectiveInitiate(1, {"kind": "k"}), "sync": _report(0)}.get(kind)
            h.feed(PeerLost(arg, "lost") if msg is None else Received(arg, msg))
        h.now += 0.25
        snap = h.snap()
        assert json.loads(json.dumps(snap)) == snap
        live = sorted(h.state.peers)
        assert [p["id"] for p in snap["peers"]] == live
        by_id = {p["id"]: p for p in snap["peers"]}
        for group in snap["groups"]:
            for member in group["ring"]:
                assert by_id[member]["group"] == group["id"] and by_id[member]["state"] != "pending"
        for coll in snap["collectives"]:
            assert set(coll["participants"]) <= set(live) and set(coll["waiting_for"]) <= set(live)
        assert all(0 <= p["heartbeat_age"] for p in snap["peers"])
        assert snap["bandwidth"]["peers"] == live
        text = format_status(snap)
        assert all(p["address"] in text for p in snap["peers"])


# --- terminal table ------------------------------------------------------------------------


def test_format_rate_uses_decimal_units() -> None:
    assert [format_rate(v) for v in (None, 0.0, 12.0, 1234.0, 2.5e6, 1.25e9)] == [
        "-", "failed", "12 B/s", "1.23 kB/s", "2.5 MB/s", "1.25 GB/s"]


def test_format_status_prints_every_section() -> None:
    h = Harness()
    a, b, c = three_peers(h)
    h.now = 2.0
    h.send(a, P.Heartbeat())
    h.send(b, P.Leave())
    text = format_status(h.snap())
    lines = text.splitlines()
    assert lines[0] == "master 127.0.0.1:48148: 2 accepted peers in 2 groups, 0 pending, heartbeat timeout 5 s"
    peers = lines[lines.index("PEERS") + 1:lines.index("PEERS") + 4]
    assert peers[0].split() == ["id", "address", "group", "state", "heartbeat", "waiting", "in", "in", "flight"]
    assert peers[1].split() == ["1", "127.0.0.1:6001", "0", "accepted", "0.0", "s", "ago", "-", "-"]
    assert peers[2].split() == ["3", "127.0.0.1:6003", "1", "accepted", "2.0", "s", "ago", "-", "-"]
    for header in ("GROUPS", "MEMBERSHIP ROUND", "COLLECTIVES IN FLIGHT", "BANDWIDTH", "RECENT KICKS"):
        assert any(line.startswith(header) for line in lines), header
    departures = lines[lines.index("RECENT DEPARTURES") + 2]
    assert departures.split() == ["2", "0", "0.0", "s", "ago", "left", "the", "run"]


# --- HTTP parsing --------------------------------------------------------------------------


def test_parse_request_accepts_get_and_head_and_strips_the_query() -> None:
    assert parse_request(b"GET /status.json?x=1 HTTP/1.1\r\nHost: a\r\n") == Request("GET", "/status.json")
    assert parse_request(b"HEAD / HTTP/1.0") == Request("HEAD", "/")


@pytest.mark.parametrize(("head", "status"), [
    (b"POST / HTTP/1.1", 405), (b"GET / HTTP/2.0", 505), (b"GET /", 400), (b"GET  / HTTP/1.1", 400),
    (b"GET http://x/ HTTP/1.1", 400), (b"GET / HTTP/1.1\r\nno colon", 400), (b"GET /\xff HTTP/1.1", 400),
    (b"GET / FTP/1.1", 400),
])
def test_parse_request_refuses_with_the_right_status(head: bytes, status: int) -> None:
    with pytest.raises(RequestError) as info:
        parse_request(head)
    assert info.value.status == status


@given(st.binary(max_size=200))
def test_parse_request_on_random_bytes_only_raises_request_error(head: bytes) -> None:
    try:
        req = parse_request(head)
    except RequestError as exc:
        assert exc.status in (400, 405, 505)
    else:
        assert req.method in ("GET", "HEAD") and req.path.startswith("/")


@pytest.mark.parametrize(("target", "url"), [
    ("127.0.0.1:8080", "http://127.0.0.1:8080/status.json"),
    ("http://host:1/", "http://host:1/status.json"),
    ("http://host:1/prefix", "http://host:1/prefix/status.json"),
    ("http://host:1/status.json", "http://host:1/status.json"),
    ("[::1]:9", "http://[::1]:9/status.json"),
])
def test_status_url(target: str, url: str) -> None:
    assert status_url(target) == url


@pytest.mark.parametrize("target", ["localhost", "https://h:1/", "h:notaport", ":80", "h:99999"])
def test_status_url_refuses_targets_without_host_and_port(target: str) -> None:
    with pytest.raises(ValueError):
        status_url(target)


# --- HTTP server on its own ----------------------------------------------------------------


async def _exchange(port: int, data: bytes, *, half_close: bool = False) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    if half_close:
        writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


def _status_line(answer: bytes) -> str:
    return answer.split(b"\r\n", 1)[0].decode()


@pytest.mark.timeout(30)
def test_status_server_routes_and_limits() -> None:
    async def main() -> None:
        server = StatusServer(lambda: {"n": 1}, read_timeout=0.3)
        await server.start("127.0.0.1", 0)
        try:
            ok = await _exchange(server.port, b"GET /status.json HTTP/1.1\r\nHost: x\r\n\r\n")
            head, body = ok.split(b"\r\n\r\n", 1)
            assert _status_line(ok) == "HTTP/1.1 200 OK" and json.loads(body) == {"n": 1}
            assert b"Content-Type: application/json" in head and f"Content-Length: {len(body)}".encode() in head
            page = await _exchange(server.port, b"GET / HTTP/1.1\r\n\r\n")
            assert b"Content-Security-Policy: default-src 'none'" in page and b"<title>pccl master status" in page
            assert b"http://" not in page.split(b"\r\n\r\n", 1)[1] and b"https://" not in page  # no external assets
            head_only = await _exchange(server.port, b"HEAD /status.json HTTP/1.1\r\n\r\n")
            assert head_only.endswith(b"\r\n\r\n") and b"Content-Length: 7" in head_only
            assert _status_line(await _exchange(server.port, b"GET /nope HTTP/1.1\r\n\r\n")) == "HTTP/1.1 404 Not Found"
            refused = await _exchange(server.port, b"DELETE / HTTP/1.1\r\n\r\n")
            assert _status_line(refused).startswith("HTTP/1.1 405") and b"Allow: GET, HEAD" in refused
            big = b"GET / HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD + 10) + b"\r\n\r\n"
            assert _status_line(await _exchange(server.port, big)).startswith("HTTP/1.1 431")
            # A client that stalls is answered and dropped after the read timeout.
            assert _status_line(await _exchange(server.port, b"GET / HT")).startswith("HTTP/1.1 400")
            # A client that hangs up early gets nothing and breaks nothing.
            assert await _exchange(server.port, b"GET", half_close=True) == b""
        finally:
            await server.close()

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_status_server_bounds_concurrent_clients_and_survives_a_failing_snapshot() -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("bug")

    async def main() -> None:
        server = StatusServer(broken, read_timeout=5.0)
        await server.start("127.0.0.1", 0)
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(MAX_CLIENTS)]
        try:
            assert _status_line(await _exchange(server.port, b"GET / HTTP/1.1\r\n\r\n")).startswith("HTTP/1.1 503")
        finally:
            for _, writer in idle:
                writer.close()
        # Once the idle clients are gone, requests are served again; the snapshot's bug is a 500.
        async with asyncio.timeout(10):
            while server.active_clients:
                await asyncio.sleep(0.01)
        answer = await _exchange(server.port, b"GET /status.json HTTP/1.1\r\n\r\n")
        assert _status_line(answer).startswith("HTTP/1.1 500")
        await server.close()

    asyncio.run(main())


def test_pccl_status_refuses_what_is_not_a_status_document(capsys: pytest.CaptureFixture[str]) -> None:
    from transport.loop import LoopThread

    thread = LoopThread("status-test")
    server = StatusServer(lambda: {"n": 1})
    try:
        thread.run(server.start("127.0.0.1", 0))
        assert cli_main(["status", f"127.0.0.1:{server.port}"]) == 1
        assert "did not answer with a pccl status document" in capsys.readouterr().err
        assert cli_main(["status", f"http://127.0.0.1:{server.port}/elsewhere/"]) == 1
        assert "answered HTTP 404" in capsys.readouterr().err
    finally:
        thread.run(server.close())
        thread.stop()


def test_status_port_in_use_is_a_master_connection_error() -> None:
    from pccl.errors import MasterConnectionError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(MasterConnectionError, match="status page"):
            Master("127.0.0.1", 0, status_port=taken.getsockname()[1]).start()


# --- against a live master with peer processes ---------------------------------------------


def fetch_json(url: str) -> dict[str, Any]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url + "status.json", timeout=10) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == "application/json"
        doc: dict[str, Any] = json.loads(resp.read())
        return doc


def pccl_status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pccl.cli", "status", *args], capture_output=True, text=True, timeout=60,
        cwd=str(REPO_ROOT), env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
    )


@pytest.mark.timeout(90)
def test_endpoint_and_pccl_status_follow_a_live_run(
    spawn_peer: Callable[..., Any], wait_for: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    with Master("127.0.0.1", 0, heartbeat_timeout=HB, status_port=0) as master:
        url = master.status_url
        assert url is not None and url.startswith("http://127.0.0.1:")
        a, b, c = spawn_peer(master.address, group=0), spawn_peer(master.address, group=0), spawn_peer(
            master.address, group=1)
        a.call("connect")
        for peer in (b, c):
            peer.send("connect")
        wait_for(lambda: len(fetch_json(url)["peers"]) == 3, 30, "three registered peers")
        pending = fetch_json(url)
        assert [p["state"] for p in pending["peers"]] == ["accepted", "pending", "pending"]
        a.call("update_topology")
        assert b.reply(20)["ok"] and c.reply(20)["ok"]
        ids = [p.call("info")["peer_id"] for p in (a, b, c)]
        doc = fetch_json(url)
        assert [p["id"] for p in doc["peers"]] == sorted(ids)
        assert {p["id"]: (p["group"], p["state"]) for p in doc["peers"]} == {
            ids[0]: (0, "accepted"), ids[1]: (0, "accepted"), ids[2]: (1, "accepted")}
        assert all(p["address"].startswith("127.0.0.1:") and p["heartbeat_age"] < HB for p in doc["peers"])
        assert [(g["id"], sorted(g["ring"])) for g in doc["groups"]] == [(0, sorted(ids[:2])), (1, [ids[2]])]
        assert [g["ring"] for g in doc["groups"]] == [a.call("info")["ring"], c.call("info")["ring"]]
        assert doc["master"] == master.address and doc["recent_kicks"] == []
        assert doc["bandwidth"]["peers"] == sorted(ids)

        # Two peers wait in a collective whose data never comes: it is listed in flight.
        a.send("hang_collective", tag=5)
        b.send("hang_collective", tag=5)
        running = wait_for(lambda: [x for x in fetch_json(url)["collectives"] if x["state"] == "running"], 20,
                           "the collective to start")
        assert running == [{"group": 0, "tag": 5, "kind": "hang", "op_id": running[0]["op_id"], "state": "running",
                            "participants": sorted(ids[:2]), "waiting_for": sorted(ids[:2])}]
        table = pccl_status(url)
        assert table.returncode == 0, table.stderr
        assert "COLLECTIVES IN FLIGHT" in table.stdout and " hang " in table.stdout
        for peer in doc["peers"]:
            assert peer["address"] in table.stdout

        # b dies: the collective is aborted, b is gone from the peers and listed as departed.
        b.kill()
        assert a.reply(20)["error"] == "PeerLostError"
        after = wait_for(lambda: (d := fetch_json(url)) and len(d["peers"]) == 2 and d, 20, "b to disappear")
        assert [p["id"] for p in after["peers"]] == sorted([ids[0], ids[2]]) and after["collectives"] == []
        assert [d["peer"] for d in after["recent_departures"]] == [ids[1]]

        # c hangs: it is kicked for silence, with the reason on the page.
        c.signal(signal.SIGSTOP)
        kicked = wait_for(lambda: fetch_json(url)["recent_kicks"], 3 * HB + 5, "c to be kicked")
        assert kicked[0]["peer"] == ids[2] and "silent for" in kicked[0]["reason"]
        # The same command in-process (the subprocess above covers the entry point): HOST:PORT, --json.
        capsys.readouterr()
        assert cli_main(["status", url.removeprefix("http://").rstrip("/"), "--json"]) == 0
        assert [p["id"] for p in json.loads(capsys.readouterr().out)["peers"]] == [ids[0]]
    assert cli_main(["status", url]) == 1
    gone = capsys.readouterr()
    assert gone.out == "" and f"cannot reach {url}status.json" in gone.err


def test_pccl_master_refuses_status_host_without_status_port() -> None:
    assert cli_main(["master", "--host", "127.0.0.1", "--port", "0", "--status-host", "127.0.0.1"]) == 1
    assert cli_main(["master", "--host", "127.0.0.1", "--port", "0", "--status-port", "70000"]) == 1


@pytest.mark.timeout(60)
def test_pccl_master_status_port_option() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pccl.cli", "master", "--host", "127.0.0.1", "--port", "0", "--status-port", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=str(REPO_ROOT),
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
    )
    try:
        assert proc.stderr is not None
        url = None
        for line in proc.stderr:
            if "status page url=" in line:
                url = line.split("status page url=", 1)[1].split()[0]
                break
        assert url is not None and url.startswith("http://127.0.0.1:")
        doc = fetch_json(url)
        assert doc["peers"] == [] and doc["master"].startswith("127.0.0.1:")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        if proc.stderr is not None:
            proc.stderr.close()
