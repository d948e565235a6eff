"""A raw pccl client for fuzzing a master's or a peer's port, written from ``docs/protocol.md``.

:class:`RawClient` speaks the wire format with plain blocking sockets, ``struct`` and
``msgpack`` (not the library's transport), so it can say anything, valid or not: a correct
handshake (§1, no secret) followed by whatever frames or bytes a test wants, oversized
length fields, messages that are wrong for the state, or nothing at all (a half-open
connection). :func:`drain` reads what the other side sends until it closes, which is how a
fuzz test learns that an offender was dropped.

Around the fuzzer: :func:`launch_master` runs ``pccl master`` in a process of its own (so its
file descriptors and memory can be read from ``/proc``), and :class:`ReducingPair` is two
correct peers that keep all-reducing, every result checked, while the fuzzer does its worst.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import torch

import pccl
from stress import chaos_values as V
from transport.frame import PROTOCOL_VERSION

REPO = Path(__file__).resolve().parents[1]
#: The frame header (§2): magic, version, type, flags, reserved, tag, seq, offset, total, length.
HEADER = struct.Struct("<2sBBHHQQQQQ")
HELLO, CHALLENGE, AUTH, ACCEPT, REJECT, CONTROL, DATA, HEARTBEAT, CLOSE, ABORT_TAG = range(1, 11)


def frame(frame_type: int, payload: bytes = b"", *, version: int = PROTOCOL_VERSION, flags: int = 0, reserved: int = 0,
          tag: int = 0, seq: int = 0, offset: int = 0, total: int = 0, length: int | None = None) -> bytes:
    """One frame; ``length`` may lie about the payload (an oversized or short length field)."""
    n = len(payload) if length is None else length
    return HEADER.pack(b"PC", version, frame_type, flags, reserved, tag, seq, offset, total, n) + payload


def control(name: str, fields: dict[str, Any]) -> bytes:
    """A CONTROL frame carrying message ``name`` (§3: msgpack ``[name, fields]``)."""
    return frame(CONTROL, msgpack.packb([name, fields], use_bin_type=True))


@dataclass
class Drained:
    """What the other side sent before it closed (or before the timeout)."""

    frames: list[tuple[int, bytes]]
    closed: bool

    def messages(self) -> list[tuple[str, dict[str, Any]]]:
        """The decodable CONTROL messages among the frames."""
        out = []
        for frame_type, payload in self.frames:
            if frame_type == CONTROL:
                try:
                    name, fields = msgpack.unpackb(payload, raw=False)
                except (ValueError, TypeError, msgpack.UnpackException):
                    continue
                out.append((name, fields))
        return out


class RawClient:
    """A blocking TCP client that writes whatever it is given."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()

    def send(self, data: bytes) -> None:
        """Write ``data``; a peer that already closed is not an error here (it is what fuzzing expects)."""
        try:
            self.sock.sendall(data)
        except OSError:
            pass

    def handshake(self, role: str = "peer", peer_id: int | str | None = "fuzz", link_id: int | None = None,
                  index: int = 0, pool_size: int = 1) -> dict[str, Any]:
        """Complete §1 without a secret; the server's CHALLENGE fields.

        Raises:
            ConnectionError: the server refused or closed.
        """
        hello: dict[str, Any] = {"version": PROTOCOL_VERSION, "role": role, "peer_id": peer_id,
                                 "nonce": os.urandom(32), "auth": False}
        if link_id is not None:
            hello.update(link_id=link_id, index=index, pool_size=pool_size)
        self.send(frame(HELLO, msgpack.packb(["transport.hello", hello], use_bin_type=True)))
        got = self.recv_frame()
        if got is None or got[0] != CHALLENGE:
            raise ConnectionError(f"expected CHALLENGE, got {got!r}")
        _, challenge = msgpack.unpackb(got[1], raw=False)
        self.send(frame(AUTH, msgpack.packb(["transport.auth", {"proof": b""}], use_bin_type=True)))
        got = self.recv_frame()
        if got is None or got[0] != ACCEPT:
            raise ConnectionError(f"expected ACCEPT, got {got!r}")
        return dict(challenge)

    def _fill(self, n: int) -> bool:
        while len(self._buf) < n:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                return False
            if not chunk:
                return False
            self._buf += chunk
        return True

    def recv_frame(self) -> tuple[int, bytes] | None:
        """The next frame (type, payload), or None once the server closed."""
        if not self._fill(HEADER.size):
            return None
        *_, frame_type, _flags, _res, _tag, _seq, _off, _total, length = HEADER.unpack_from(self._buf)
        if not self._fill(HEADER.size + length):
            return None
        payload = bytes(self._buf[HEADER.size : HEADER.size + length])
        del self._buf[: HEADER.size + length]
        return frame_type, payload

    def close(self) -> None:
        self.sock.close()


def drain(client: RawClient, timeout: float = 5.0, *, half_close: bool = True) -> Drained:
    """Read frames until the other side closes or ``timeout`` passes; closes the client.

    With ``half_close`` our side signals the end of its input first (FIN), so a server
    waiting for the rest of a frame learns there is none.
    """
    if half_close:
        try:
            client.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    deadline = time.monotonic() + timeout
    frames: list[tuple[int, bytes]] = []
    closed = False
    while time.monotonic() < deadline:
        client.sock.settimeout(max(0.01, deadline - time.monotonic()))
        got = client.recv_frame()
        if got is None:
            closed = time.monotonic() < deadline
            break
        frames.append(got)
    client.close()
    return Drained(frames, closed)


# -- the run around a fuzzer: a master process and peers that must keep working -----------


def launch_master(log_path: Path, heartbeat_timeout: float = 2.0, env: dict[str, str] | None = None,
                  timeout: float = 60.0) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``pccl master`` on 127.0.0.1 (a free port), logging to ``log_path``; (process, "host:port").

    Raises:
        RuntimeError: it exited or did not report its port within ``timeout`` seconds.
    """
    log_file = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pccl.cli", "master", "--host", "127.0.0.1", "--port", "0",
         "--heartbeat-timeout", str(heartbeat_timeout)],
        stdout=subprocess.DEVNULL, stderr=log_file, env=env or dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO,
    )
    log_file.close()  # the child holds its own copy
    deadline = time.monotonic() + timeout
    while True:
        m = re.search(r"listening host=\S+ port=(\d+)", log_path.read_text(errors="replace"))
        if m:
            return proc, f"127.0.0.1:{m.group(1)}"
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the master did not start:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.02)


class ReducingPair:
    """Two in-process peers all-reducing in lockstep, each result checked exactly.

    ``start()`` connects both and starts one thread per peer; every step each peer
    reduces its :func:`stress.chaos_values.contribution` and checks the result with
    :func:`stress.chaos_values.check_exact`. ``steps[i]`` counts peer ``i``'s good
    steps, ``failures`` records anything else (an error or a wrong value).
    """

    def __init__(self, master: str, *, p2p_ports: tuple[int, int] = (0, 0), group: int = 0) -> None:
        self.comms = [pccl.Communicator(master, peer_group=group, connections=2, p2p_port=port)
                      for port in p2p_ports]
        self.steps = [0, 0]
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        first, second = self.comms
        first.connect(timeout=30)
        joiner = threading.Thread(target=second.connect, kwargs={"timeout": 30})
        joiner.start()
        while first.are_peers_pending() is False:  # a vote; answered once the second registered
            time.sleep(0.01)
        first.update_topology()
        joiner.join(30)
        assert second.world_size == 2, "the second peer was not accepted"
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(2)]
        for thread in self._threads:
            thread.start()

    def _loop(self, i: int) -> None:
        comm, spec = self.comms[i], V.TensorSpec("float64", 4099)
        me, step = comm.peer_id, 0
        while not self._stop.is_set():
            step += 1
            x = torch.from_numpy(V.contribution(spec, me, step, 0))
            try:
                comm.all_reduce(x)
            except Exception as exc:  # any error is a failure, unless the pair is being closed
                if not self._stop.is_set():
                    self.failures.append(f"peer {me} step {step}: {type(exc).__name__}: {exc}")
                return
            verdict = V.check_exact(spec, x.numpy(), step, 0, me)
            if verdict.error or len(verdict.participants) != 2:
                self.failures.append(f"peer {me} step {step}: {verdict}")
                return
            self.steps[i] += 1

    def progress(self, more: int, timeout: float = 15.0) -> None:
        """Wait until both peers completed ``more`` further good steps.

        Raises:
            AssertionError: a failure was recorded, or the steps did not come in time.
        """
        target = [s + more for s in self.steps]
        deadline = time.monotonic() + timeout
        while any(s < t for s, t in zip(self.steps, target)):
            assert not self.failures, self.failures
            assert time.monotonic() < deadline, f"no progress: {self.steps} of {target}"
            time.sleep(0.01)
        assert not self.failures, self.failures

    def close(self) -> None:
        self._stop.set()
        for comm in self.comms:
            comm.close()
        for thread in self._threads:
            thread.join(20)


def free_port() -> int:
    """A port nothing listens on right now (bound, read and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_fds(pid: int | str = "self") -> int:
    """Open file descriptors of a process (Linux /proc)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_rss_mib(pid: int | str = "self") -> float:
    """Resident memory of a process in MiB (Linux /proc)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
