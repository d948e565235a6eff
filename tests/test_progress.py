"""pccl.progress: plain lines at a bounded rate when not on a terminal, a tqdm bar on one, never both."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pccl.progress import Progress, progress

REPO_ROOT = Path(__file__).resolve().parents[1]
CONTROL = re.compile(r"[\r\x1b]")  # carriage returns and escape sequences: what a bar redraw uses


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class TtyStream(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_plain_lines_are_rate_limited_and_end_with_a_final_line() -> None:
    out, clock = io.StringIO(), FakeClock()
    with progress(25, "rounds", unit="round", stream=out, interval=10.0, clock=clock) as bar:
        assert bar.mode == "plain" and not bar.tty  # a StringIO is no terminal
        for i in range(25):
            clock.now += 1.0
            bar.update(1, loss=f"{3 - i / 10:.1f}")
    text = out.getvalue()
    assert not CONTROL.search(text)
    lines = text.splitlines()
    # One line at t=10 s and t=20 s (the interval), then the final one: 25 updates, 3 lines.
    assert len(lines) == 3, lines
    assert "rounds: 10/25 rounds (40%), 00:10 elapsed, ~00:15 left, loss=2.1" in lines[0]
    assert "rounds: 20/25 rounds (80%), 00:20 elapsed, ~00:05 left, loss=1.1" in lines[1]
    assert "rounds: done, 25/25 rounds (100%) in 00:25, loss=0.6" in lines[2]
    assert all(re.match(r"\d\d:\d\d:\d\d progress ", line) for line in lines)


def test_plain_mode_unknown_total_and_failure() -> None:
    out, clock = io.StringIO(), FakeClock()
    with pytest.raises(RuntimeError):
        with progress(None, "chaos", unit="fault", stream=out, interval=5.0, clock=clock) as bar:
            for _ in range(7):
                clock.now += 1.0
                bar.update()
            raise RuntimeError("boom")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith("chaos: 5 faults, 00:05 elapsed")  # no percentage, no estimate
    assert lines[1].endswith("chaos: stopped at 7 faults in 00:07")


def test_iterating_wraps_and_counts_every_item() -> None:
    out, clock = io.StringIO(), FakeClock()
    items = ["a", "b", "c", "d"]
    seen = []
    for item in progress(items, "sizes", unit="size", stream=out, interval=0.0, clock=clock):
        seen.append(item)
        clock.now += 1.0
    assert seen == items
    lines = out.getvalue().splitlines()
    # interval 0: a line per item, then the final one.
    assert [re.sub(r"^\S+ ", "", line) for line in lines] == [
        "progress sizes: 1/4 sizes (25%), 00:01 elapsed, ~00:03 left",
        "progress sizes: 2/4 sizes (50%), 00:02 elapsed, ~00:02 left",
        "progress sizes: 3/4 sizes (75%), 00:03 elapsed, ~00:01 left",
        "progress sizes: 4/4 sizes (100%), 00:04 elapsed",
        "progress sizes: done, 4/4 sizes (100%) in 00:04",
    ]


def test_forced_tty_draws_a_tqdm_bar_and_no_plain_lines() -> None:
    out = TtyStream()
    with progress(3, "demo", unit="round", stream=out) as bar:
        assert bar.tty
        for _ in range(3):
            bar.update(1, peers=4)
    text = out.getvalue()
    assert "\r" in text  # redrawn in place
    assert "demo: 100%" in text and "3/3" in text and "peers=4" in text
    assert "progress demo" not in text and "done," not in text


def test_write_goes_around_the_bar() -> None:
    out, lines = TtyStream(), io.StringIO()
    with Progress(2, "demo", stream=out, mode="tty") as bar:
        bar.update()
        bar.write("peer 3 killed", file=lines)
        bar.update()
    assert lines.getvalue() == "peer 3 killed\n"
    plain, clock = io.StringIO(), FakeClock()
    with Progress(2, "demo", stream=plain, mode="plain", clock=clock) as bar:
        bar.write("peer 3 killed")
    assert plain.getvalue().splitlines()[0] == "peer 3 killed"


def test_off_prints_only_what_is_written() -> None:
    out = TtyStream()
    with progress(3, "x", stream=out, mode="off") as bar:
        bar.update(3)
        bar.write("hello")
    assert out.getvalue() == "hello\n"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode"):
        Progress(3, mode="fancy")
    with pytest.raises(ValueError, match="total"):
        Progress(-1)
    with pytest.raises(TypeError):
        iter(Progress(3, stream=io.StringIO()))


_CHILD = textwrap.dedent("""
    import sys
    from pccl.progress import progress
    with progress(3, "child", unit="step", interval=0.0) as bar:
        for _ in range(3):
            bar.update()
    print("mode=" + bar.mode, file=sys.stderr)
""")


@pytest.mark.timeout(60)
def test_auto_mode_in_real_processes() -> None:
    """The default stream is the process's real stderr: a pipe gives plain lines, a pty a bar."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    piped = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=50)
    assert piped.returncode == 0, piped.stderr
    assert "mode=plain" in piped.stderr and "child: done, 3/3 steps" in piped.stderr
    assert not CONTROL.search(piped.stderr)

    main_fd, child_fd = pty.openpty()
    # Left unsized on purpose: a fresh pty reports 0 x 0 characters (as under `script` or some
    # CI runners), and the bar must still be drawn.
    assert os.get_terminal_size(child_fd) == (0, 0)
    try:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD], stderr=child_fd, env=env)
        os.close(child_fd)
        chunks = []
        while True:  # read until the child closes its end (EOF / EIO on Linux)
            ready, _, _ = select.select([main_fd], [], [], 50)
            if not ready:
                break
            try:
                data = os.read(main_fd, 4096)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=50) == 0
    finally:
        os.close(main_fd)
    text = b"".join(chunks).decode(errors="replace")
    assert "mode=tty" in text and "\r" in text and "3/3" in text
    assert "progress child" not in text  # never both
