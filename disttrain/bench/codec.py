"""Throughput of the GTC codec: C++ vs the pure-torch reference vs a plain ``copy_``.

Run ``python -m disttrain.bench.codec [--numel 25000000] [--density 0.001] [--repeats 7]
[--threads 1,2]``.  For every thread count (``torch.set_num_threads``, which the codec follows)
it times, on the same float32 tensors:

* encode (``residual += grad``, threshold, drain): counted as 12 bytes per element (read grad,
  read + write residual).  The residual is zeroed before each call (outside the timing), and
  ``grad`` is standard normal with ``tau`` chosen so that ``density`` of the entries cross it;
  the measured density is printed.  ``encode_cpp`` is the public ``disttrain.gtc.encode`` (C++
  fast path: read-only gradient check plus one fused pass); ``encode_cpp_checked`` is the C++
  two-pass path used when ``capacity`` is given; ``encode_ref`` is ``reference_encode``.
* decode of the words one encode produced: counted as 4 bytes per word read plus 8 bytes per
  ``out`` entry touched (read + write of one float32), i.e. 12 bytes per word.
* ``copy``: a preallocated ``dst.copy_(grad)``, counted as 8 bytes per element (read + write).

Each timing is repeated ``--repeats`` times, interleaved (one call of every case per round, so
background load hits all cases alike; decode calls are timed in groups of 10); the figures are
the best (minimum time) run, medians are given too.  The last line printed is one JSON object with all figures.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from disttrain import gtc


def _time_interleaved(cases: dict, repeats: int) -> dict:
    """Time every case once per round, ``repeats`` rounds, so background load hits all alike.

    ``cases``: name -> (fn, setup or None, inner) where ``inner`` calls of ``fn`` are timed
    together (for very short kernels).  Returns name -> (best seconds per call, median).
    """
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (fn, setup, inner) in cases.items():
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t0) / inner)
    return {name: (min(ts), statistics.median(ts)) for name, ts in times.items()}


def run(numel: int, density: float, repeats: int, threads: list[int]) -> dict:
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(numel, generator=gen)
    # P(|N(0,1)| >= tau) = density
    tau = float(math.sqrt(2.0) * torch.erfinv(torch.tensor(1.0 - density, dtype=torch.float64)))
    residual = torch.zeros(numel)
    dst = torch.empty(numel)
    out = torch.zeros(numel)
    zero = residual.zero_

    words = gtc.encode(grad, residual, tau)
    measured = words.numel() / max(numel, 1)
    r_ref = torch.zeros(numel)
    if not torch.equal(gtc.reference_encode(grad, r_ref, tau), words) or not torch.equal(r_ref, residual):
        raise SystemExit("C++ and reference encode disagree; not benchmarking")

    enc_bytes, copy_bytes, dec_bytes = 12 * numel, 8 * numel, 12 * words.numel()
    old_threads = torch.get_num_threads()
    results = {}
    try:
        for t in threads:
            torch.set_num_threads(t)
            gtc.set_codec_threads()
            tau32 = gtc.float32_tau(tau)
            cases = {
                "copy": (lambda: dst.copy_(grad), None, 1),
                "encode_cpp": (lambda: gtc.encode(grad, residual, tau), zero, 1),
                "encode_ref": (lambda: gtc.reference_encode(grad, residual, tau), zero, 1),
                "decode_cpp": (lambda: gtc.decode(out, words, tau), None, 10),
                "decode_ref": (lambda: gtc.reference_decode(out, words, tau), None, 10),
            }
            if gtc.HAVE_CPP:
                cases["encode_cpp_checked"] = (lambda: gtc._encode_cpp(grad, residual, tau32, None, 1), zero, 1)
            timed = _time_interleaved(cases, repeats)
            nbytes = {"copy": copy_bytes, "decode_cpp": dec_bytes, "decode_ref": dec_bytes}
            row = {}
            for name, (best, med) in timed.items():
                row[f"{name}_gbs"] = nbytes.get(name, enc_bytes) / best / 1e9
                row[f"{name}_gbs_median"] = nbytes.get(name, enc_bytes) / med / 1e9
            row["encode_cpp_over_ref"] = row["encode_cpp_gbs"] / row["encode_ref_gbs"]
            row["encode_cpp_over_copy"] = row["encode_cpp_gbs"] / row["copy_gbs"]
            row["decode_cpp_over_ref"] = row["decode_cpp_gbs"] / row["decode_ref_gbs"]
            results[str(t)] = row
    finally:
        torch.set_num_threads(old_threads)

    one = results.get("1")
    return {
        "bench": "gtc_codec",
        "numel": numel,
        "density_target": density,
        "density_measured": measured,
        "tau": tau,
        "words": words.numel(),
        "repeats": repeats,
        "statistic": "best of repeats (min time); *_median fields use the median",
        "bytes_counted": {
            "encode": "12 per element (read grad, read+write residual)",
            "copy": "8 per element (read+write)",
            "decode": "12 per word (4 word read + 8 out entry read+write)",
        },
        "have_cpp": gtc.HAVE_CPP,
        "openmp": bool(getattr(gtc._C, "HAVE_OPENMP", False)) if gtc.HAVE_CPP else False,
        "results": results,
        "targets": {
            "encode_cpp_over_ref_min": 5.0,
            "encode_cpp_over_copy_min_1_thread": 0.6,
            "met": None
            if one is None
            else bool(one["encode_cpp_over_ref"] >= 5.0 and one["encode_cpp_over_copy"] >= 0.6),
        },
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--numel", type=int, default=25_000_000)
    p.add_argument("--density", type=float, default=1e-3, help="fraction of entries crossing tau")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    a = p.parse_args(argv)
    threads = [int(x) for x in a.threads.split(",") if x.strip()]
    if not (0.0 < a.density < 1.0):
        p.error("--density must be in (0, 1)")
    res = run(a.numel, a.density, max(1, a.repeats), threads)
    print(
        f"GTC codec, {a.numel} float32, density {res['density_measured']:.5f} (tau {res['tau']:.4f}), "
        f"C++ codec: {res['have_cpp']} (OpenMP {res['openmp']}); GB/s, best of {res['repeats']}"
    )
    names = ["copy", "encode_cpp", "encode_cpp_checked", "encode_ref", "decode_cpp", "decode_ref"]
    print(f"{'threads':>7} " + " ".join(f"{n:>18}" for n in names) + f" {'enc cpp/ref':>11} {'enc cpp/copy':>12}")
    for t, row in res["results"].items():
        cells = " ".join(f"{row.get(n + '_gbs', float('nan')):18.2f}" for n in names)
        print(f"{t:>7} {cells} {row['encode_cpp_over_ref']:11.2f} {row['encode_cpp_over_copy']:12.2f}")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
