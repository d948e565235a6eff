"""Shared-state sync with real peer processes over TCP on 127.0.0.1.

Each peer is ``shared_state_peer.py`` run as a script, driven by JSON lines on stdin.
Bit identity is checked with SHA-256 of each entry's raw bytes, a hash the library does
not use; byte counts are checked against the entry sizes.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
from shared_state_peer import make_tensor

REPO_ROOT = Path(__file__).resolve().parents[2]
PEER_SCRIPT = Path(__file__).with_name("shared_state_peer.py")

# name -> (dtype, shape); every peer builds its entries from this, content from a seed.
SPEC: dict[str, tuple[str, list[int]]] = {
    "w": ("float32", [128, 96]),
    "b": ("bfloat16", [300]),
    "step": ("int64", []),
}
ITEM = {"float32": 4, "bfloat16": 2, "int64": 8, "float64": 8}


def nbytes(spec: dict[str, tuple[str, list[int]]], key: str) -> int:
    dtype, shape = spec[key]
    n = 1
    for s in shape:
        n *= s
    return n * ITEM[dtype]


TOTAL = sum(nbytes(SPEC, k) for k in SPEC)


# ----------------------------------------------------------------------------- the test side


class Peer:
    """One warm peer process (torch imported once); ``reset`` gives it a new Communicator."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER_SCRIPT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        self.replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.err: list[str] = []
        self.threads = [threading.Thread(target=self._out, daemon=True), threading.Thread(target=self._errs, daemon=True)]
        for t in self.threads:
            t.start()
        self.peer_id = -1
        self.pending: list[str] = []
        self.tainted = False

    def _out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.replies.put(json.loads(line))
        self.replies.put(None)

    def _errs(self) -> None:
        assert self.proc.stderr is not None
        self.err.extend(self.proc.stderr)

    def send(self, cmd: str, **fields: Any) -> None:
        assert self.proc.stdin is not None
        if cmd in ("arm", "corrupt"):
            self.tainted = True  # a process with an injected fault is never reused
        self.pending.append(cmd)
        self.proc.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
        self.proc.stdin.flush()

    def reply(self, timeout: float = 30.0) -> dict[str, Any]:
        try:
            r = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"peer {self.peer_id} silent for {timeout} s\n{''.join(self.err)}") from None
        if r is None:
            raise AssertionError(f"peer {self.peer_id} exited rc={self.proc.poll()}\n{''.join(self.err)}")
        expected = self.pending.pop(0) if self.pending else "started"
        assert r.get("cmd", "started") == expected, f"peer {self.peer_id}: reply {r} to {expected!r}"
        return r

    def ok(self, timeout: float = 30.0) -> Any:
        r = self.reply(timeout)
        assert r["ok"], f"peer {self.peer_id}: {r}\n{''.join(self.err[-30:])}"
        return r["result"]

    def call(self, cmd: str, **fields: Any) -> Any:
        self.send(cmd, **fields)
        return self.ok()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for t in self.threads:
            t.join(10)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                if pipe is not None:
                    pipe.close()
            except BrokenPipeError:
                pass


@pytest.fixture
def master() -> Iterator[Any]:
    from pccl.master import Master

    with Master("127.0.0.1", 0) as m:
        yield m


@pytest.fixture(scope="module")
def pool() -> Iterator[list[Peer]]:
    """Warm peer processes shared by the tests of this module (a process costs seconds to start)."""
    peers: list[Peer] = []
    yield peers
    for p in peers:
        p.kill()


@pytest.fixture
def spawn(pool: list[Peer]) -> Iterator[Any]:
    """``spawn(master, n, group)``: n peers with fresh Communicators; dead processes are replaced."""
    taken: list[Peer] = []

    def make(master: Any, n: int, group: int = 0) -> list[Peer]:
        for p in [p for p in pool if p.proc.poll() is not None or p.tainted]:
            p.kill()
            pool.remove(p)
        free = [p for p in pool if p not in taken]
        fresh = [Peer() for _ in range(max(0, n - len(free)))]
        for p in fresh:
            assert p.ok(60) == "started"
        pool.extend(fresh)
        new = (free + fresh)[:n]
        for p in new:
            p.peer_id = -1
            p.call("reset", master=master.address, group=group)
        taken.extend(new)
        return new

    yield make
    for p in taken:
        if p.proc.poll() is None:
            p.send("reset", master="127.0.0.1:1", group=0)  # closes the test's Communicator
    for p in taken:
        if p.proc.poll() is None:
            p.reply(30)


def join(peers: list[Peer], world: int) -> None:
    for p in peers:
        p.send("join", world=world)
    for p in peers:
        p.peer_id = p.ok(60)["peer_id"]


def update(peers: list[Peer]) -> list[int]:
    """update_topology on every peer at once (it is a vote of all of them)."""
    for p in peers:
        p.send("update")
    return [int(p.ok(60)) for p in peers]


def sync_all(peers: list[Peer], **fields: Any) -> list[dict[str, Any]]:
    """Start the sync on every peer (in list order), then collect the raw replies."""
    for p in peers:
        p.send("sync", **fields)
    return [p.reply(60) for p in peers]


def results(replies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    assert all(r["ok"] for r in replies), replies
    return [r["result"] for r in replies]


def reference_signature(digests_source: dict[str, bytes]) -> tuple[bytes, ...]:
    """The election's tie-break key, computed here from raw bytes with xxhash directly."""
    import xxhash

    return tuple(xxhash.xxh3_128(digests_source[k]).digest() for k in sorted(digests_source))


def raw_entries(spec: dict[str, tuple[str, list[int]]], seed: int) -> dict[str, bytes]:
    from pccl.shared_state import byte_view

    return {k: bytes(byte_view(make_tensor(d, s, seed))) for k, (d, s) in spec.items()}


# ----------------------------------------------------------------------------- scenarios


@pytest.mark.timeout(120)
def test_fresh_peer_dirty_keys_zero_bytes_late_joiner(master: Any, spawn: Any) -> None:
    a, b, c = peers = spawn(master, 3)
    join(peers, 3)
    for p in peers:
        p.call("state", spec=SPEC, seed=1, revision=13)
    c.call("fill", key="b", seed=99)  # c differs only in "b"
    ra, rb, rc = results(sync_all(peers))  # first sync of the group at revision 13: accepted
    assert ra["revision"] == rb["revision"] == rc["revision"] == 13
    assert ra["rx"] == rb["rx"] == 0
    assert rc["rx"] == nbytes(SPEC, "b") and ra["tx"] + rb["tx"] == nbytes(SPEC, "b") and rc["tx"] == 0
    assert ra["digests"] == rb["digests"] == rc["digests"]

    for step in range(20):  # identical updates: nothing moves
        for p in peers:
            p.call("step", seed=1000 + step)
        out = results(sync_all(peers, revision=14 + step))
        assert all(r["rx"] == 0 and r["tx"] == 0 and r["revision"] == 14 + step for r in out)
        assert out[0]["digests"] == out[1]["digests"] == out[2]["digests"]
    final = out[0]["digests"]

    (d,) = spawn(master, 1)  # late joiner, fresh state at revision 0
    d.call("state", spec=SPEC, seed=None, revision=0)
    join([a, b, c, d], 4)
    for p in (a, b, c):
        p.send("sync", revision=34)
    d.send("sync")  # outdated: keeps revision 0 and is brought up to date
    out = [p.ok(60) for p in (a, b, c, d)]
    assert out[3]["rx"] == TOTAL and out[3]["revision"] == 34
    assert sum(r["tx"] for r in out[:3]) == TOTAL
    assert all(r["digests"] == final for r in out[:3])
    assert out[3]["digests"] == final  # bit for bit

    c.call("close")  # membership change between syncs
    assert update([a, b, d]) == [3, 3, 3]
    out = results(sync_all([a, b, d], revision=35))
    assert all(r["rx"] == 0 and r["revision"] == 35 and r["digests"] == final for r in out)


@pytest.mark.timeout(120)
def test_popular_content_wins_in_any_order_and_ties_are_stable(master: Any, spawn: Any) -> None:
    peers = spawn(master, 3)
    join(peers, 3)
    a, b, c = peers
    for p, seed in zip(peers, (1, 1, 2)):
        p.call("state", spec=SPEC, seed=seed, revision=1)
    out = results(sync_all([c, a, b]))  # the minority reports first
    assert {r["rx"] for r in out[1:]} == {0} and out[0]["rx"] == TOTAL
    assert out[0]["digests"] == out[1]["digests"] == a.call("info")["digests"]

    # Three-way tie: the smallest signature (hashes in key order) wins, whatever the order.
    seeds = {a: 5, b: 6, c: 7}
    sigs = {p: reference_signature(raw_entries(SPEC, s)) for p, s in seeds.items()}
    winner = min(sigs, key=lambda p: sigs[p])
    for revision, order in ((2, [a, b, c]), (3, [c, b, a])):
        for p, s in seeds.items():
            for key in SPEC:
                p.call("fill", key=key, seed=s)
        expected = winner.call("info")["digests"]
        out = results(sync_all(order, revision=revision))
        assert all(r["digests"] == expected for r in out)
        assert winner_rx(out, order, winner) == 0


def winner_rx(out: list[dict[str, Any]], order: list[Peer], winner: Peer) -> int:
    return int(out[order.index(winner)]["rx"])


@pytest.mark.timeout(120)
def test_groups_are_isolated(master: Any, spawn: Any) -> None:
    g0 = spawn(master, 2, group=0)
    g1 = spawn(master, 2, group=1)
    join(g0 + g1, 4)
    for p in g0:
        p.call("state", spec=SPEC, seed=1, revision=3)
    for p in g1:
        p.call("state", spec=SPEC, seed=2, revision=40)
    out = results(sync_all(g0 + g1))
    assert all(r["rx"] == 0 and r["tx"] == 0 for r in out)
    assert [r["revision"] for r in out] == [3, 3, 40, 40]
    assert out[0]["digests"] == out[1]["digests"] != out[2]["digests"] == out[3]["digests"]
    # A stale peer of group 1 (behind on revision, different "w") is repaired from group 1.
    g1[1].call("fill", key="w", seed=77)
    g1[0].send("sync", revision=41)
    g1[1].send("sync")  # still at 40: outdated
    r0, r1 = g1[0].ok(), g1[1].ok()
    assert r1["rx"] == nbytes(SPEC, "w") and r0["tx"] == nbytes(SPEC, "w") and r1["revision"] == 41
    assert r0["digests"] == r1["digests"] == out[2]["digests"]
    assert [r["revision"] for r in results(sync_all(g0, revision=4))] == [4, 4]


@pytest.mark.timeout(120)
def test_mismatches_and_revision_violations_are_kicked_with_the_reason(master: Any, spawn: Any) -> None:
    a, b, c, d, e, f = peers = spawn(master, 6)
    join(peers, 6)
    for p in (a, b, c):
        p.call("state", spec=SPEC, seed=1, revision=1)
    d.call("state", spec={**SPEC, "b": ("float64", [300])}, seed=1, revision=1)
    e.call("state", spec={k: v for k, v in SPEC.items() if k != "step"}, seed=1, revision=1)
    f.call("state", spec={**SPEC, "w": ("float32", [96, 128])}, seed=1, revision=1)
    ra, rb, rc, rd, re_, rf = sync_all(peers)
    assert ra["ok"] and rb["ok"] and rc["ok"]
    assert not rd["ok"] and rd["error"] == "SharedStateError" and "'b'" in rd["message"] and "dtype" in rd["message"]
    assert not re_["ok"] and "'step'" in re_["message"] and "missing" in re_["message"]
    assert not rf["ok"] and "'w'" in rf["message"] and "shape" in rf["message"]
    kicks = master.status()["kicks"]
    assert {d.peer_id, e.peer_id, f.peer_id} <= {int(k) for k in kicks}

    # Revision must be exactly +1: c jumps to 4 and is kicked; a and b carry on at 2.
    update([a, b, c])  # the master already dropped the kicked peers
    a.send("sync", revision=2)
    b.send("sync", revision=2)
    c.send("sync", revision=4)
    ra, rb = results([a.reply(60), b.reply(60)])
    rc = c.reply(60)
    assert ra["revision"] == rb["revision"] == 2
    assert not rc["ok"] and rc["error"] == "SharedStateError" and "revision" in rc["message"]
    assert "4" in rc["message"] and "2" in rc["message"]


@pytest.mark.timeout(120)
def test_strategy_conflicts_and_send_receive_only(master: Any, spawn: Any) -> None:
    a, b, c = peers = spawn(master, 3)
    join(peers, 3)
    for p in peers:
        p.call("state", spec=SPEC, seed=1, revision=1)
    a.send("sync", strategy="ENFORCE_POPULAR")
    b.send("sync", strategy="ENFORCE_POPULAR")
    c.send("sync", strategy="SEND_ONLY")
    ra, rb, rc = (p.reply(60) for p in peers)
    assert ra["ok"] and rb["ok"]
    assert not rc["ok"] and rc["error"] == "SharedStateError" and "conflict" in rc["message"]
    update([a, b])
    # send_only + receive_only: the sender's content is taken even though it is not "popular".
    a.call("fill", key="w", seed=8)
    expected = a.call("info")["digests"]
    b.send("sync", revision=2, strategy="RECEIVE_ONLY")
    a.send("sync", revision=2, strategy="SEND_ONLY")
    rb, ra = b.ok(), a.ok()
    assert ra["rx"] == 0 and ra["tx"] == nbytes(SPEC, "w") and rb["tx"] == 0 and rb["rx"] == nbytes(SPEC, "w")
    assert ra["digests"] == rb["digests"] == expected


BIG = {"w": ("float32", [4096, 2048]), "b": ("float32", [1000])}  # 32 MiB + 4 KB


def first_distributor(distributors: list[int], everyone: list[int], requester: int, key: str) -> int:
    """The election's documented rotation: sorted distributors shifted by key index + requester rank."""
    keys = sorted(BIG)
    rank = sorted(everyone).index(requester)
    shift = (keys.index(key) + rank) % len(distributors)
    return sorted(distributors)[shift]


@pytest.mark.timeout(120)
def test_distributor_killed_mid_transfer_fails_over(master: Any, spawn: Any) -> None:
    a, b, c = peers = spawn(master, 3)
    join(peers, 3)
    for p in (a, b):
        p.call("state", spec=BIG, seed=3, revision=2)
    c.call("state", spec=BIG, seed=None, revision=0)
    first = first_distributor([a.peer_id, b.peer_id], [p.peer_id for p in peers], c.peer_id, "w")
    victim, survivor = (a, b) if first == a.peer_id else (b, a)
    victim.call("arm", bytes=8 << 20)  # dies after 8 MiB of the 32 MiB entry
    survivor.send("sync")
    victim.send("sync")
    c.send("sync")
    rs, rc = survivor.ok(60), c.ok(60)
    assert rc["revision"] == 2 and rc["digests"] == rs["digests"]
    # Everything arrived from the survivor, plus whatever the victim sent before dying.
    assert rc["rx"] >= nbytes(BIG, "w") + nbytes(BIG, "b")
    # The rotation gave "b" to the survivor from the start, and "w" after the fail-over.
    assert rs["tx"] == nbytes(BIG, "w") + nbytes(BIG, "b")
    with pytest.raises(AssertionError, match="exited"):
        victim.reply(10)


@pytest.mark.timeout(120)
def test_corrupt_distributor_is_detected_and_replaced(master: Any, spawn: Any) -> None:
    a, b, c = peers = spawn(master, 3)
    join(peers, 3)
    for p in (a, b):
        p.call("state", spec=BIG, seed=3, revision=2)
    c.call("state", spec=BIG, seed=None, revision=0)
    first = first_distributor([a.peer_id, b.peer_id], [p.peer_id for p in peers], c.peer_id, "w")
    liar, honest = (a, b) if first == a.peer_id else (b, a)
    liar.call("corrupt")
    out = dict(zip((a, b, c), results(sync_all(peers))))
    assert out[c]["digests"] == out[honest]["digests"] == out[liar]["digests"]
    assert out[c]["revision"] == 2
    assert out[honest]["tx"] >= nbytes(BIG, "w")  # "w" came from the honest peer in the end


@pytest.mark.timeout(120)
def test_only_distributor_corrupt_fails_the_round(master: Any, spawn: Any) -> None:
    liar, c = peers = spawn(master, 2)
    join(peers, 2)
    liar.call("state", spec=SPEC, seed=3, revision=2)
    c.call("state", spec=SPEC, seed=None, revision=0)
    liar.call("corrupt")
    rl, rc = sync_all(peers)
    assert not rc["ok"] and rc["error"] == "SharedStateError" and "wrong hash" in rc["message"], rc
    assert not rl["ok"] and rl["error"] == "SharedStateError", rl  # nobody reports success
    assert c.call("info")["revision"] == 0


@pytest.mark.timeout(120)
def test_only_distributor_killed_mid_transfer_no_silent_partial_state(master: Any, spawn: Any) -> None:
    a, b = peers = spawn(master, 2)
    join(peers, 2)
    a.call("state", spec=BIG, seed=3, revision=5)
    b.call("state", spec=BIG, seed=None, revision=0)
    a.call("arm", bytes=8 << 20)
    a.send("sync")
    b.send("sync")
    rb = b.reply(60)
    assert not rb["ok"] and rb["error"] in ("SharedStateError", "PeerLostError"), rb
    assert b.call("info")["revision"] == 0  # the failed sync adopted nothing


@pytest.mark.timeout(120)
def test_checkpoint_resume_after_master_restart(spawn: Any, tmp_path: Path) -> None:
    from pccl.master import Master

    path = str(tmp_path / "state.pccl")
    with Master("127.0.0.1", 0) as m1:
        a, b = peers = spawn(m1, 2)
        join(peers, 2)
        for p in peers:
            p.call("state", spec=SPEC, seed=4, revision=5)
        saved = results(sync_all(peers))[0]["digests"]
        a.call("save", path=path)
    with Master("127.0.0.1", 0) as m2:  # a new run: fresh Communicators, fresh tensors
        for p in peers:
            p.call("reset", master=m2.address, group=0)
            p.call("state", spec=SPEC, seed=None, revision=0)
        loaded = a.call("load", path=path)
        assert loaded == {"revision": 5, "digests": saved}
        join(peers, 2)
        a.send("sync", revision=6)
        b.send("sync")  # fresh peer: outdated, receives everything
        out = [a.ok(), b.ok()]
        assert out[1]["rx"] == TOTAL and out[0]["rx"] == 0
        assert out[0]["digests"] == out[1]["digests"] == saved and out[1]["revision"] == 6


@pytest.mark.timeout(120)
def test_group_that_lost_every_synced_peer_lets_newcomers_resume_at_any_revision(
    master: Any, spawn: Any
) -> None:
    a, b = spawn(master, 2)
    a.call("state", spec=SPEC, seed=1, revision=5)
    join([a], 1)
    assert results(sync_all([a]))[0]["revision"] == 5
    own = b.call("state", spec=SPEC, seed=2, revision=2)  # resumes from an older checkpoint
    join([a, b], 2)  # b is accepted while a holds revision 5 ...
    a.kill()  # ... and a dies before b ever synced: nobody holds revision 5 any more
    (rb,) = results(sync_all([b]))
    assert rb["revision"] == 2 and rb["rx"] == 0 and rb["digests"] == own
    # The group empties (b leaves) and b joins again as a newcomer from a later checkpoint.
    b.call("reset", master=master.address, group=0)
    own = b.call("state", spec=SPEC, seed=3, revision=100)
    join([b], 1)
    (rb,) = results(sync_all([b]))
    assert rb["revision"] == 100 and rb["rx"] == 0 and rb["digests"] == own
    assert not master.status()["kicks"]

