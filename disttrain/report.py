"""The scaling report: Markdown tables and PNG plots from a sweep's stored results.

    python -m disttrain.report RESULTS_DIR [--out DIR] [--target-loss X] [--projection-latency-us A]

Reads RESULTS_DIR/results.jsonl (one row per point, written by
``disttrain.bench.scaling``; RESULTS_DIR/sweep.json for the command, if
present) and writes DIR/REPORT.md (DIR defaults to RESULTS_DIR) with:

* every point: steps/s, samples/s, scaling efficiency, eval loss, bytes per
  step per worker, communication share;
* at the largest worker count: each variant's steps/s as a ratio to dense
  all-reduce, and eval loss at equal samples;
* time to a target eval loss (default: the worst final eval loss of the
  all-reduce runs, so the baseline always reaches it);
* bytes on the wire from ``tc`` against the communicator's accounting;
* the cost model (``disttrain.costmodel``) against the measurements at 2 and 4
  workers, and its projection to 8 ... 1024 workers with its assumptions;

and the plots throughput.png (with the ideal line), efficiency.png,
loss_vs_samples.png, loss_vs_time.png, bytes_per_step.png, projection.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil

from . import costmodel

PROJECTION_WORKERS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


def load(results_dir: str) -> tuple[list[dict], dict]:
    path = os.path.join(results_dir, "results.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: give the directory a scaling sweep wrote")
    rows = costmodel.load_rows(results_dir)
    sweep_path = os.path.join(results_dir, "sweep.json")
    sweep = json.load(open(sweep_path)) if os.path.exists(sweep_path) else {}
    return rows, sweep


def _ok(rows: list[dict]) -> list[dict]:
    return sorted((r for r in rows if r.get("status") == "ok"), key=lambda r: (r["variant"], r["world_size"]))


def _variants(rows: list[dict]) -> list[str]:
    order = {"allreduce": 0, "gtc": 1, "bmuf": 2}
    return sorted({r["variant"] for r in rows}, key=lambda v: (order.get(v.split()[0], 9), v))


def efficiency_of(rows: list[dict]) -> dict[tuple[str, int], float]:
    """samples/s at N over N times the same variant's 1-worker samples/s."""
    single = {r["variant"]: r["samples_per_s"] for r in rows if r["world_size"] == 1}
    return {(r["variant"], r["world_size"]): r["samples_per_s"] / (r["world_size"] * single[r["variant"]])
            for r in rows if r["variant"] in single}


def time_to_target(row: dict, target: float) -> float | None:
    """Wall seconds at the first evaluation with eval loss <= target (None: never)."""
    for point in row.get("eval_curve") or []:
        if point["eval_loss"] <= target:
            return point["wall_s"]
    return None


def default_target(rows: list[dict]) -> float:
    baseline = [r["eval_loss"] for r in rows if r["sync"] == "allreduce" and math.isfinite(r["eval_loss"])]
    return max(baseline) if baseline else max(r["eval_loss"] for r in rows)


def _table(header: list[str], body: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def _mb(x: float) -> str:
    return f"{x / 1e6:.3f}"


# -- plots -----------------------------------------------------------------
def _plots(rows: list[dict], out: str, projection: dict, link: costmodel.Link) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = _variants(rows)
    colors = {v: plt.cm.tab10(i % 10) for i, v in enumerate(variants)}
    eff = efficiency_of(rows)
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=110)
        plt.close(fig)
        written.append(name)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        ns = [r["world_size"] for r in mine]
        ax.plot(ns, [r["samples_per_s"] for r in mine], "o-", color=colors[v], label=v)
        single = [r["samples_per_s"] for r in mine if r["world_size"] == 1]
        if single:
            ax.plot(ns, [n * single[0] for n in ns], ":", color=colors[v], alpha=0.6)
    ax.plot([], [], "k:", label="ideal (N x 1 worker)")
    ax.set(xlabel="workers", ylabel="samples/s", title="Throughput")
    ax.set_xticks(sorted({r["world_size"] for r in rows}))
    ax.legend(fontsize=8)
    save(fig, "throughput.png")

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for v in variants:
        pts = sorted((n, e) for (vv, n), e in eff.items() if vv == v)
        if pts:
            ax.plot(*zip(*pts), "o-", color=colors[v], label=v)
    ax.axhline(1.0, color="k", ls=":", lw=1)
    ax.set(xlabel="workers", ylabel="samples/s / (N x 1-worker samples/s)", title="Scaling efficiency",
           ylim=(0, None))
    ax.set_xticks(sorted({r["world_size"] for r in rows}))
    ax.legend(fontsize=8)
    save(fig, "efficiency.png")

    worker_counts = sorted({r["world_size"] for r in rows})
    for key, xlabel, name in (("samples", "samples (all workers)", "loss_vs_samples.png"),
                              ("wall_s", "wall time (s)", "loss_vs_time.png")):
        fig, axes = plt.subplots(1, len(worker_counts), figsize=(4.2 * len(worker_counts), 3.8),
                                 sharey=True, squeeze=False)
        for ax, n in zip(axes[0], worker_counts):
            for r in rows:
                if r["world_size"] == n and r.get("eval_curve"):
                    curve = r["eval_curve"]
                    ax.plot([p[key] for p in curve], [p["eval_loss"] for p in curve], "o-", ms=3,
                            color=colors[r["variant"]], label=r["variant"])
            ax.set(xlabel=xlabel, title=f"{n} worker{'s' if n > 1 else ''}")
        axes[0][0].set_ylabel("eval loss")
        axes[0][-1].legend(fontsize=7)
        save(fig, name)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for v in variants:
        mine = [r for r in rows if r["variant"] == v and r["world_size"] > 1]
        if mine:
            ax.plot([r["world_size"] for r in mine], [r["bytes_sent_per_step"] for r in mine], "o-",
                    color=colors[v], label=v)
    ax.set(xlabel="workers", ylabel="bytes sent per step per worker (accounted)", yscale="log",
           title="Traffic per step")
    ax.set_xticks([n for n in worker_counts if n > 1])
    ax.legend(fontsize=8)
    save(fig, "bytes_per_step.png")

    if projection:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for v, pts in projection.items():
            ns = [p["world_size"] for p in pts]
            a1.plot(ns, [p["samples_per_s"] for p in pts], "-", color=colors.get(v), label=v)
            a2.plot(ns, [p["efficiency"] for p in pts], "-", color=colors.get(v), label=v)
            single = pts[0]["samples_per_s"]
            a1.plot(ns, [n * single for n in ns], ":", color=colors.get(v), alpha=0.5)
        a1.set(xscale="log", yscale="log", xlabel="workers", ylabel="samples/s (model)",
               title=f"Projected throughput, {link.bandwidth_bps / 1e9:g} Gbit/s, "
                     f"a={link.latency_s * 1e6:g} us")
        a2.set(xscale="log", xlabel="workers", ylabel="efficiency (model)", ylim=(0, 1.05),
               title="Projected scaling efficiency")
        for a in (a1, a2):
            a.set_xticks(PROJECTION_WORKERS[::2] + [1024])
            a.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        a2.legend(fontsize=8)
        save(fig, "projection.png")
    return written


# -- the Markdown ----------------------------------------------------------
def write_report(results_dir: str, out: str | None = None, target_loss: float | None = None,
                 projection_bandwidth: str | None = None,
                 projection_latency_us: float = 50.0) -> str:
    """Write OUT/REPORT.md and the plots; return the Markdown's path."""
    from .netem import parse_rate

    out = out or results_dir
    os.makedirs(out, exist_ok=True)
    all_rows, sweep = load(results_dir)
    if os.path.abspath(out) != os.path.abspath(results_dir):  # the report carries its own data
        for name in ("results.jsonl", "results.csv", "sweep.json"):
            if os.path.exists(os.path.join(results_dir, name)):
                shutil.copyfile(os.path.join(results_dir, name), os.path.join(out, name))
    rows = _ok(all_rows)
    if not rows:
        raise ValueError(f"{results_dir}/results.jsonl has no completed runs")
    variants = _variants(rows)
    eff = efficiency_of(rows)
    net = next((r["net"] for r in rows if r.get("net")), None)
    link_bps = parse_rate(projection_bandwidth) if projection_bandwidth else (net or {}).get("rate_bps", 1e9)
    link = costmodel.Link(link_bps, projection_latency_us * 1e-6)
    projection = costmodel.project(rows, link, PROJECTION_WORKERS)
    plots = _plots(rows, out, projection, link)

    md = ["# Scaling report", ""]
    if sweep.get("command"):
        md += ["Made with:", "", "```", sweep["command"], "```", ""]
    md += ["The table of results (results.jsonl, results.csv) lies beside this file; rewrite the report "
           f"from it with `python -m disttrain.report {out}`.", ""]
    first = rows[0]
    md += [f"- model: {first.get('model')} with {first.get('model_params', 0):,} parameters "
           f"({first.get('model_params', 0) * 4 / 1e6:.1f} MB of float32 gradients), batch "
           f"{first['batch_size']} per worker, {first['steps']} steps per run",
           "- network: " + (f"emulated, every host limited to {net['rate']} (tbf, burst "
                             f"{net['burst_bytes']} bytes), one network namespace per worker on one "
                             f"bridge; no added per-message latency (the kernel has no netem)"
                             if net else "none (workers on one machine over loopback)"),
           f"- machine: {first.get('cores')} CPU cores shared by all workers (one thread each)"]
    if sweep.get("overrides"):
        md.append(f"- overrides: `{' '.join(sweep['overrides'])}`")
    if sweep.get("missing_syncs"):
        md.append(f"- not swept (no config yet): {', '.join(sweep['missing_syncs'])}")
    failed = [r["name"] for r in all_rows if r.get("status") != "ok"]
    if failed:
        md.append(f"- failed points (left out): {', '.join(failed)}")
    md.append("")

    md += ["## All points", "", _table(
        ["variant", "workers", "steps/s", "samples/s", "efficiency", "eval loss", "eval acc",
         "MB/step/worker", "comm share"],
        [[r["variant"], r["world_size"], f"{r['steps_per_s']:.2f}", f"{r['samples_per_s']:.1f}",
          f"{eff[(r['variant'], r['world_size'])]:.2f}" if (r["variant"], r["world_size"]) in eff else "-",
          f"{r['eval_loss']:.4f}", f"{r['eval_acc']:.4f}", _mb(r["bytes_sent_per_step"]),
          f"{r['comm_s'] / r['wall_s']:.0%}"] for r in rows]), "",
           "Efficiency: samples/s at N over N times the same variant's 1-worker samples/s. "
           "Comm share: rank 0's time inside collectives over its wall time.", "",
           "![throughput](throughput.png) ![efficiency](efficiency.png)", ""]

    top = max(r["world_size"] for r in rows)
    base = next((r for r in rows if r["world_size"] == top and r["sync"] == "allreduce"), None)
    if base:
        md += [f"## Against dense all-reduce at {top} workers", "", _table(
            ["variant", "steps/s", "ratio to all-reduce", "samples", "eval loss", "eval loss - all-reduce"],
            [[r["variant"], f"{r['steps_per_s']:.2f}", f"{r['steps_per_s'] / base['steps_per_s']:.2f}x",
              r["samples"], f"{r['eval_loss']:.4f}", f"{r['eval_loss'] - base['eval_loss']:+.4f}"]
             for r in rows if r["world_size"] == top]), "",
               "Every run at one worker count takes the same steps on the same batch size, so eval "
               "losses in one table are at equal samples.", ""]

    target = default_target(rows) if target_loss is None else target_loss
    worker_counts = sorted({r["world_size"] for r in rows})
    by_point = {(r["variant"], r["world_size"]): r for r in rows}
    md += ["## Eval loss against samples and wall time", "",
           "![loss vs samples](loss_vs_samples.png)", "", "![loss vs time](loss_vs_time.png)", "",
           f"### Time to eval loss {target:.4f}", "",
           "Wall seconds to the first evaluation at or below the target"
           + (" (the worst final eval loss of the all-reduce runs)" if target_loss is None else "") + ".", "",
           _table(["variant"] + [f"{n} worker{'s' if n > 1 else ''}" for n in worker_counts],
                  [[v] + [_fmt_time(by_point.get((v, n)), target) for n in worker_counts]
                   for v in variants]), ""]

    md += ["## Bytes per step per worker", "", "![bytes per step](bytes_per_step.png)", ""]
    wired = [r for r in rows if r.get("tc_tx_bytes") and r["world_size"] > 1]
    if wired:
        md += ["### On the wire: tc against the communicator's accounting", "",
               "tc's count is every byte rank 0's host sent (Ethernet/IP/TCP headers, ACKs, rendezvous "
               "and logging traffic included). Expected: rank 0's accounted payload times the algorithm's "
               "wire factor (ring all-reduce 2(N-1)/N, all-gather N-1, broadcast root ceil(log2 N)). "
               "Headers alone make tc / expected = 1514/1448 = 1.046 at MTU 1500.", "",
               _table(["variant", "workers", "accounted (MB)", "expected on wire (MB)", "tc rank 0 (MB)",
                       "tc / expected", "tc all hosts (MB)"],
                      [[r["variant"], r["world_size"], _mb(r["accounted_bytes_rank0"]),
                        _mb(r["expected_wire_bytes_rank0"]), _mb(r["tc_tx_bytes"][0]),
                        f"{r['tc_tx_bytes'][0] / r['expected_wire_bytes_rank0']:.3f}"
                        if r["expected_wire_bytes_rank0"] else "-", _mb(sum(r["tc_tx_bytes"]))]
                       for r in wired]), ""]

    fitted = costmodel.fit_latency(rows)
    md += ["## Cost model", "", _costmodel_text(), ""]
    if fitted is not None:
        plain, with_a = costmodel.check(rows, 0.0), costmodel.check(rows, fitted)
        md += [f"### Against the emulated measurements (largest error {max(abs(c['error']) for c in plain):.1%} "
               f"with a = 0, {max(abs(c['error']) for c in with_a):.1%} with a = {fitted * 1e3:.2f} ms)", "",
               "a = 0: the links add no latency, so the model has bandwidth and compute only. "
               f"a = {fitted * 1e3:.2f} ms: the per-message software latency of the emulated cluster (gloo, TCP "
               "through veth and the bridge, waking processes that share the cores), fitted by least squares "
               "on the all-reduce runs alone, so the GTC and BMUF rows are out of sample.", "",
               _table(["variant", "workers", "measured ms/step", "predicted, a = 0", "error",
                       f"predicted, a = {fitted * 1e3:.2f} ms", "error", "of which compute", "of which comm"],
                      [[c["variant"], c["world_size"], f"{c['measured_s'] * 1e3:.1f}",
                        f"{c['predicted_s'] * 1e3:.1f}", f"{c['error']:+.1%}", f"{f['predicted_s'] * 1e3:.1f}",
                        f"{f['error']:+.1%}", f"{f['compute_s'] * 1e3:.1f}", f"{f['comm_s'] * 1e3:.1f}"]
                       for c, f in zip(plain, with_a)]), ""]
    if projection:
        md += [f"### Projection to {PROJECTION_WORKERS[-1]} workers", "",
               "![projection](projection.png)", "",
               f"Assumptions: {link.bandwidth_bps / 1e9:g} Gbit/s per worker, per-message latency "
               f"{projection_latency_us:g} us, one worker per host with its own link and full bisection "
               "bandwidth, compute per step as measured on one worker here (no CPU sharing), no overlap of "
               "compute and communication, GTC's message size as measured at the largest worker count "
               "(padded all-gather grows as N-1), BMUF's all-reduce amortised over its block.", "",
               _table(["variant"] + [f"N={n}" for n in (8, 64, 256, 1024)],
                      [[v] + [f"{p['samples_per_s']:.0f}/s, {p['efficiency']:.0%}"
                              for p in pts if p["world_size"] in (8, 64, 256, 1024)]
                       for v, pts in projection.items()]), ""]
    md += ["Plots: " + ", ".join(plots), ""]
    path = os.path.join(out, "REPORT.md")
    with open(path, "w") as f:
        f.write("\n".join(md))
    return path


def _fmt_time(row: dict | None, target: float) -> str:
    if row is None:
        return "-"
    t = time_to_target(row, target)
    return "not reached" if t is None else f"{t:.1f} s"


def _costmodel_text() -> str:
    return ("Step time t(N) = c * s(N) + comm(N): c is the variant's compute per step measured on its "
            "1-worker run (wall minus communication time); s(N) = max(1, N / cores) when the emulated hosts "
            "share this machine's cores (1 on real hardware); comm(N) is ring all-reduce "
            "2(N-1)/N * bytes / B + 2(N-1) a per bucket (all-reduce), the all-gather of the counts and "
            "of the padded message (N-1)(8 + m) / B + 2(N-1) a (GTC), and a ring all-reduce of the model "
            "every sync_every steps (BMUF). B is the link rate times 1448/1514 (TCP/IP/Ethernet headers); "
            "a is the per-message latency.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m disttrain.report", description=__doc__.splitlines()[0])
    parser.add_argument("results_dir")
    parser.add_argument("--out", help="where REPORT.md and the PNGs go (default: RESULTS_DIR)")
    parser.add_argument("--target-loss", type=float, help="eval loss for the time-to-target table")
    parser.add_argument("--projection-bandwidth", help="link rate for the projection (default: the sweep's)")
    parser.add_argument("--projection-latency-us", type=float, default=50.0)
    args = parser.parse_args(argv)
    print(write_report(args.results_dir, args.out, args.target_loss, args.projection_bandwidth,
                       args.projection_latency_us))


if __name__ == "__main__":
    main()
