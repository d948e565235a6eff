"""The ``pccl`` command line: ``pccl master``, ``pccl status``, ``pccl bench ...``, ``pccl demo``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this module only wires them together, importing a module
when its subcommand is chosen, so ``pccl --help`` stays fast. The module's
docstring is the subcommand's help text; its ``examples:`` section (indented
command lines) is shown last, as the help's epilog.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from pccl.plot import PlotUnavailableError

# name -> (module, one-line help). Benchmarks are grouped under ``pccl bench``.
COMMANDS: dict[str, tuple[str, str]] = {
    "master": ("pccl.master_cli", "run a membership master"),
    "status": ("pccl.status_cli", "show a running master's peers, rings, collectives and kicks"),
    # The demo is the DiLoCo training job; it lives in training/ (the layer above
    # pccl), so it is looked up by name here, never imported by pccl itself.
    "demo": ("training.demo", "train a tiny GPT with DiLoCo on local peers, with churn"),
}
BENCHMARKS: dict[str, tuple[str, str]] = {
    "transport": ("pccl.bench.transport", "striped TCP transfer vs a plain socket"),
    "shared-state": ("pccl.bench.shared_state", "shared-state hash throughput and catch-up of a fresh peer"),
    "membership": ("pccl.bench.membership", "join latency and SIGKILL/SIGSTOP detection latency"),
    "allreduce": ("pccl.bench.allreduce", "all-reduce bus bandwidth against torch.distributed Gloo"),
    "topology": ("pccl.bench.topology", "all-reduce time before and after optimize_topology (slow links: root)"),
}

# The epilogs of ``pccl --help`` and ``pccl bench --help``; subcommands take theirs from
# their module docstring (split_examples).
TOP_EXAMPLES = """\
examples:
  pccl master --port 48148 --status-port 48149
  pccl status 127.0.0.1:48149
  pccl bench transport --connections 1,4 --size-mib 64 --json out.json --plot out.png
  pccl demo

'pccl COMMAND --help' shows each command's options and examples; docs/README.md indexes the guides."""

BENCH_EXAMPLES = """\
examples:
  pccl bench allreduce --world 2,4 --sizes-mib 1,16,256 --compare-gloo --json ar.json --plot ar.png
  pccl bench membership --json membership.json --plot membership.png
  pccl bench transport --size-mib 64 --json transport.json"""

EXAMPLES_HEADING = "examples:"


def split_examples(doc: str) -> tuple[str, str | None]:
    """A subcommand module's docstring -> (description, epilog).

    The epilog is the ``examples:`` line and the indented lines right after it; the
    text around them stays the description. ``None`` when there is no such section.
    """
    lines = doc.strip().splitlines()
    try:
        start = lines.index(EXAMPLES_HEADING)
    except ValueError:
        return doc.strip(), None
    end = start + 1
    while end < len(lines) and lines[end].startswith(" "):
        end += 1
    description = "\n".join(lines[:start] + lines[end:]).strip()
    return description, "\n".join(lines[start:end])


def _load(module: str) -> object:
    return importlib.import_module(module)


def _add(sub: "argparse._SubParsersAction[argparse.ArgumentParser]", name: str, module: str, text: str) -> None:
    mod = _load(module)
    description, examples = split_examples(mod.__doc__ or text)
    parser = sub.add_parser(
        name,
        help=text,
        description=description,
        epilog=examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    getattr(mod, "add_arguments")(parser)
    parser.set_defaults(_run=getattr(mod, "run"))


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pccl",
        description="Fault-tolerant peer-to-peer collective communication.",
        epilog=TOP_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only import the module of the chosen subcommand (plus all of them for --help).
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, text) in COMMANDS.items():
        if chosen in (None, name):
            _add(sub, name, module, text)
        else:
            sub.add_parser(name, help=text)
    bench = sub.add_parser(
        "bench", help="benchmarks: print a table, write JSON, draw a plot",
        description="Benchmarks: each prints a table, writes JSON (--json) and can draw a figure (--plot).",
        epilog=BENCH_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCHMARK")
    for name, (module, text) in BENCHMARKS.items():
        if chosen in (None, "bench"):
            _add(bench_sub, name, module, text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list)
    args = parser.parse_args(args_list)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help()
        return 2
    try:
        return int(run(args))
    except PlotUnavailableError as exc:  # --plot without matplotlib: a usage problem, not a crash
        print(f"pccl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
