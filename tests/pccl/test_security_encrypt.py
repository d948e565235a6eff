"""``encrypt=True``: a whole run over AES-GCM (docs/protocol.md §2.1, docs/security.md).

In-process peers (each Communicator on its own loop thread) over 127.0.0.1; results
are checked against float64 numpy references, not against the library.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch

from collective_helpers import check_result
from pccl import ReduceOp, master_cli
from pccl.communicator import Communicator
from pccl.errors import AuthenticationError, InvalidUsageError
from pccl.master import Master
from pccl.shared_state import SharedState, SyncStrategy

SECRET = "encrypt me"
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def master() -> Iterator[Master]:
    with Master("127.0.0.1", 0, secret=SECRET, heartbeat_timeout=5.0, encrypt=True) as m:
        yield m


@pytest.fixture
def make_comm() -> Iterator[Callable[..., Communicator]]:
    comms: list[Communicator] = []

    def make(address: str, **kwargs: Any) -> Communicator:
        options: dict[str, Any] = {"secret": SECRET, "encrypt": True, "connections": 2}
        comm = Communicator(address, **(options | kwargs))
        comms.append(comm)
        return comm

    yield make
    for comm in comms:
        comm.close()


def parallel(*calls: Callable[[], Any], timeout: float = 60) -> list[Any]:
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return [f.result(timeout) for f in [pool.submit(c) for c in calls]]


def join(master: Master, comms: list[Communicator], already: int = 0) -> None:
    """Connect ``comms[already:]`` and vote them in (the accepted ones vote)."""
    if already == 0:
        comms[0].connect(timeout=20)
        already = 1
    newcomers = comms[already:]

    def vote() -> None:
        while len(master.status()["pending"]) < len(newcomers):
            threading.Event().wait(0.01)
        parallel(*(c.update_topology for c in comms[:already]))

    parallel(*(lambda c=c: c.connect(timeout=20) for c in newcomers), vote)


def all_encrypted(comm: Communicator) -> bool:
    session = comm._session  # noqa: SLF001 - look at the sockets under the API
    assert session is not None and session.conn is not None
    links = list(session.links.outbound.values()) + list(session.links.inbound.values())
    return session.conn.encrypted and all(c.encrypted for link in links for c in link.connections)


@pytest.mark.timeout(90)
def test_encrypted_all_reduce_in_worlds_of_two_and_three(
    master: Master, make_comm: Callable[..., Communicator]
) -> None:
    comms = [make_comm(master.address) for _ in range(3)]
    join(master, comms[:2])
    for world in (2, 3):
        if world == 3:
            join(master, comms, already=2)
        assert all(c.world_size == world and all_encrypted(c) for c in comms[:world])
        for dtype, numel, op in [(torch.float32, 300_001, "sum"), (torch.float64, 70_000, "avg"),
                                 (torch.int32, 1 << 19, "sum")]:
            gen = [torch.Generator().manual_seed(100 * world + i) for i in range(world)]
            if dtype.is_floating_point:
                xs = [(torch.rand(numel, generator=g, dtype=torch.float64) * 8 - 4).to(dtype) for g in gen]
            else:
                xs = [torch.randint(-(1 << 20), 1 << 20, (numel,), generator=g, dtype=dtype) for g in gen]
            outs = [x.clone() for x in xs]
            reduce_op = {"sum": ReduceOp.SUM, "avg": ReduceOp.AVG}[op]
            infos = parallel(*(lambda c=c, t=t: c.all_reduce(t, op=reduce_op)
                               for c, t in zip(comms[:world], outs)))
            assert all(i.world_size == world and i.tx_bytes > 0 for i in infos)
            for got in outs:
                check_result(op, dtype, xs, got)  # float64 / exact reference
            assert all(torch.equal(outs[0], o) for o in outs[1:])  # bit-identical everywhere


@pytest.mark.timeout(90)
def test_encrypted_shared_state_sync_repairs_the_odd_peer(
    master: Master, make_comm: Callable[..., Communicator]
) -> None:
    comms = [make_comm(master.address) for _ in range(3)]
    join(master, comms)
    popular = torch.randn(300_000, generator=torch.Generator().manual_seed(5))
    tensors = [popular.clone(), popular.clone(), torch.zeros(300_000)]
    states = [SharedState({"w": t, "step": torch.tensor([7])}, revision=4) for t in tensors]
    infos = parallel(*(lambda c=c, s=s: c.sync_shared_state(s, SyncStrategy.ENFORCE_POPULAR)
                       for c, s in zip(comms, states)))
    assert [i.revision for i in infos] == [4, 4, 4]
    for t in tensors:
        assert np.array_equal(t.numpy(), popular.numpy())
    assert infos[2].rx_bytes >= popular.numel() * 4 and infos[0].tx_bytes + infos[1].tx_bytes >= infos[2].rx_bytes
    assert all(all_encrypted(c) for c in comms)


def test_peer_and_master_must_agree_on_encryption(master: Master, make_comm: Callable[..., Communicator]) -> None:
    with pytest.raises(AuthenticationError, match="connect with encrypt=True"):
        make_comm(master.address, encrypt=False).connect(timeout=10)
    with Master("127.0.0.1", 0, secret=SECRET) as plain:
        with pytest.raises(AuthenticationError, match="does not encrypt"):
            make_comm(plain.address).connect(timeout=10)
        ok = make_comm(plain.address, encrypt=False)
        ok.connect(timeout=10)
        assert ok.world_size == 1


def test_encrypt_needs_a_secret_and_one_source_of_it(tmp_path: Path) -> None:
    with pytest.raises(InvalidUsageError, match="encrypt=True needs a shared secret"):
        Communicator("127.0.0.1:48148", encrypt=True)
    with pytest.raises(InvalidUsageError, match="encrypt=True needs a shared secret"):
        Master("127.0.0.1", 0, encrypt=True)
    path = tmp_path / "secret"
    path.write_bytes(b"x\n")
    with pytest.raises(InvalidUsageError, match="not both"):
        Communicator("127.0.0.1:48148", secret="x", secret_file=path)
    with pytest.raises(InvalidUsageError, match="cannot read the secret file"):
        Master("127.0.0.1", 0, secret_file=tmp_path / "missing")
    (tmp_path / "empty").write_bytes(b"\n")
    with pytest.raises(InvalidUsageError, match="is empty"):
        Communicator("127.0.0.1:48148", secret_file=tmp_path / "empty", encrypt=True)


def test_secret_files_warn_unless_private(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                          make_comm: Callable[..., Communicator]) -> None:
    path = tmp_path / "secret"
    path.write_bytes(SECRET.encode() + b"\n")
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="pccl.master"):
        with Master("127.0.0.1", 0, secret_file=path, encrypt=True) as m:
            comm = make_comm(m.address, secret=None, secret_file=str(path))
            comm.connect(timeout=10)
            assert all_encrypted(comm)
        assert not [r for r in caplog.records if "secret file" in r.getMessage()]
        path.chmod(0o644)
        Communicator("127.0.0.1:48148", secret_file=path)
    warned = [r.getMessage() for r in caplog.records if "secret file" in r.getMessage()]
    assert len(warned) == 1 and "chmod 600" in warned[0] and "644" in warned[0]


def test_master_cli_refuses_encrypt_without_a_secret_file(caplog: pytest.LogCaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    master_cli.add_arguments(parser)
    with caplog.at_level(logging.ERROR, logger="pccl.master"):
        assert master_cli.run(parser.parse_args(["--port", "0", "--encrypt"])) == 1
    assert any("--encrypt needs --secret-file" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(60)
def test_master_cli_encrypts_for_encrypting_peers_only(tmp_path: Path, make_comm: Callable[..., Communicator]) -> None:
    path = tmp_path / "secret"
    path.write_bytes(SECRET.encode())
    path.chmod(0o600)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pccl.cli", "master", "--host", "127.0.0.1", "--port", "0",
         "--secret-file", str(path), "--encrypt"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=str(REPO_ROOT),
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
    )
    try:
        assert proc.stderr is not None
        port = 0
        deadline = time.monotonic() + 30
        while not port and time.monotonic() < deadline:
            found = re.search(r"listening host=\S+ port=(\d+)", proc.stderr.readline())
            port = int(found.group(1)) if found else 0
        assert port, "the master did not start"
        comm = make_comm(f"127.0.0.1:{port}")
        comm.connect(timeout=10)
        assert all_encrypted(comm)
        with pytest.raises(AuthenticationError, match="encrypt"):
            make_comm(f"127.0.0.1:{port}", encrypt=False).connect(timeout=10)
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
    assert proc.returncode == 0


def test_bench_pairs_each_encrypted_row_with_its_plain_twin() -> None:
    from pccl.bench.allreduce import encrypt_rows

    rows = [
        {"impl": "gloo", "world": 2, "mib": 1, "seconds": 0.4},
        {"impl": "pccl-cubic", "world": 2, "mib": 1, "seconds": 0.2, "encrypt": False},
        {"impl": "pccl-cubic-enc", "world": 2, "mib": 1, "seconds": 0.3, "encrypt": True},
        {"impl": "pccl-cubic-enc-uint8", "world": 2, "mib": 1, "seconds": 0.1, "encrypt": True},
        {"impl": "pccl-cubic-uint8", "world": 2, "mib": 1, "seconds": 0.08, "encrypt": False},
        {"impl": "pccl-cubic-enc", "world": 3, "mib": 1, "seconds": 0.5, "encrypt": True},  # no plain twin
    ]
    got = {(r["impl"], r["world"]): r["overhead"] for r in encrypt_rows(rows)}
    assert got == pytest.approx({("pccl-cubic", 2): 1.5, ("pccl-cubic-uint8", 2): 1.25})


@pytest.mark.timeout(150)
def test_bench_allreduce_encrypt_times_both_in_one_run(tmp_path: Path) -> None:
    import json

    out = tmp_path / "enc.json"
    cmd = [sys.executable, "-m", "pccl.cli", "bench", "allreduce", "--world", "2", "--sizes-mib", "1",
           "--iters", "1", "--encrypt", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=140)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {r["impl"]: r for r in data["rows"]}
    assert {k: r["encrypt"] for k, r in rows.items()} == {"pccl-cubic": False, "pccl-cubic-enc": True}
    assert rows["pccl-cubic"]["tx_bytes"] == rows["pccl-cubic-enc"]["tx_bytes"] == 1 << 20  # payload bytes
    [overhead] = data["encrypt_overhead"]
    assert overhead["overhead"] == pytest.approx(rows["pccl-cubic-enc"]["seconds"] / rows["pccl-cubic"]["seconds"])
    assert data["aes_gcm"]["aes_gcm_encrypt_gbps"] > 0.1 and data["aes_gcm"]["aes_gcm_decrypt_gbps"] > 0.1
    assert "encrypted / plain" in proc.stdout and "AES-256-GCM on 1 MiB" in proc.stdout
