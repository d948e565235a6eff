"""The ``pccl`` command line: ``pccl master``, ``pccl bench ...``, ``pccl demo``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this module only wires them together, importing a module
when its subcommand is chosen, so ``pccl --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

# name -> (module, one-line help). Benchmarks are grouped under ``pccl bench``.
COMMANDS: dict[str, tuple[str, str]] = {
    "master": ("pccl.master_cli", "run a membership master"),
    # The demo is the DiLoCo training job; it lives in training/ (the layer above
    # pccl), so it is looked up by name here, never imported by pccl itself.
    "demo": ("training.demo", "train a tiny GPT with DiLoCo on local peers, with churn"),
}
BENCHMARKS: dict[str, tuple[str, str]] = {
    "transport": ("pccl.bench.transport", "striped TCP transfer vs a plain socket"),
    "shared-state": ("pccl.bench.shared_state", "shared-state hash throughput and catch-up of a fresh peer"),
    "membership": ("pccl.bench.membership", "join latency and SIGKILL/SIGSTOP detection latency"),
    "allreduce": ("pccl.bench.allreduce", "all-reduce bus bandwidth against torch.distributed Gloo"),
}


def _load(module: str) -> object:
    return importlib.import_module(module)


def _add(sub: "argparse._SubParsersAction[argparse.ArgumentParser]", name: str, module: str, text: str) -> None:
    mod = _load(module)
    parser = sub.add_parser(
        name,
        help=text,
        description=(mod.__doc__ or text).strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    getattr(mod, "add_arguments")(parser)
    parser.set_defaults(_run=getattr(mod, "run"))


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pccl",
        description="Fault-tolerant peer-to-peer collective communication.",
        epilog="examples:\n  pccl master --port 48148\n  pccl bench transport --connections 1,4 --json out.json\n  pccl demo",
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
    bench = sub.add_parser("bench", help="benchmarks: print a table, write JSON")
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
    return int(run(args))


if __name__ == "__main__":
    sys.exit(main())
