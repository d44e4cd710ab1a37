"""GTC's variable-size exchange: MPI Allgatherv against torch.distributed (gloo), in one run.

    mpiexec -n 4 python -m disttrain.bench.allgather [--words 5000 1000000] [--jitter 0.2]

GTC sends each worker's words to every worker, and the message lengths differ
from rank to rank and step to step.  ``MPICommunicator.all_gather_v`` is one
Allgatherv at the exact lengths; ``TorchCommunicator.all_gather_v`` (gloo)
exchanges the counts and pads every message to the longest.  Both
communicators live in the same processes (torch.distributed finds rank 0
through ``share_master_address`` over MPI) and exchange the same messages:
int32 words, ``--words`` per rank on average, each rank's length drawn
uniformly within +-``--jitter`` every iteration.  The default 5,000 words is
GTC at 0.1% density on a 5M-parameter model; 1e6 words is the size the
reference's "about 5x" figure was measured at.

Iterations alternate between the backends so drift on a shared machine hits
both; each starts after an (untimed) barrier, its time is the slowest rank's,
and the table gives the median.  Last line: a JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from ..comm import TorchCommunicator
from ..comm.mpi import MPICommunicator


def _messages(words: int, jitter: float, iters: int, rank: int, world: int, seed: int = 0) -> list[torch.Tensor]:
    """This rank's messages for every iteration (the same on both backends)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    low, high = round(words * (1 - jitter)), round(words * (1 + jitter))
    lengths = torch.randint(low, high + 1, (iters,), generator=gen).tolist()
    return [torch.randint(0, 2**31 - 1, (n,), dtype=torch.int32, generator=gen) for n in lengths]


def _time(comm, message: torch.Tensor, mpi: MPICommunicator) -> tuple[float, list[torch.Tensor]]:
    with mpi.uncounted():  # the benchmark's barrier, not the exchange's
        mpi.barrier()
    start = time.perf_counter()
    gathered = comm.all_gather_v(message)
    return time.perf_counter() - start, gathered


def measure(mpi: MPICommunicator, gloo: TorchCommunicator, words: int, jitter: float, iters: int,
            warmup: int) -> dict:
    messages = _messages(words, jitter, warmup + iters, mpi.rank, mpi.world_size)
    seconds = {"mpi": [], "gloo": []}
    sent = {}
    for i, message in enumerate(messages):
        if i == warmup:  # count the bytes of the timed iterations only
            sent = {"mpi": mpi.stats.ops["all_gather_v"].bytes_sent,
                    "gloo": gloo.stats.ops["all_gather_v"].bytes_sent}
        t_mpi, by_mpi = _time(mpi, message, mpi)
        t_gloo, by_gloo = _time(gloo, message, mpi)
        if i == 0 and not all(torch.equal(a, b) for a, b in zip(by_mpi, by_gloo)):
            raise RuntimeError("MPI and gloo gathered different messages")
        if i >= warmup:
            seconds["mpi"].append(t_mpi)
            seconds["gloo"].append(t_gloo)
    # An iteration lasts as long as its slowest rank.
    slowest = {k: [max(ts) for ts in zip(*mpi.comm.allgather(v))] for k, v in seconds.items()}
    bytes_per_iter = {k: (c.stats.ops["all_gather_v"].bytes_sent - sent[k]) / iters
                      for k, c in (("mpi", mpi), ("gloo", gloo))}
    mean_words = sum(m.numel() for m in messages[warmup:]) / iters
    mpi_ms, gloo_ms = (1e3 * statistics.median(slowest[k]) for k in ("mpi", "gloo"))
    return {"words": words, "mean_words_rank0": mean_words, "iters": iters,
            "mpi_ms": mpi_ms, "gloo_ms": gloo_ms, "speedup": gloo_ms / mpi_ms,
            "mpi_bytes_per_rank": bytes_per_iter["mpi"], "gloo_bytes_per_rank": bytes_per_iter["gloo"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--words", type=int, nargs="+", default=[5000, 1_000_000],
                        help="mean int32 words per rank per message (one row each)")
    parser.add_argument("--jitter", type=float, default=0.2, help="message lengths vary by +- this fraction")
    parser.add_argument("--iters", type=int, default=0,
                        help="timed iterations per size (0: 200 for small messages, fewer for large)")
    args = parser.parse_args(argv)
    if not 0 <= args.jitter < 1:
        parser.error(f"--jitter must be in [0, 1), got {args.jitter}")
    if any(w < 1 for w in args.words):
        parser.error("--words must be positive")

    torch.set_num_threads(1)
    mpi = MPICommunicator(device="cpu")
    if mpi.world_size < 2:
        mpi.close()
        sys.exit("launch under MPI: mpiexec -n 4 python -m disttrain.bench.allgather")
    gloo = TorchCommunicator(backend="gloo", device="cpu")
    results = []
    for words in args.words:
        iters = args.iters or max(10, min(200, 20_000_000 // words))
        results.append(measure(mpi, gloo, words, args.jitter, iters, warmup=max(2, iters // 10)))
    if mpi.rank == 0:
        print(f"all_gather_v of int32 words, {mpi.world_size} ranks, lengths +-{args.jitter:.0%}, "
              f"median of the slowest rank per iteration")
        print(f"{'words/rank':>10} {'iters':>6} {'MPI ms':>9} {'gloo ms':>9} {'gloo/MPI':>9} "
              f"{'MPI B/rank':>11} {'gloo B/rank':>11}")
        for r in results:
            print(f"{r['words']:>10} {r['iters']:>6} {r['mpi_ms']:>9.3f} {r['gloo_ms']:>9.3f} "
                  f"{r['speedup']:>8.1f}x {r['mpi_bytes_per_rank']:>11.0f} {r['gloo_bytes_per_rank']:>11.0f}")
        print(json.dumps({"bench": "allgather", "world_size": mpi.world_size, "jitter": args.jitter,
                          "results": results}))
    gloo.close()
    mpi.close()


if __name__ == "__main__":
    main()
