"""DiLoCo across machines: every machine runs this peer script against one pccl master.

Two machines, A (10.0.0.1) and B (see docs/quickstart.md for ports and the firewall):

    A$ pccl master --port 48148 --secret-file secret.txt
    A$ python examples/diloco_across_machines.py --master 10.0.0.1:48148 --min-peers 2 \
           --secret-file secret.txt --p2p-port 48150
    B$ python examples/diloco_across_machines.py --master 10.0.0.1:48148 --min-peers 2 \
           --secret-file secret.txt --p2p-port 48150

Everything on this machine, a master and 3 peers started by the script:

    python examples/diloco_across_machines.py --local 3

Each peer trains a small MLP on its own samples of one regression task: ``--inner-steps``
local AdamW steps, then an outer round over the network (the pseudo-gradients averaged by an
all-reduce, an outer Nesterov step, the outer state synced through pccl's shared state).
Peers may join later (they are voted in at the next round and receive the group's state) or
die (the others go on with a smaller ring). A peer prints one line per round and, at the end,
the held-out loss before and after and a digest of its outer parameters, which is the same
on every peer that finished.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

DIM, HIDDEN, BATCH = 16, 64, 32


def _task() -> tuple[torch.Tensor, torch.Tensor]:
    """The regression task every peer shares: a fixed random two-layer "teacher"."""
    g = torch.Generator().manual_seed(1234)
    return torch.randn(DIM, HIDDEN, generator=g), torch.randn(HIDDEN, 1, generator=g) / HIDDEN ** 0.5


def peer(args: argparse.Namespace) -> int:
    """One peer: connect, train ``args.rounds`` DiLoCo rounds, report. Returns the exit status."""
    import pccl
    from training import DiLoCo
    from training.diloco import outer_digest

    torch.set_num_threads(args.threads)
    w1, w2 = _task()

    def batch(g: torch.Generator, n: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, DIM, generator=g)
        return x, torch.tanh(x @ w1) @ w2

    # The first sync hands every peer the group's outer state whatever its own init; the seed
    # only makes the run reproducible.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(DIM, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1))
    x_eval, y_eval = batch(torch.Generator().manual_seed(99), 512)

    def eval_loss() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(model(x_eval), y_eval))

    secret = Path(args.secret_file).read_bytes().rstrip(b"\r\n") if args.secret_file else None
    quant = pccl.Quantization(torch.uint8) if args.quantize == "uint8" else None
    listen = {"p2p_port": args.p2p_port} if args.p2p_port else {}  # default: a free port
    with pccl.Communicator(args.master, connections=args.connections, secret=secret,
                           advertise_host=args.advertise_host, **listen) as comm:
        comm.connect(timeout=args.connect_timeout)
        # The constructor runs the membership phase and the first sync: a late joiner gets the
        # group's outer parameters here, so "before" is measured after it.
        diloco = DiLoCo(comm, model, torch.optim.AdamW(model.parameters(), lr=args.lr), args.inner_steps,
                        quantization=quant, min_peers=args.min_peers)
        before = eval_loss()
        data = torch.Generator().manual_seed(1000 + comm.peer_id)  # every peer its own samples
        print(f"peer {comm.peer_id}: joined at round {diloco.round} with {comm.world_size} peer(s)", flush=True)
        while diloco.round < args.rounds:
            x, y = batch(data)
            torch.nn.functional.mse_loss(model(x), y).backward()
            info = diloco.step()  # an inner step; every --inner-steps calls, an outer round
            if info is not None:
                print(f"peer {comm.peer_id}: round {info.round:3d}  peers {info.world_size}  "
                      f"eval loss {eval_loss():.4f}  sent {info.reduce_tx_bytes / 1024:.1f} KiB", flush=True)
        diloco.flush()
        diloco.close()
        after = eval_loss()
        result = {"peer": comm.peer_id, "before": before, "after": after, "digest": outer_digest(diloco),
                  "rounds": diloco.round}
    print(f"peer {result['peer']}: eval loss {before:.4f} -> {after:.4f}, outer digest {result['digest']}",
          flush=True)
    print("RESULT " + json.dumps(result), flush=True)
    return 0 if after < before else 1


def local(args: argparse.Namespace) -> int:
    """``--local N``: a master in this process and N peer processes on 127.0.0.1."""
    import pccl

    with pccl.Master(host="127.0.0.1", port=0) as master:
        argv = [sys.executable, os.path.abspath(__file__), "--master", master.address, "--min-peers",
                str(args.local), "--rounds", str(args.rounds), "--inner-steps", str(args.inner_steps),
                "--lr", str(args.lr), "--connections", str(args.connections), "--quantize", args.quantize]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True) for _ in range(args.local)]
        results = []
        try:
            for proc in procs:
                out, _ = proc.communicate(timeout=args.timeout)
                for line in out.splitlines():
                    if line.startswith("RESULT "):
                        results.append(json.loads(line[len("RESULT "):]))
                    else:
                        print(line)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    digests = {r["digest"] for r in results}
    ok = (len(results) == args.local and all(p.returncode == 0 for p in procs) and len(digests) == 1)
    if results:
        print(f"{len(results)} of {args.local} peers finished {args.rounds} rounds: eval loss "
              f"{max(r['before'] for r in results):.4f} -> {max(r['after'] for r in results):.4f}; "
              f"outer parameters bit-identical on every peer: {'yes' if len(digests) == 1 else 'NO'}")
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--master", help="the master's host:port (a peer of a run on several machines)")
    where.add_argument("--local", type=int, metavar="N", help="start a local master and N peers")
    ap.add_argument("--rounds", type=int, default=10, help="outer rounds of the run (default 10)")
    ap.add_argument("--inner-steps", type=int, default=10, help="H: inner steps per round (default 10)")
    ap.add_argument("--min-peers", type=int, default=1,
                    help="founders wait for this many peers before the first round (default 1)")
    ap.add_argument("--lr", type=float, default=1e-2, help="inner AdamW learning rate (default 0.01)")
    ap.add_argument("--quantize", choices=("none", "uint8"), default="none",
                    help="quantize the pseudo-gradients on the wire")
    ap.add_argument("--connections", type=int, default=4, help="TCP connections per ring link (default 4)")
    ap.add_argument("--secret-file", help="file holding the run's shared secret (as given to the master)")
    ap.add_argument("--advertise-host", help="the address other peers should dial (NAT, several interfaces)")
    ap.add_argument("--p2p-port", type=int, default=0,
                    help="listen for the other peers on this port (open it in the firewall; default: a free port)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this peer (default 1)")
    ap.add_argument("--connect-timeout", type=float, default=300.0, help="seconds to wait to be accepted")
    ap.add_argument("--timeout", type=float, default=300.0, help="--local: give up after SECONDS")
    args = ap.parse_args()
    return local(args) if args.local else peer(args)


if __name__ == "__main__":
    sys.exit(main())
