"""Helpers for pccl integration tests: peers in their own processes, driven over pipes.

``spawn_peer(master_address, group=0, ...)`` starts ``membership_peer.py`` in a new
process and returns a :class:`PeerProcess`; every process is killed at the end of
the test, whatever happened.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

PEER_SCRIPT = Path(__file__).with_name("membership_peer.py")
REPO_ROOT = Path(__file__).resolve().parents[2]


class PeerProcess:
    """One peer process; :meth:`call` sends a command and waits for its JSON reply."""

    def __init__(self, args: list[str], script: Path = PEER_SCRIPT) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=env, cwd=str(REPO_ROOT),
        )
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        # Not waited for here: several peers start (import, connect their pipes) in parallel.
        self._started = False

    def _ensure_started(self) -> None:
        if not self._started:
            self._started = True
            started = self.reply(60)
            assert started == {"ok": True, "result": "started"}, started

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._replies.put(json.loads(line))
        self._replies.put(None)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def send(self, cmd: str, **fields: Any) -> None:
        """Send a command without waiting for its reply (once the process is up)."""
        self._ensure_started()
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
        self.proc.stdin.flush()

    def reply(self, timeout: float) -> dict[str, Any]:
        """The next reply; fails the test if none comes within ``timeout`` seconds."""
        try:
            reply = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"peer {self.proc.pid} did not answer within {timeout} s\n{self.stderr}") from None
        if reply is None:
            raise AssertionError(f"peer {self.proc.pid} exited (rc={self.proc.poll()})\n{self.stderr}")
        return reply

    def call(self, cmd: str, timeout: float = 20.0, **fields: Any) -> Any:
        """Run a command that must succeed; its result."""
        self.send(cmd, **fields)
        reply = self.reply(timeout)
        assert reply["ok"], f"{cmd} failed: {reply}\n{self.stderr}"
        return reply["result"]

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def kill(self) -> None:
        """Kill the process (also when stopped) and release its pipes."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)
        for reader in self._readers:
            reader.join(10)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except BrokenPipeError:
                    pass  # unread input of a killed process


@pytest.fixture
def spawn_peer() -> Iterator[Callable[..., PeerProcess]]:
    """Factory of peer processes; all are killed when the test ends."""
    procs: list[PeerProcess] = []

    def spawn(master: str, group: int = 0, secret: str | None = None, advertise_host: str | None = None) -> PeerProcess:
        args = [master, "--group", str(group)]
        if secret is not None:
            args += ["--secret", secret]
        if advertise_host is not None:
            args += ["--advertise-host", advertise_host]
        peer = PeerProcess(args)
        procs.append(peer)
        return peer

    yield spawn
    for peer in procs:
        peer.kill()


def _wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def wait_for() -> Callable[[Callable[[], Any], float, str], Any]:
    """``wait_for(predicate, timeout, what)``: poll until ``predicate()`` is truthy (a state, not a sleep)."""
    return _wait_for
