"""A cost model of one training step at N workers: measured compute plus modelled communication.

    python -m disttrain.costmodel RESULTS_DIR [--bandwidth 1gbit] [--projection-latency-us 50]

Step time at N workers on links of bandwidth B (bytes/s of payload) with a
per-message latency a (alpha-beta model)::

    t(N) = c * s(N) + comm(N)

c is the synchronizer's compute time per step, measured on a 1-worker run
(wall time minus communication time, per step; it includes the
synchronizer's own work such as GTC's encode/decode).  s(N) is the CPU
sharing factor: 1 on real hardware; max(1, N / cores) when N emulated hosts
share ``cores`` CPU cores (the emulation check).  comm(N), per synchronizer:

* dense all-reduce, ring, per bucket of b bytes (model of P bytes in
  ceil(P / bucket) buckets)::

      sum over buckets  2 (N-1)/N * b / B  +  2 (N-1) a

* GTC, all-gather of the message m (bytes, padded to the longest worker's)
  after the all-gather of the 8-byte counts::

      (N-1) * 8 / B + (N-1) a   +   (N-1) * m / B + (N-1) a

* BMUF, amortised over its block of k = sync_every steps: a 16-byte control
  all-reduce and a ring all-reduce of the P-byte model every k steps::

      ( ring(16) + ring(P) ) / k

B is the link rate times ``payload_efficiency`` (TCP/IP and Ethernet headers
take 66 of every 1514 bytes on the wire at MTU 1500: 0.956).  Throughput is
N * batch / t(N); scaling efficiency is t(1) / t(N) = c / t(N) on real
hardware.  Assumptions, stated beside every projection: one worker per host
with its own link (full bisection, no switch contention), no overlap of
compute and communication, per-step compute and GTC's message size
independent of N (measured at the largest N available), warm-up steps left
out.  The emulated network has no per-message latency (the kernel has no
netem): there a is the software latency of one message (gloo, TCP through
veth and the bridge, waking processes that share a few cores), which
``fit_latency`` fits by least squares on the dense all-reduce runs, so the
check of GTC and BMUF is out of sample; the projections use a chosen value.

Example::

    link = Link(bandwidth_bps=1e9, latency_s=50e-6)
    p = Profile("allreduce", "allreduce", compute_s=0.02, model_bytes=8_000_000)
    step_time(p, 4, link)          # 0.02 + 1.5 * 8e6 / (1.25e8 * 0.956) + 6 * 50e-6
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, replace

PAYLOAD_EFFICIENCY = 1448 / 1514  # TCP payload per Ethernet frame at MTU 1500 (with timestamps)
CONTROL_BYTES = 16  # BMUF's control all-reduce: two int64 words
COUNT_BYTES = 8  # GTC's count exchange: one int64 per worker


@dataclass(frozen=True)
class Link:
    bandwidth_bps: float  # line rate, bits per second
    latency_s: float = 0.0  # per message (alpha)
    payload_efficiency: float = PAYLOAD_EFFICIENCY

    @property
    def bytes_per_s(self) -> float:
        return self.bandwidth_bps / 8 * self.payload_efficiency


@dataclass(frozen=True)
class Profile:
    """What the model needs to know about one synchronizer setting."""

    label: str  # e.g. "gtc tau=0.1"
    kind: str  # allreduce | gtc | bmuf
    compute_s: float  # per step, one worker
    model_bytes: int  # trainable parameters * 4
    bucket_bytes: int = 25 * 2**20
    message_bytes: float = 0.0  # GTC: words * 4 per worker per step (padded)
    sync_every: int = 1  # BMUF: steps per block


def ring_allreduce_s(nbytes: float, n: int, link: Link, bucket_bytes: float = math.inf) -> float:
    """Ring all-reduce of ``nbytes`` in buckets: sum of 2(N-1)/N * b / B + 2(N-1) a."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    buckets = max(1, math.ceil(nbytes / bucket_bytes))
    return 2 * (n - 1) / n * nbytes / link.bytes_per_s + buckets * 2 * (n - 1) * link.latency_s


def all_gather_s(message_bytes: float, n: int, link: Link) -> float:
    """All-gather where every worker contributes ``message_bytes``: (N-1) m / B + (N-1) a."""
    if n <= 1:
        return 0.0
    return (n - 1) * message_bytes / link.bytes_per_s + (n - 1) * link.latency_s


def comm_time(p: Profile, n: int, link: Link) -> float:
    """Communication seconds per step at ``n`` workers."""
    if n <= 1:
        return 0.0
    if p.kind == "allreduce":
        return ring_allreduce_s(p.model_bytes, n, link, p.bucket_bytes)
    if p.kind == "gtc":
        return all_gather_s(COUNT_BYTES, n, link) + all_gather_s(p.message_bytes, n, link)
    if p.kind == "bmuf":
        per_sync = ring_allreduce_s(CONTROL_BYTES, n, link) + ring_allreduce_s(p.model_bytes, n, link,
                                                                               p.bucket_bytes)
        return per_sync / p.sync_every
    raise ValueError(f"cost model: unknown synchronizer kind {p.kind!r}; valid: allreduce, gtc, bmuf")


def cpu_share(n: int, cores: int | None) -> float:
    """How much slower compute runs when ``n`` single-threaded hosts share ``cores`` cores."""
    return max(1.0, n / cores) if cores else 1.0


def step_time(p: Profile, n: int, link: Link, cores: int | None = None) -> float:
    return p.compute_s * cpu_share(n, cores) + comm_time(p, n, link)


def throughput(p: Profile, n: int, link: Link, batch_size: int) -> float:
    """Samples per second of the whole group on dedicated hardware."""
    return n * batch_size / step_time(p, n, link)


def efficiency(p: Profile, n: int, link: Link) -> float:
    return step_time(p, 1, link) / step_time(p, n, link)


# -- fitting to stored results ---------------------------------------------
def profiles(rows: list[dict]) -> dict[str, Profile]:
    """One profile per variant, from its 1-worker run (compute) and its largest-N run (GTC's message).

    Variants without a completed 1-worker run have no profile.
    """
    out = {}
    for variant in sorted({r["variant"] for r in rows}):
        mine = sorted((r for r in rows if r["variant"] == variant and r.get("status") == "ok"),
                      key=lambda r: r["world_size"])
        if not mine or mine[0]["world_size"] != 1:
            continue
        single = mine[0]
        out[variant] = Profile(
            label=variant, kind=single["sync"], compute_s=single["compute_s_per_step"],
            model_bytes=int(single["model_params"]) * 4,
            bucket_bytes=int(float(single.get("bucket_mb") or 25.0) * 2**20),
            message_bytes=message_bytes(mine[-1]), sync_every=int(single.get("sync_every") or 1))
    return out


def message_bytes(row: dict) -> float:
    """GTC's message per worker per step, padding included, from the communicator's accounting."""
    op = (row.get("by_op") or {}).get("all_gather_v")
    if not op or not op.get("calls"):
        return 0.0
    return op["bytes_sent"] / op["calls"] - COUNT_BYTES


def _emulated_points(rows: list[dict], workers: tuple[int, ...]):
    """(row, profile, link at a = 0) for every emulated run at ``workers`` with a 1-worker profile."""
    fitted = profiles(rows)
    for r in rows:
        net = r.get("net") or {}
        if r.get("status") != "ok" or r["world_size"] not in workers or not net.get("rate_bps"):
            continue
        p = fitted.get(r["variant"])
        if p is None:
            continue
        if p.kind == "gtc":  # the model predicts time from bytes: take this run's message
            p = replace(p, message_bytes=message_bytes(r))
        yield r, p, Link(net["rate_bps"], 0.0)


def messages_per_step(p: Profile, n: int, link: Link) -> float:
    """How many latencies a step pays: comm(N) is linear in a, this is its slope."""
    return comm_time(p, n, replace(link, latency_s=1.0)) - comm_time(p, n, replace(link, latency_s=0.0))


def fit_latency(rows: list[dict], kind: str = "allreduce", workers: tuple[int, ...] = (2, 4)) -> float | None:
    """Least-squares per-message latency a from the emulated runs of one synchronizer kind.

    On an emulated cluster a is software latency (gloo, TCP through veth and the bridge, and
    waking N processes that share a few cores), not wire latency.  Fitting it on the dense
    all-reduce runs leaves GTC and BMUF out of sample.
    """
    num = den = 0.0
    for r, p, link in _emulated_points(rows, workers):
        if p.kind == kind:
            k = messages_per_step(p, r["world_size"], link)
            num += k * (r["wall_s"] / r["steps"] - step_time(p, r["world_size"], link, r.get("cores")))
            den += k * k
    return max(0.0, num / den) if den else None


def check(rows: list[dict], latency_s: float = 0.0, workers: tuple[int, ...] = (2, 4)) -> list[dict]:
    """Predicted against measured step time for every emulated run at ``workers``.

    The model takes compute from the variant's 1-worker run, GTC's message
    from the run being predicted, the link rate from the run's emulation
    settings, the CPU sharing factor from the run's core count, and the
    per-message latency ``latency_s``.
    """
    out = []
    for r, p, link in _emulated_points(rows, workers):
        link = replace(link, latency_s=latency_s)
        n = r["world_size"]
        predicted = step_time(p, n, link, cores=r.get("cores"))
        measured = r["wall_s"] / r["steps"]
        out.append({"variant": r["variant"], "world_size": n, "measured_s": measured,
                    "predicted_s": predicted, "compute_s": p.compute_s * cpu_share(n, r.get("cores")),
                    "comm_s": comm_time(p, n, link), "latency_s": latency_s,
                    "error": (predicted - measured) / measured})
    return out


def project(rows: list[dict], link: Link, workers: list[int]) -> dict[str, list[dict]]:
    """Throughput and efficiency per variant at each of ``workers``, on dedicated hardware."""
    out = {}
    for variant, p in profiles(rows).items():
        batch = next(r["batch_size"] for r in rows if r["variant"] == variant)
        out[variant] = [{"world_size": n, "step_s": step_time(p, n, link),
                         "samples_per_s": throughput(p, n, link, batch),
                         "efficiency": efficiency(p, n, link)} for n in workers]
    return out


def print_check(rows: list[dict]) -> None:
    """The check with a = 0 and with a fitted on the all-reduce runs."""
    fitted = fit_latency(rows)
    if fitted is None:
        print("cost model: no emulated runs at 2 or 4 workers with a 1-worker run of the same variant")
        return
    no_latency = check(rows, 0.0)
    for c, f in zip(no_latency, check(rows, fitted)):
        print(f"cost model: {c['variant']:<22} N={c['world_size']}  measured {c['measured_s'] * 1e3:6.1f} ms/step"
              f"  predicted {c['predicted_s'] * 1e3:6.1f} (a=0, error {c['error']:+.1%})  "
              f"{f['predicted_s'] * 1e3:6.1f} (a={fitted * 1e3:.2f} ms, error {f['error']:+.1%})")


def load_rows(results_dir: str) -> list[dict]:
    with open(os.path.join(results_dir, "results.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> None:
    from .netem import parse_rate

    parser = argparse.ArgumentParser(description="Check the cost model against a sweep's emulated runs.")
    parser.add_argument("results_dir")
    parser.add_argument("--bandwidth", default="1gbit", help="link rate for the projection")
    parser.add_argument("--projection-latency-us", type=float, default=50.0)
    args = parser.parse_args(argv)
    rows = load_rows(args.results_dir)
    print_check(rows)
    link = Link(parse_rate(args.bandwidth), args.projection_latency_us * 1e-6)
    for variant, points in project(rows, link, [8, 64, 1024]).items():
        print(variant, "  ".join(f"N={p['world_size']}: {p['samples_per_s']:.0f} samples/s "
                                 f"eff {p['efficiency']:.0%}" for p in points))


if __name__ == "__main__":
    main()
