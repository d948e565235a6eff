"""The master's status page in a real headless Chromium, against a live master with peer processes.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
fd 3 in, fd 4 out, NUL-separated JSON), which needs nothing beyond the standard
library. The page is loaded once; the test then reads its DOM while a peer leaves,
so the update it sees comes from the page's own refresh, not from a reload.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from pccl.master import Master

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
HB = 2.0
# Puts the two pipe ends given as fd numbers on fds 3 and 4, then execs the rest of argv.
# (Out of the way first: either end may itself be fd 3 or 4.)
LAUNCHER = """
import fcntl, os, sys
high = [fcntl.fcntl(int(fd), fcntl.F_DUPFD_CLOEXEC, 10) for fd in sys.argv[1:3]]
os.dup2(high[0], 3)
os.dup2(high[1], 4)
os.execv(sys.argv[3], sys.argv[3:])
"""

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian chromium is not installed (make test installs it when run as root)"
)


class Chromium:
    """A headless Chromium process and one DevTools session on its first page."""

    def __init__(self, profile: Path) -> None:
        assert CHROMIUM is not None
        # Chromium reads commands on fd 3 and answers on fd 4; a tiny launcher moves our pipe ends there.
        self._cmd_r, self._cmd_w = os.pipe()
        self._out_r, self._out_w = os.pipe()
        self.log_path = profile.parent / "chromium.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(self._cmd_r), str(self._out_w), CHROMIUM, *FLAGS,
             "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(self._cmd_r, self._out_w), stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            start_new_session=True,
        )
        os.close(self._cmd_r)
        os.close(self._out_w)
        self._next_id = 0
        self._replies: dict[int, queue.Queue[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.session = ""

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = os.read(self._out_r, 1 << 16)
            if not chunk:
                break
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for raw in messages:
                msg = json.loads(raw)
                with self._lock:
                    box = self._replies.get(msg.get("id", -1))
                if box is not None:
                    box.put(msg)
                else:
                    self.events.append(msg)
        os.close(self._out_r)

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 20.0) -> dict[str, Any]:
        """Send a DevTools command (to the page session once attached); its result."""
        with self._lock:
            self._next_id += 1
            ident = self._next_id
            box: queue.Queue[dict[str, Any]] = queue.Queue()
            self._replies[ident] = box
        msg: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if self.session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        try:
            reply = box.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"chromium did not answer {method} in {timeout} s\n{self.log}") from None
        assert "error" not in reply, f"{method}: {reply['error']}"
        result: dict[str, Any] = reply["result"]
        return result

    def attach(self) -> None:
        """Attach to the page Chromium opened and turn on the domains the test listens to."""
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    def evaluate(self, expression: str) -> Any:
        """The JSON-able value of ``expression`` in the page; a thrown exception fails the test."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    @property
    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def problems(self) -> list[str]:
        """Uncaught exceptions, console errors and blocked requests (CSP) the page produced."""
        out = []
        for ev in list(self.events):
            method, params = ev.get("method"), ev.get("params", {})
            if method == "Runtime.exceptionThrown":
                out.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                out.append(params["entry"]["text"])
            elif method == "Runtime.consoleAPICalled" and params["type"] == "error":
                out.append(json.dumps(params["args"])[:500])
        return out

    def navigate(self, url: str) -> int:
        """Start loading ``url``; the event index to pass to :meth:`loaded`."""
        self.call("Page.navigate", {"url": url})
        # Events arrive in order: anything after the committed navigation is the new document's.
        return len(self.events)

    def loaded(self, since: int) -> bool:
        """The page fired its load event after event ``since`` (its own context is up)."""
        return any(ev.get("method") == "Page.loadEventFired" for ev in self.events[since:])

    def navigations(self) -> int:
        """Main-frame navigations so far (a reload would add one)."""
        return sum(1 for ev in list(self.events)
                   if ev.get("method") == "Page.frameNavigated" and "parentId" not in ev["params"]["frame"])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("Browser.close", timeout=5)
                self.proc.wait(10)
            except (AssertionError, OSError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        os.close(self._cmd_w)
        self._reader.join(10)
        self._log.close()


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Chromium]:
    browser = Chromium(tmp_path / "profile")
    try:
        browser.attach()
        yield browser
    finally:
        browser.close()


PAGE_STATE = """JSON.stringify({
  updates: Number(document.body.dataset.updates),
  error: document.body.dataset.error,
  marker: window.__statusTestMarker || null,
  peers: [...document.querySelectorAll("#peers tbody tr[data-peer]")].map(
    (tr) => ({id: Number(tr.dataset.peer), state: tr.dataset.state, cells: [...tr.cells].map((c) => c.textContent)})),
  groups: [...document.querySelectorAll("#groups tbody tr[data-group]")].map((tr) => tr.cells[1].textContent),
  departures: [...document.querySelectorAll("#departures tbody tr[data-peer]")].map(
    (tr) => ({peer: Number(tr.dataset.peer), reason: tr.cells[3].textContent})),
})"""


def page_state(browser: Chromium) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(browser.evaluate(PAGE_STATE))
    return state


@pytest.mark.timeout(90)
def test_status_page_renders_peers_and_follows_a_departure(
    chromium: Chromium, spawn_peer: Callable[..., Any], wait_for: Any
) -> None:
    with Master("127.0.0.1", 0, heartbeat_timeout=HB, status_port=0) as master:
        url = master.status_url
        assert url is not None
        peers = [spawn_peer(master.address) for _ in range(3)]
        peers[0].call("connect")
        for peer in peers[1:]:
            peer.send("connect")
        wait_for(lambda: len(master.status()["pending"]) == 2, 30, "two pending peers")
        peers[0].call("update_topology")
        assert all(p.reply(20)["ok"] for p in peers[1:])
        ids = [p.call("info")["peer_id"] for p in peers]
        ring = peers[0].call("info")["ring"]

        since = chromium.navigate(url)
        wait_for(lambda: chromium.loaded(since), 20, "the page's load event")
        shown = wait_for(lambda: (s := page_state(chromium))["updates"] >= 1 and len(s["peers"]) == 3 and s,
                         20, "the page to show three peers")
        assert shown["error"] == ""
        assert sorted(p["id"] for p in shown["peers"]) == sorted(ids)
        assert all(p["state"] == "accepted" for p in shown["peers"])
        # Columns: id, address, group, state, heartbeat, waiting in, in flight.
        for row in shown["peers"]:
            assert row["cells"][0] == str(row["id"]) and row["cells"][1].startswith("127.0.0.1:")
            assert row["cells"][2:4] == ["0", "accepted"] and row["cells"][4].endswith(" s ago")
        assert shown["groups"] == [" \u2192 ".join(str(p) for p in ring)]
        assert shown["departures"] == []

        # Mark this page instance: a reload would lose the marker (and add a navigation).
        chromium.evaluate("window.__statusTestMarker = 'same page'; true")
        navigations = chromium.navigations()
        leaver = peers[1]
        leaver.call("close")  # a clean Leave
        left = ids[1]
        after = wait_for(lambda: len((s := page_state(chromium))["peers"]) == 2 and s, 20,
                         "the page to drop the peer that left")
        assert sorted(p["id"] for p in after["peers"]) == sorted(i for i in ids if i != left)
        assert after["departures"] == [{"peer": left, "reason": "left the run"}]
        assert after["marker"] == "same page" and chromium.navigations() == navigations
        assert after["updates"] > shown["updates"] and after["error"] == ""
        new_ring = peers[0].call("info")["ring"]
        assert sorted(new_ring) == sorted(i for i in ids if i != left)
        wait_for(lambda: page_state(chromium)["groups"] == [" \u2192 ".join(str(p) for p in new_ring)], 20,
                 "the page to show the new ring")

    # The master is gone: the page says so instead of freezing on stale data.
    gone = wait_for(lambda: (s := page_state(chromium))["error"] and s, 20, "the page to report the master gone")
    assert "master unreachable" in gone["error"] and gone["marker"] == "same page"
    problems = [p for p in chromium.problems() if "status.json" not in p and "ERR_CONNECTION_REFUSED" not in p]
    assert problems == [], problems

