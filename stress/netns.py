"""Network namespaces a process makes for itself, and their teardown (root only).

The shared part of :mod:`stress.wan` (two namespaces and one emulated link) and
:mod:`stress.mesh` (a namespace per peer, a link per pair): set-up commands that
fail loudly, processes started inside the namespaces and stopped at teardown,
stale namespaces of dead owners removed, and SIGTERM/SIGHUP turned into
``SystemExit`` while namespaces are up so that the teardown runs then too.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
import time
from types import FrameType, TracebackType
from typing import Any, Callable, Mapping, Sequence

log = logging.getLogger(__name__)

_STOP_GRACE = 3.0


class NetnsError(RuntimeError):
    """Namespaces are unavailable here, or setting them up or tearing them down failed."""


def run_setup(cmd: Sequence[str]) -> str:
    """Run a set-up command; return its stdout.

    Raises:
        NetnsError: it failed to start or exited non-zero (its stderr is in the message).
    """
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, check=True)
    except subprocess.CalledProcessError as exc:
        raise NetnsError(f"`{' '.join(cmd)}` failed: {exc.stderr.strip() or exc}") from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"`{' '.join(cmd)}` failed: {exc}") from exc
    return done.stdout


def list_namespaces() -> list[str]:
    """Names of the named network namespaces (``ip netns list``).

    Raises:
        NetnsError: ``ip`` failed.
    """
    return [line.split()[0] for line in run_setup(["ip", "netns", "list"]).splitlines() if line.strip()]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(pattern: re.Pattern[str]) -> list[str]:
    """Delete the namespaces named by ``pattern`` (group 1: the owner's pid) whose owner died.

    Returns the names deleted; namespaces of live processes are left alone.

    Raises:
        NetnsError: ``ip`` failed.
    """
    removed = []
    for name in list_namespaces():
        match = pattern.match(name)
        if match and not pid_alive(int(match.group(1))):
            run_setup(["ip", "netns", "del", name])
            removed.append(name)
    return removed


def namespace_pids(ns: str) -> list[int]:
    """Process ids living in namespace ``ns`` (empty if it does not exist)."""
    try:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [int(tok) for tok in out.split() if tok.isdigit()]


def exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def fill_placeholders(cmd: Sequence[str], names: Mapping[str, str]) -> list[str]:
    """``cmd`` with every ``{name}`` replaced by ``names[name]`` (the CLIs' ``{addr1}``, ``{ns_a}``, ...)."""
    out = []
    for arg in cmd:
        for key, value in names.items():
            arg = arg.replace("{" + key + "}", value)
        out.append(arg)
    return out


def wait_all(procs: list[subprocess.Popen[Any]], timeout: float | None,
             sleep: Callable[[float], None] = time.sleep) -> int:
    """Wait for every process; if one fails, stop the rest. Returns the exit status."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed or all(c is not None for c in codes):
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            return failed[0] if failed else 0
        if deadline is not None and time.monotonic() > deadline:
            for p in procs:
                p.kill()
            return 124
        sleep(0.05)


class Namespaces:
    """Base of a set of namespaces: ``with`` life cycle, processes inside them, teardown.

    A subclass names itself in ``what`` (for messages), says in
    :meth:`unavailable` why it cannot work here, lists its stale-name pattern in
    ``stale``, builds itself in :meth:`_build` (calling :meth:`_add_namespace`) and
    may undo extra parts in :meth:`_teardown_extra`.
    """

    what = "namespace set"
    stale: re.Pattern[str] | None = None

    def __init__(self) -> None:
        self._made: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._old_handlers: dict[int, Any] = {}
        self._open = False

    # -- hooks ---------------------------------------------------------------

    def unavailable(self) -> str | None:
        """Why this cannot work on this machine, or None."""
        return None

    def _build(self) -> None:
        raise NotImplementedError

    def _teardown_extra(self, problems: list[str]) -> None:
        """Undo what lives outside the namespaces; append what could not be undone."""

    # -- life cycle ----------------------------------------------------------

    def __enter__(self) -> Any:
        self.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.close()
        except NetnsError:
            if exc_type is None:
                raise
            log.exception("%s teardown failed while handling another error", self.what)

    def open(self) -> None:
        """Build it; on any failure undo what was done.

        Raises:
            NetnsError: unavailable here, already open, or a set-up command failed.
        """
        if self._open:
            raise NetnsError(f"this {self.what} is already open")
        reason = self.unavailable()
        if reason is not None:
            raise NetnsError(reason)
        self._trap_signals()
        try:
            if self.stale is not None:
                for name in cleanup_stale(self.stale):
                    log.warning("removed stale %s namespace %s", self.what, name)
            self._build()
        except BaseException:
            self._teardown()
            raise
        self._open = True

    def close(self) -> None:
        """Stop every process in the namespaces and delete them. Idempotent.

        Raises:
            NetnsError: some part could not be removed (the rest still was).
        """
        problems = self._teardown()
        if problems:
            raise NetnsError(f"{self.what} teardown incomplete: " + "; ".join(problems))

    def _add_namespace(self, ns: str) -> None:
        run_setup(["ip", "netns", "add", ns])
        self._made.append(ns)
        run_setup(["ip", "-n", ns, "link", "set", "lo", "up"])

    def _teardown(self) -> list[str]:
        problems: list[str] = []
        self._stop_processes()
        self._teardown_extra(problems)
        for ns in reversed(self._made):
            try:
                run_setup(["ip", "netns", "del", ns])  # its devices go with it
            except NetnsError as exc:
                problems.append(str(exc))
        self._made.clear()
        self._restore_signals()
        self._open = False
        return problems

    # -- running commands ----------------------------------------------------

    @staticmethod
    def _in(ns: str, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *cmd]

    def _popen(self, argv: list[str], kwargs: dict[str, Any]) -> subprocess.Popen[Any]:
        self._require_open()
        proc = subprocess.Popen(argv, **kwargs)
        self._procs.append(proc)
        return proc

    def _run_cmd(self, argv: list[str], kwargs: dict[str, Any]) -> subprocess.CompletedProcess[Any]:
        self._require_open()
        return subprocess.run(argv, **kwargs)

    def _require_open(self) -> None:
        if not self._open:
            raise NetnsError(f"the {self.what} is not open; use it inside `with {type(self).__name__}(...)`")

    def _stop_processes(self) -> None:
        """Terminate what still runs in our namespaces: our Popens, and anything else
        started inside them (a process left inside would keep using a dead link)."""
        pids = {p.pid for p in self._procs if p.poll() is None}
        for ns in self._made:
            pids.update(namespace_pids(ns))
        pids.discard(os.getpid())
        signal_all(pids, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_GRACE
        for proc in self._procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
        leftovers: set[int] = set()
        for ns in self._made:
            leftovers.update(namespace_pids(ns))
        leftovers.discard(os.getpid())
        signal_all(leftovers, signal.SIGKILL)

    def _trap_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) is signal.SIG_DFL:
                self._old_handlers[sig] = signal.signal(sig, exit_on_signal)

    def _restore_signals(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()
