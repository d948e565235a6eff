"""pccl.plot: figures are pure functions of result rows; files are valid PNGs; --plot without
matplotlib fails up front with the install hint; one real ``pccl bench transport --plot`` run."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from pccl import plot
from pccl.cli import main
from training.harness import PeerResult, PeerSpec
from training.validate import final_losses, loss_curves

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk; fails unless the file is a PNG."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, data[:16]
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    assert data[-8:-4] == b"IEND"  # the file is complete
    return width, height


def _lines(ax: object) -> dict[str, tuple[list[float], list[float]]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))  # type: ignore[attr-defined]
            for line in ax.get_lines()}  # type: ignore[attr-defined]


ALLREDUCE_ROWS = [
    {"impl": "gloo", "world": 2, "mib": 16, "busbw_gbps": 0.9},
    {"impl": "gloo", "world": 2, "mib": 1, "busbw_gbps": 0.3},
    {"impl": "pccl-cubic", "world": 2, "mib": 1, "busbw_gbps": 0.2},
    {"impl": "pccl-cubic", "world": 2, "mib": 16, "busbw_gbps": 1.1},
    {"impl": "pccl-cubic", "world": 4, "mib": 1, "busbw_gbps": 0.5},
    {"impl": "pccl-cubic", "world": 4, "mib": 16, "busbw_gbps": math.nan},  # a failed row: left out
]


def test_allreduce_figure(tmp_path: Path) -> None:
    fig = plot.allreduce_figure(ALLREDUCE_ROWS)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["world 2", "world 4"]
    assert all(ax.get_xscale() == "log" for ax in axes)
    assert _lines(axes[0]) == {"gloo": ([1, 16], [0.3, 0.9]), "pccl-cubic": ([1, 16], [0.2, 1.1])}
    assert _lines(axes[1]) == {"pccl-cubic": ([1], [0.5])}
    out = tmp_path / "ar.png"
    plot.save(fig, out)
    assert png_size(out) == (1248, 576)  # two panels: 10.4 x 4.8 inches at 120 dpi


def test_transport_figure(tmp_path: Path) -> None:
    rows = [{"connections": c, "gbps": g, "baseline_gbps": b, "congestion": "cubic"}
            for c, g, b in ((4, 3.0, 1.0), (1, 1.0, 0.9))]
    fig = plot.transport_figure(rows)
    (ax,) = fig.axes
    assert _lines(ax) == {"striped link (cubic)": ([1, 4], [1.0, 3.0]), "plain socket (cubic)": ([1, 4], [0.9, 1.0])}
    assert ax.get_xlabel() == "TCP connections per link"
    out = tmp_path / "t.png"
    plot.save(fig, out)
    assert min(png_size(out)) > 0


def test_membership_and_shared_state_bars(tmp_path: Path) -> None:
    rows = [{"event": "join", "seconds": 0.02, "min": 0.01, "max": 0.05, "goal": 0.5},
            {"event": "sigstop_detection", "seconds": 2.1, "min": 2.0, "max": 2.3, "goal": 2.5}]
    fig = plot.membership_figure(rows)
    (ax,) = fig.axes
    assert [p.get_height() for p in ax.patches] == pytest.approx([0.02, 2.1])
    plot.save(fig, tmp_path / "m.png")
    assert min(png_size(tmp_path / "m.png")) > 0

    rows2 = [{"what": "xxh3-128, one call", "gbps": 20.5}, {"what": "catch-up of a fresh peer", "gbps": 1.2},
             {"what": "broken", "gbps": math.inf}]
    fig = plot.shared_state_figure(rows2, {"hash goal": 10.0})
    (ax,) = fig.axes
    assert sorted(p.get_width() for p in ax.patches) == pytest.approx([1.2, 20.5])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["hash goal (10 GB/s)"]
    plot.save(fig, tmp_path / "s.svg")  # the suffix picks the format
    assert (tmp_path / "s.svg").read_text().lstrip().startswith("<?xml")


def test_empty_input_is_an_error() -> None:
    for fn in (plot.allreduce_figure, plot.transport_figure, plot.membership_figure, plot.shared_state_figure):
        with pytest.raises(ValueError):
            fn([])
    with pytest.raises(ValueError):
        plot.loss_curves_figure({"single": []})


def _result(rounds: list[tuple[int, float]], val_loss: float | None = None) -> PeerResult:
    records: list[dict[str, object]] = [{"event": "round", "round": r, "loss": loss} for r, loss in rounds]
    if val_loss is not None:
        records.append({"event": "done", "val_loss": val_loss})
    return PeerResult(PeerSpec(0), 0, records)  # type: ignore[arg-type]


def test_validation_loss_curves_and_figure(tmp_path: Path) -> None:
    res = {
        "single": {"val_loss": 2.5, "losses": [4.0, 2.0, 3.0, 1.0, 5.0]},  # the odd last step: no window
        "diloco": [_result([(1, 2.0), (2, 1.0)], 1.9), _result([(1, 3.0)])],  # the second one died
        "ddp": [_result([(1, 2.2), (2, 1.4)], 2.0)],
    }
    curves = loss_curves(res, inner_steps=2)
    assert curves == {"single": [(2, 3.0), (4, 2.0)], "ddp": [(2, 2.2), (4, 1.4)], "diloco": [(2, 2.5), (4, 1.0)]}
    final = final_losses(res)
    assert final == {"single": 2.5, "ddp": 2.0, "diloco": 1.9}
    fig = plot.loss_curves_figure(curves, final)
    curve_ax, bar_ax = fig.axes
    assert _lines(curve_ax)["diloco"] == ([2, 4], [2.5, 1.0])
    assert curve_ax.get_lines()[0].get_linestyle() == "--"  # "single" is a baseline: dashed
    assert [p.get_height() for p in bar_ax.patches] == pytest.approx([2.5, 2.0, 1.9])
    plot.save(fig, tmp_path / "loss.png")
    assert png_size(tmp_path / "loss.png") == (1440, 576)


def test_without_matplotlib_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(plot.PlotUnavailableError, match=r"pip install 'pccl\[plot\]'"):
        plot.require()
    with pytest.raises(ImportError):  # it is an ImportError, for code that catches those
        plot.transport_figure([{"connections": 1, "gbps": 1.0, "baseline_gbps": 1.0}])
    # The command fails before it measures anything: no JSON file appears.
    for argv in (["bench", "transport", "--size-mib", "8", "--json", str(tmp_path / "t.json")],
                 ["bench", "membership", "--json", str(tmp_path / "m.json")],
                 ["bench", "shared-state", "--size-mib", "4", "--json", str(tmp_path / "s.json")],
                 ["bench", "allreduce", "--world", "2", "--json", str(tmp_path / "a.json")]):
        assert main([*argv, "--plot", str(tmp_path / "x.png")]) == 2
        assert "pip install 'pccl[plot]'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(120)
def test_real_transport_benchmark_draws_its_plot(tmp_path: Path) -> None:
    out, png = tmp_path / "t.json", tmp_path / "t.png"
    done = subprocess.run(
        [sys.executable, "-m", "pccl.cli", "bench", "transport", "--size-mib", "8", "--connections", "1,2",
         "--repeat", "1", "--warmup-mib", "1", "--json", str(out), "--plot", str(png)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"plot written to {png}" in done.stdout
    assert png_size(png) == (960, 576)
    assert [r["connections"] for r in json.loads(out.read_text())["rows"]] == [1, 2]
    # Not a terminal: plain progress lines, the last one counting every transfer (2 rows x
    # (1 warm-up + 1 timed) x (plain + link)); no bar redraws.
    assert "progress transport: done, 8/8 transfers (100%)" in done.stderr
    assert "\r" not in done.stderr and "\x1b" not in done.stderr
