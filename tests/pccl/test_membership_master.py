"""The ``pccl master`` command in its own process: logs, clean shutdown, and peers when it dies."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from pccl import protocol as P
from transport.connection import open_connection

REPO_ROOT = Path(__file__).resolve().parents[2]
HB = 2.0


class MasterProcess:
    """``python -m pccl.cli master`` on an ephemeral port; its log lines are collected."""

    def __init__(self, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pccl.cli", "master", "--host", "127.0.0.1", "--port", "0",
             "--heartbeat-timeout", str(HB), *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=str(REPO_ROOT),
            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        )
        self.lines: list[str] = []
        self._port = threading.Event()
        self.port = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        assert self._port.wait(30), f"the master did not start:\n{self.log}"

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            found = re.search(r"listening host=\S+ port=(\d+)", line)
            if found:
                self.port = int(found.group(1))
                self._port.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_log(self, pattern: str, timeout: float = 20, count: int = 1) -> str:
        """The ``count``-th log line matching ``pattern``, waiting for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in list(self.lines) if re.search(pattern, line)]
            if len(found) >= count:
                return found[count - 1]
            time.sleep(0.01)
        raise AssertionError(f"no log line matching {pattern!r}:\n{self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@pytest.fixture
def master_process() -> Iterator[Callable[..., MasterProcess]]:
    started: list[MasterProcess] = []

    def start(*extra: str) -> MasterProcess:
        master = MasterProcess(*extra)
        started.append(master)
        return master

    yield start
    for master in started:
        master.stop()


def connect_two(master: MasterProcess, spawn_peer: Callable[..., Any]) -> tuple[Any, Any]:
    a, b = spawn_peer(master.address), spawn_peer(master.address)
    a.call("connect")
    b.send("connect")
    master.wait_log(r"join peer=2 ")
    a.call("update_topology")
    assert b.reply(20)["result"]["world_size"] == 2
    return a, b


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["sigkill", "sigstop"])
def test_master_gone_raises_master_connection_error(
    master_process: Callable[..., MasterProcess], spawn_peer: Callable[..., Any], how: signal.Signals
) -> None:
    master = master_process()
    a, b = connect_two(master, spawn_peer)
    a.send("update_topology")  # blocks: b does not vote
    master.wait_log(r"vote_open kind=\"update_topology\" peer=1", count=2)
    gone_at = time.time()
    master.proc.send_signal(how)
    reply = a.reply(HB + 10)
    assert reply["error"] == "MasterConnectionError", reply
    latency = reply["at"] - gone_at
    # A closed connection is seen at once; a silent master within the heartbeat timeout.
    assert latency < (1.0 if how == signal.SIGKILL else HB + 1.5), latency
    b.send("update_topology")
    later = b.reply(HB + 10)
    assert later["error"] == "MasterConnectionError", later


@pytest.mark.timeout(60)
def test_cli_logs_joins_accepts_kicks_and_votes_then_stops_cleanly(
    master_process: Callable[..., MasterProcess], spawn_peer: Callable[..., Any], tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    master = master_process("--secret-file", str(secret))
    a, b = spawn_peer(master.address, secret="s3cret"), spawn_peer(master.address, secret="s3cret")
    a.call("connect")
    b.send("connect")
    master.wait_log(r"join peer=2 ")
    a.call("update_topology")
    assert b.reply(20)["ok"]

    async def misbehave() -> Any:
        conn = await open_connection("127.0.0.1", master.port, role="peer", peer_id=None, secret=b"s3cret")
        await conn.send_message(P.Register(0, 9))
        assert isinstance(await conn.recv_message(), P.Welcome)
        await conn.send_message(P.Vote(P.UPDATE_TOPOLOGY))  # illegal: not accepted yet
        while True:
            msg = await conn.recv_message()
            if isinstance(msg, P.Kicked):
                conn.close()
                return msg

    kicked = asyncio.run(misbehave())
    assert "before its connect() completed" in kicked.reason
    master.wait_log(r"kick peer=3 reason=\".*before its connect\(\) completed")
    b.signal(signal.SIGKILL)
    master.wait_log(r"lost peer=2 ")
    master.proc.send_signal(signal.SIGTERM)
    assert master.proc.wait(15) == 0
    master._reader.join(10)
    log = master.log
    for pattern in (r"join peer=1 group=0", r"accept peer=2", r"vote_resolved kind=\"update_topology\"",
                    r"ring group=0 epoch=\d+ ring=\[1\]", r"signal SIGTERM", r"stopped"):
        assert re.search(pattern, log), (pattern, log)
