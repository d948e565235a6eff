"""Helpers every ``pccl bench`` module shares: argument types, statistics,
thread limits, the printed table, the JSON file and the ``--plot`` figure."""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Environment variables that size the thread pools of torch / BLAS / OpenMP.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def int_list(text: str) -> list[int]:
    """argparse type for ``"1,2,4,8"``: positive integers, in the order given.

    Raises:
        argparse.ArgumentTypeError: empty, not an integer, or not positive.
    """
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def str_list(text: str) -> list[str]:
    """argparse type for ``"a,b"``: the non-empty names, in the order given.

    Raises:
        argparse.ArgumentTypeError: no name at all.
    """
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return values


def summarize(samples: Sequence[float], statistic: str = "median") -> float:
    """Reduce repeated measurements to one number: ``"median"``, ``"min"`` or ``"max"``.

    Raises:
        ValueError: no samples, or an unknown statistic.
    """
    if not samples:
        raise ValueError("no samples to summarize")
    if statistic == "median":
        return float(statistics.median(samples))
    if statistic in ("min", "max"):
        return float(min(samples) if statistic == "min" else max(samples))
    raise ValueError(f"unknown statistic {statistic!r}")


def gbps(nbytes: int, seconds: float) -> float:
    """Throughput in Gbit/s (10^9 bits per second); ``nan`` for a zero duration."""
    return nbytes * 8 / seconds / 1e9 if seconds > 0 else math.nan


def threads_per_process(processes: int, cores: int | None = None) -> int:
    """Cores each of ``processes`` processes on this machine gets (at least 1).

    Benchmarks that run several peers on one machine give each peer this many
    threads, so oversubscribed thread pools do not dominate (DESIGN §5).
    """
    total = cores if cores is not None else (os.cpu_count() or 1)
    return max(1, total // max(1, processes))


def thread_env(threads: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``base`` (default ``os.environ``) limiting child thread pools to ``threads``."""
    env = dict(os.environ if base is None else base)
    env.update({name: str(threads) for name in THREAD_ENV_VARS})
    return env


def format_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """Render ``rows`` as an aligned text table.

    ``columns`` holds ``(key, header, format spec)`` triples, e.g.
    ``("gbps", "Gbit/s", ".2f")``; a missing key prints as ``-``.
    """
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append([format(row[key], spec) if row.get(key) is not None else "-"
                      for key, _, spec in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (a ``.tmp`` file, then rename).

    Raises:
        OSError: the file could not be written.
    """
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, target)


def add_plot_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """Declare ``--plot PATH`` (``what``: the figure, for the help text)."""
    parser.add_argument(
        "--plot", metavar="PATH", default=None,
        help=f"also draw {what} to PATH (.png, .svg or .pdf; needs matplotlib: pip install 'pccl[plot]')",
    )


def check_plot(args: argparse.Namespace) -> None:
    """Fail before the benchmark runs when ``--plot`` was given but cannot be honoured.

    Raises:
        pccl.plot.PlotUnavailableError: matplotlib is not installed.
    """
    if getattr(args, "plot", None):
        from pccl import plot

        plot.require()


def write_plot(path: str | os.PathLike[str], figure: "Figure") -> None:
    """Save ``figure`` to ``path`` and say so on stdout.

    Raises:
        OSError: the file could not be written.
    """
    from pccl import plot

    plot.save(figure, path)
    print(f"plot written to {os.fspath(path)}")


def worker_or_cli(
    argv: Sequence[str],
    prog: str,
    doc: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
    worker: Callable[[dict[str, Any]], int],
) -> int:
    """Entry of a benchmark module: ``--worker CONFIG_JSON`` runs one worker process (started
    by the benchmark itself), anything else is the command line of ``prog``."""
    if len(argv) == 2 and argv[0] == "--worker":
        return worker(json.loads(argv[1]))
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
