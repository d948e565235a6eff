"""Figures of benchmark and validation results (``--plot PATH``), drawn with matplotlib.

Each ``*_figure`` function is a pure function from result rows (the dicts the
benchmarks print and write as JSON) to a ``matplotlib.figure.Figure``; :func:`save`
writes one to a file. Figures are made with matplotlib's object API and the Agg
canvas, never through ``pyplot``: no window opens, no global figure state is kept.

matplotlib is an optional dependency (``pip install 'pccl[plot]'``); this module
imports it only when a figure is made, and :func:`require` checks for it up front so
a command fails before it runs, not after.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "INSTALL_HINT",
    "PlotUnavailableError",
    "allreduce_figure",
    "loss_curves_figure",
    "membership_figure",
    "require",
    "save",
    "shared_state_figure",
    "transport_figure",
]

INSTALL_HINT = "pip install 'pccl[plot]'"
_SIZE = (8.0, 4.8)  # inches; with dpi 120 about 960 x 576 pixels
_MARKERS = "osv^D<>p"


class PlotUnavailableError(ImportError):
    """matplotlib is not installed; the message says how to install it."""


def require() -> None:
    """Check that figures can be drawn.

    Raises:
        PlotUnavailableError: matplotlib cannot be imported.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise PlotUnavailableError(f"--plot needs matplotlib, which is not installed: {INSTALL_HINT}") from exc


def _figure(ncols: int = 1, width: float | None = None) -> tuple[Figure, list[Axes]]:
    require()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width or _SIZE[0] * (1 if ncols == 1 else 0.65 * ncols), _SIZE[1]),
                 layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def save(fig: Figure, path: str | os.PathLike[str], dpi: int = 120) -> None:
    """Write ``fig`` to ``path``; the format follows the suffix (``.png``, ``.svg``, ``.pdf``).

    Raises:
        OSError: the file cannot be written.
        ValueError: matplotlib does not know the suffix.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attach the Agg canvas: rendering never involves a GUI backend
    fig.savefig(os.fspath(path), dpi=dpi)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def allreduce_figure(rows: Iterable[Mapping[str, Any]], title: str = "all-reduce bus bandwidth") -> Figure:
    """Bus bandwidth (GB/s) against tensor size (MiB, log scale), one panel per world size and
    one line per implementation (``impl``: ``gloo``, ``pccl-cubic``, ...).

    Rows: ``{"impl", "world", "mib", "busbw_gbps"}`` as ``pccl bench allreduce`` writes them.

    Raises:
        PlotUnavailableError: matplotlib is missing.
        ValueError: no row with a finite bandwidth.
    """
    series: dict[int, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if _finite(r.get("busbw_gbps")):
            series[int(r["world"])][str(r["impl"])].append((float(r["mib"]), float(r["busbw_gbps"])))
    if not series:
        raise ValueError("no all-reduce rows to plot")
    worlds = sorted(series)
    fig, axes = _figure(len(worlds))
    impls = sorted({impl for by_impl in series.values() for impl in by_impl}, key=lambda s: (s != "gloo", s))
    colors = {impl: f"C{i}" for i, impl in enumerate(impls)}
    for ax, world in zip(axes, worlds):
        sizes = sorted({mib for points in series[world].values() for mib, _ in points})
        for impl in impls:
            points = sorted(series[world].get(impl, []))
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=colors[impl],
                        linestyle="--" if impl == "gloo" else "-", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [f"{mib:g}" for mib in sizes])
        ax.set_xlabel("tensor size (MiB, float32)")
        ax.set_ylabel("bus bandwidth (GB/s)")
        ax.set_title(f"world {world}")
        ax.set_ylim(bottom=0)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    return fig


def transport_figure(rows: Iterable[Mapping[str, Any]], title: str = "striped link vs plain socket") -> Figure:
    """Throughput (Gbit/s) against connections per link: the striped link and, measured side by
    side, the plain socket, one pair of lines per congestion-control setting.

    Rows: ``{"connections", "gbps", "baseline_gbps", "congestion"}`` as ``pccl bench transport``
    writes them.

    Raises:
        PlotUnavailableError: matplotlib is missing.
        ValueError: no rows.
    """
    by_cc: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for r in rows:
        by_cc[str(r.get("congestion", ""))].append(
            (int(r["connections"]), float(r["gbps"]), float(r["baseline_gbps"])))
    if not by_cc:
        raise ValueError("no transport rows to plot")
    fig, (ax,) = _figure()
    ticks: set[int] = set()
    for i, (cc, points) in enumerate(sorted(by_cc.items())):
        points.sort()
        conns = [p[0] for p in points]
        ticks.update(conns)
        label = f" ({cc})" if cc else ""
        ax.plot(conns, [p[1] for p in points], marker="o", color=f"C{i}", label=f"striped link{label}")
        ax.plot(conns, [p[2] for p in points], marker="s", color=f"C{i}", linestyle="--",
                label=f"plain socket{label}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
    ax.set_xlabel("TCP connections per link")
    ax.set_ylabel("throughput (Gbit/s)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title)
    return fig


def membership_figure(rows: Iterable[Mapping[str, Any]], title: str = "membership latencies") -> Figure:
    """A bar per event (join, SIGKILL / SIGSTOP detection): the median, min-max whiskers, and
    the goal as a marker. Rows: ``{"event", "seconds", "min", "max", "goal"}``.

    Raises:
        PlotUnavailableError: matplotlib is missing.
        ValueError: no rows.
    """
    data = list(rows)
    if not data:
        raise ValueError("no membership rows to plot")
    fig, (ax,) = _figure()
    names = [str(r["event"]).replace("_", "\n") for r in data]
    medians = [float(r["seconds"]) for r in data]
    low = [m - float(r.get("min", m)) for r, m in zip(data, medians)]
    high = [float(r.get("max", m)) - m for r, m in zip(data, medians)]
    xs = list(range(len(data)))
    ax.bar(xs, medians, yerr=[low, high], capsize=6, color="C0", label="median (whiskers: min-max)")
    goals = [(x, float(r["goal"])) for x, r in zip(xs, data) if _finite(r.get("goal"))]
    if goals:
        ax.scatter([g[0] for g in goals], [g[1] for g in goals], marker="_", s=900, color="C3",
                   linewidths=2, label="goal", zorder=3)
    for x, m in zip(xs, medians):
        ax.annotate(f"{m:.3f} s", (x, m), textcoords="offset points", xytext=(0, 4), ha="center",
                    fontsize="small")
    ax.set_xticks(xs, names)
    ax.set_ylabel("seconds")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title)
    return fig


def shared_state_figure(
    rows: Iterable[Mapping[str, Any]],
    goals: Mapping[str, float] | None = None,
    title: str = "shared state: hashing and catch-up",
) -> Figure:
    """Horizontal bars of throughput (GB/s) per measurement (``what``), with optional goal
    lines by label (e.g. ``{"hash goal": 10.0}``). Rows: ``{"what", "gbps"}``.

    Raises:
        PlotUnavailableError: matplotlib is missing.
        ValueError: no rows.
    """
    data = [r for r in rows if _finite(r.get("gbps"))]
    if not data:
        raise ValueError("no shared-state rows to plot")
    fig, (ax,) = _figure(width=10.0)
    ys = list(range(len(data)))[::-1]  # first row on top
    colors = ["C1" if str(r["what"]).startswith("catch-up") else "C0" for r in data]
    ax.barh(ys, [float(r["gbps"]) for r in data], color=colors)
    ax.set_yticks(ys, [str(r["what"]) for r in data], fontsize="small")
    for y, r in zip(ys, data):
        ax.annotate(f"{float(r['gbps']):.2f}", (float(r["gbps"]), y), textcoords="offset points",
                    xytext=(3, -3), fontsize="x-small")
    for i, (label, value) in enumerate((goals or {}).items()):
        ax.axvline(value, color=f"C{3 + i}", linestyle="--", label=f"{label} ({value:g} GB/s)")
    if goals:
        ax.legend(fontsize="small", loc="lower right")
    ax.set_xlabel("GB/s (10^9 bytes per second)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(title)
    return fig


def loss_curves_figure(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    final: Mapping[str, float] | None = None,
    title: str = "DiLoCo vs baselines",
    xlabel: str = "inner step",
) -> Figure:
    """Training loss curves (``name -> [(step, loss), ...]``) in one panel and, when ``final``
    (``name -> validation loss``) is given, a bar chart of the final validation losses next to
    it. Names starting with ``single`` or ``ddp`` (the baselines) are drawn dashed.

    Raises:
        PlotUnavailableError: matplotlib is missing.
        ValueError: no curve has a point.
    """
    if not any(curves.values()):
        raise ValueError("no loss curves to plot")
    fig, axes = _figure(2 if final else 1, width=12.0 if final else None)
    colors = {name: f"C{i}" for i, name in enumerate(sorted(set(curves) | set(final or {})))}
    ax = axes[0]
    for i, (name, points) in enumerate(curves.items()):
        if points:
            baseline = name.startswith(("single", "ddp"))
            # Distinct markers keep curves that coincide (e.g. float32 and uint8) both visible.
            ax.plot([p[0] for p in points], [p[1] for p in points], color=colors[name], label=name,
                    linestyle="--" if baseline else "-", linewidth=1.2 if baseline else 1.6,
                    marker=_MARKERS[i % len(_MARKERS)], markersize=4, markerfacecolor="none")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title("training loss")
    if final:
        bars = axes[1]
        names = list(final)
        values = [final[n] for n in names]
        bars.bar(range(len(names)), values, color=[colors[n] for n in names])
        bars.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize="small")
        low, high = min(values), max(values)
        pad = max(0.05 * (high - low), 0.01)
        bars.set_ylim(low - 4 * pad, high + 2 * pad)  # differences of a few hundredths stay visible
        for x, v in enumerate(values):
            bars.annotate(f"{v:.3f}", (x, v), textcoords="offset points", xytext=(0, 3), ha="center",
                          fontsize="x-small")
        bars.set_ylabel("validation loss")
        bars.grid(True, axis="y", alpha=0.3)
        bars.set_title("final validation loss")
    fig.suptitle(title)
    return fig
