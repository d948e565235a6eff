"""The Communicator's collectives across real peer processes on 127.0.0.1.

One master and three peer groups of 2, 3 and 4 peers stay up for the whole module (warm
processes keep it fast); the groups run side by side. Every result is compared with a
reference computed here (exact Python integers, float64 numpy) from inputs rebuilt here,
and every peer's result bytes are compared by hash.
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from collectives.schedule import chunk_bounds
from collective_helpers import (
    DTYPES,
    check_result,
    inputs,
    kill_all,
    quantized_bound,
    start_groups,
)
from collective_peer import digest
from pccl.master import Master

HB = 5.0
WORLDS = {2: 0, 3: 1, 4: 2}  # world size -> peer group
OPS = ["sum", "avg", "prod", "max", "min"]
SIZES = [0, 1, 5, 1003]  # 1003 is divisible by none of 2, 3, 4: chunks of unequal length
# Big enough for several 4 MiB pieces per chunk, so the pipeline really overlaps.
BIG = [("sum", "float32", 4_500_001), ("avg", "bfloat16", 4_500_001), ("max", "int64", 4_500_001)]


class Run:
    def __init__(self, master: Master, groups: dict[int, list[Any]]) -> None:
        self.master = master
        self.groups = groups

    def peers(self, world: int) -> list[Any]:
        return self.groups[WORLDS[world]]

    def ids(self, world: int) -> list[int]:
        return [p.peer_id for p in self.peers(world)]


@pytest.fixture(scope="module")
def run() -> Iterator[Run]:
    with Master("127.0.0.1", 0, heartbeat_timeout=HB) as master:
        groups = start_groups(master, {g: w for w, g in WORLDS.items()})
        try:
            yield Run(master, groups)
        finally:
            kill_all([p for peers in groups.values() for p in peers])


def call_all(peers: list[Any], cmd: str, timeout: float = 60, **fields: Any) -> list[Any]:
    """Send ``cmd`` to every peer at once; their results (each must succeed)."""
    for peer in peers:
        peer.send(cmd, **fields)
    replies = [peer.reply(timeout) for peer in peers]
    assert all(r["ok"] for r in replies), replies
    return [r["result"] for r in replies]


def run_cases(run: Run, world: int, cases: list[dict[str, Any]], dump: Path) -> tuple[list[Any], list[Any]]:
    """Run ``cases`` on every peer of the group; (per-peer replies, first peer's results)."""
    peers = run.peers(world)
    for i, peer in enumerate(peers):
        peer.send("cases", cases=cases, dump=str(dump) if i == 0 else None)
    replies = [peer.reply(120) for peer in peers]
    assert all(r["ok"] for r in replies), replies
    return [r["result"] for r in replies], torch.load(dump)


def check_identical(replies: list[list[dict[str, Any]]], world: int) -> None:
    for i, outcomes in enumerate(zip(*replies)):
        assert len({o["hash"] for o in outcomes}) == 1, f"case {i}: peers differ"
        assert all(o["info"][0] == world for o in outcomes), outcomes


@pytest.mark.timeout(120)
def test_every_op_dtype_and_awkward_size_matches_the_reference_on_worlds_2_to_4(run: Run, tmp_path: Path) -> None:
    cases = {
        world: [{"op": op, "dtype": d, "numel": n, "seed": 1000 * world + i, "out": i % 3 == 0}
                for i, (op, d, n) in enumerate((op, d, n) for op in OPS for d in DTYPES for n in SIZES)]
        + [{"op": op, "dtype": d, "numel": n, "seed": 7 + world} for op, d, n in BIG]
        for world in WORLDS
    }
    # The three groups run side by side, each on its own ring.
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = {w: pool.submit(run_cases, run, w, cases[w], tmp_path / f"w{w}.pt") for w in WORLDS}
        outcomes = {w: f.result() for w, f in futures.items()}
    for world, (replies, results) in outcomes.items():
        check_identical(replies, world)
        rank = ring_rank(run, world)
        for spec, got, outcome in zip(cases[world], results, replies[0]):
            check_result(spec["op"], DTYPES[spec["dtype"]], inputs(spec, run.ids(world)), got)
            if spec.get("out"):
                assert outcome["input_unchanged"], spec
            assert outcome["info"][1] == expected_tx(spec["numel"], world, rank, DTYPES[spec["dtype"]].itemsize)


def ring_rank(run: Run, world: int) -> int:
    """Ring position of the group's first peer."""
    return int(run.master.status()["rings"][WORLDS[world]].index(run.ids(world)[0]))


def expected_tx(numel: int, world: int, rank: int, itemsize: int) -> int:
    """Payload bytes a rank sends in an unquantized all-reduce: every chunk but its own in
    reduce-scatter, every chunk but the next rank's in all-gather (docs/protocol.md §7.2)."""
    lengths = [b - a for a, b in (chunk_bounds(numel, world, c) for c in range(world))]
    return (2 * sum(lengths) - lengths[rank] - lengths[(rank + 1) % world]) * itemsize


QUANTS = [[8, "min_max"], [8, "zero_point"], [4, "min_max"], [4, "zero_point"]]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_quantized_results_are_bit_identical_within_bound_and_smaller_on_the_wire(
    run: Run, world: int, tmp_path: Path
) -> None:
    cases = [{"op": op, "dtype": d, "numel": n, "seed": 50 + i, "quant": q}
             for i, (op, d, n, q) in enumerate(
                 (op, d, n, q) for op in ("sum", "avg") for d in ("float32", "bfloat16", "float64", "float16")
                 for n in (1, 1003) for q in QUANTS)]
    plain = [dict(c, quant=None) for c in cases if c["numel"] == 1003]
    replies, results = run_cases(run, world, cases + plain, tmp_path / "q.pt")
    check_identical(replies, world)
    plain_tx = {(c["op"], c["dtype"]): o["info"][1] for c, o in zip(plain, replies[0][len(cases):])}
    for spec, got, outcome in zip(cases, results, replies[0]):
        dtype = DTYPES[spec["dtype"]]
        xs = inputs(spec, run.ids(world))
        x64 = torch.stack([x.double() for x in xs])
        ref = x64.sum(0) / (world if spec["op"] == "avg" else 1)
        err = float((got.double() - ref).abs().max())
        bits, algorithm = spec["quant"]
        bound = quantized_bound(spec["op"], bits, algorithm, dtype, xs)
        assert err <= bound, (spec, err, bound)
        if spec["numel"] == 1003:
            assert err > 0.01 * bound  # it really was quantized
            ratio = outcome["info"][1] / plain_tx[(spec["op"], spec["dtype"])]
            # Codes of 8 or 4 bits instead of 16-64, plus 16 header bytes per piece.
            assert ratio < (bits + 1) / (8 * dtype.itemsize), (spec, ratio)


@pytest.mark.timeout(60)
def test_concurrent_async_reduces_with_different_ops_and_tag_reuse_refused(run: Run, tmp_path: Path) -> None:
    peers, ids = run.peers(3), run.ids(3)
    specs = [{"name": f"h{tag}", "tag": tag, "op": op, "dtype": d, "numel": n, "seed": 300 + tag}
             for tag, (op, d, n) in enumerate([("sum", "float32", 2_000_003), ("max", "int16", 1003),
                                               ("avg", "bfloat16", 700_001), ("prod", "float64", 1003),
                                               ("min", "uint32", 5)], start=11)]
    first, rest = peers[0], peers[1:]
    # The first peer starts everything alone: nothing can finish before the others join,
    # so its tags are certainly in flight when it reuses one.
    for spec in specs:
        assert first.call("start", **spec) == {"done": False}
    first.send("start", **dict(specs[0], name="again"))
    refused = first.reply(20)
    assert refused["error"] == "InvalidUsageError" and "tag 11 is already in flight" in refused["message"]
    for spec in specs:
        call_all(rest, "start", **spec)
    for spec in specs:
        outcomes = []
        for i, peer in enumerate(peers):
            dump = tmp_path / f"{spec['name']}.pt" if i == 0 else None
            outcomes.append(peer.call("wait", name=spec["name"], dump=str(dump) if dump else None, timeout=60))
        assert len({o["hash"] for o in outcomes}) == 1 and all(o["info"][0] == 3 for o in outcomes)
        check_result(spec["op"], DTYPES[spec["dtype"]], inputs(spec, ids), torch.load(tmp_path / f"{spec['name']}.pt")[0])


@pytest.mark.timeout(60)
def test_membership_vote_while_a_collective_is_in_flight_is_refused(run: Run) -> None:
    peers = run.peers(2)
    spec = {"name": "v", "tag": 5, "op": "sum", "dtype": "float32", "numel": 1000, "seed": 1}
    assert peers[0].call("start", **spec) == {"done": False}
    peers[0].send("update_topology")
    reply = peers[0].reply(20)
    assert reply["error"] == "InvalidUsageError" and "in flight" in reply["message"], reply
    peers[1].call("start", **spec)
    outcomes = [p.call("wait", name="v") for p in peers]
    assert outcomes[0]["hash"] == outcomes[1]["hash"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("key, other", [("numel", {"numel": 1001}), ("dtype", {"dtype": "float64"}),
                                         ("op", {"op": "max"}), ("quantization", {"quant": [8, "min_max"]})])
def test_descriptor_mismatch_fails_every_member_and_leaves_tensors_unchanged(
    run: Run, key: str, other: dict[str, Any]
) -> None:
    peers = run.peers(3)
    base = {"name": "m", "tag": 21, "op": "sum", "dtype": "float32", "numel": 1000, "seed": 9}
    for i, peer in enumerate(peers):
        peer.send("reduce", **(dict(base, **other) if i == 1 else base))
    replies = [p.reply(20)["result"] for p in peers]
    assert all(r["error"] == "InvalidUsageError" and f"disagree on {key!r}" in r["message"] for r in replies), replies
    assert all(r["input_unchanged"] for r in replies)


@pytest.mark.timeout(60)
def test_multiple_with_retry_reduces_everything_without_failures(run: Run, tmp_path: Path) -> None:
    peers, ids = run.peers(4), run.ids(4)
    specs = [{"dtype": "float32", "numel": n, "seed": 400 + i} for i, n in enumerate([1, 0, 300_001, 7, 1003, 2])]
    for i, peer in enumerate(peers):
        peer.send("multi", specs=specs, op="avg", max_in_flight=3, dump=str(tmp_path / "m.pt") if i == 0 else None)
    replies = [p.reply(60)["result"] for p in peers]
    assert len({tuple(r["hashes"]) for r in replies}) == 1
    info, rank = replies[0]["info"], ring_rank(run, 4)
    assert info[0] == 4
    assert info[1] == sum(expected_tx(spec["numel"], 4, rank, 4) for spec in specs)
    for spec, got in zip(specs, torch.load(tmp_path / "m.pt")):
        check_result("avg", torch.float32, inputs(spec, ids), got)


@pytest.mark.timeout(60)
def test_all_gather_broadcast_and_reduce_scatter(run: Run, tmp_path: Path) -> None:
    peers, ids = run.peers(3), run.ids(3)
    ring = run.master.status()["rings"][WORLDS[3]]
    spec = {"dtype": "bfloat16", "numel": 1003, "seed": 77, "tag": 3}
    gathered = call_all(peers, "gather", **spec)
    expected = [digest(x) for x in inputs(spec, ring)]  # ring order
    assert gathered == [expected] * 3
    root = ring[1]
    outs = call_all(peers, "broadcast", **dict(spec, root=root))
    assert {o["hash"] for o in outs} == {digest(inputs(spec, [root])[0])}
    spec = {"dtype": "int32", "numel": 1003, "seed": 78, "op": "sum"}
    full = inputs(spec, ids)
    for peer in peers:
        rank = ring.index(peer.peer_id)
        a, b = chunk_bounds(1003, 3, rank)
        peer.send("reduce_scatter", **dict(spec, out_numel=b - a, dump=str(tmp_path / f"rs{rank}.pt")))
    assert all(p.reply(30)["ok"] for p in peers)
    for rank in range(3):
        a, b = chunk_bounds(1003, 3, rank)
        got = torch.load(tmp_path / f"rs{rank}.pt")[0]
        check_result("sum", torch.int32, [x[a:b] for x in full], got)
