"""Scaling sweep: synchronizers x worker counts x their parameters, each point a real process group.

    python -m disttrain.bench.scaling                      # small preset: the whole report, 2-core box
    python -m disttrain.bench.scaling --preset large       # real hardware
    python -m disttrain.bench.scaling --net none --workers 1 2 --syncs allreduce -- train.steps=50

Every point is its own group of worker processes with its own run directory
(OUT/runs/<variant>-n<N>):

* ``--net none``: ``torchrun --standalone --nproc-per-node N -m disttrain.train``.
* ``--net 1gbit`` (100mbit, 10gbit, any tc rate): an emulated network
  (``disttrain.netem``): worker i runs as host i in its own network namespace,
  ``ip netns exec Hi python -m disttrain.train`` with RANK / WORLD_SIZE /
  MASTER_ADDR (host 0's private address) and GLOO_SOCKET_IFNAME=eth0.  The
  namespaces are fresh per point and removed after it, on failure and on
  Ctrl-C too.  After each point ``tc -s qdisc`` gives the bytes every host
  actually sent, stored beside the communicator's accounting.

Workers run with OMP_NUM_THREADS=1.  The results table (OUT/results.jsonl and
OUT/results.csv, one row per point) is gathered from every run's
summary.json and metrics.jsonl; then the report is written
(``disttrain.report``, OUT/REPORT.md or ``--report-dir``) and the cost
model's error printed.
Points whose run directory already holds a summary.json are reused with
``--resume``.  Synchronizers without a config in conf/sync/ are skipped with
a warning.
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from .. import costmodel, netem
from ..config import CONF_DIR

# Each preset: sweep axes and the Hydra overrides every point shares.
PRESETS = {
    # A wide frame MLP on tiny batches: little compute, 8.7 MB of gradients per step, so at
    # 1 Gbit/s communication dominates; 15 points, 2.5 minutes on an idle 2-core machine.
    "small": {
        "workers": [1, 2, 4], "net": "1gbit", "syncs": ["allreduce", "gtc", "bmuf"],
        "gtc_tau": [0.1, 0.3], "bmuf_sync_every": [10, 30],
        "overrides": ["model=mlp", "model.hidden=1024", "model.layers=4", "data.utt_len=16",
                      "train.batch_size=2", "optim.lr=0.02", "train.steps=150", "train.eval_every=25",
                      "train.log_every=5", "train.checkpoint_every=0"],
    },
    # The seed experiment's shape: an LSTM acoustic model, more steps, up to 8 workers.
    "large": {
        "workers": [1, 2, 4, 8], "net": "1gbit", "syncs": ["allreduce", "gtc", "bmuf"],
        "gtc_tau": [0.01, 0.03], "bmuf_sync_every": [10, 50],
        "overrides": ["model=lstm", "model.hidden=512", "train.batch_size=16", "optim.lr=0.1",
                      "train.steps=1000", "train.eval_every=100", "train.log_every=10",
                      "train.checkpoint_every=0"],
    },
}
# Per-synchronizer overrides: GTC's momentum correction replaces the optimizer's momentum.
SYNC_OVERRIDES = {"gtc": ["optim.momentum=0"]}
MASTER_PORT = 29500  # inside the emulated network's own namespaces: cannot collide


@dataclass
class Point:
    sync: str
    world_size: int
    params: dict = field(default_factory=dict)  # sync.* settings swept

    @property
    def variant(self) -> str:
        return " ".join([self.sync] + [f"{k}={v}" for k, v in self.params.items()])

    @property
    def name(self) -> str:
        return "-".join([self.sync] + [f"{k}{v}" for k, v in self.params.items()]) + f"-n{self.world_size}"

    def overrides(self) -> list[str]:
        return ([f"sync={self.sync}"] + SYNC_OVERRIDES.get(self.sync, [])
                + [f"sync.{k}={v}" for k, v in self.params.items()])


def available_syncs(syncs: list[str]) -> tuple[list[str], list[str]]:
    """(those with a conf/sync/<name>.yaml, those without)."""
    have = [s for s in syncs if os.path.exists(os.path.join(CONF_DIR, "sync", f"{s}.yaml"))]
    return have, [s for s in syncs if s not in have]


def make_points(syncs: list[str], workers: list[int], gtc_tau: list[float],
                bmuf_sync_every: list[int]) -> list[Point]:
    variants = {"allreduce": [{}], "gtc": [{"tau": t} for t in gtc_tau],
                "bmuf": [{"sync_every": k} for k in bmuf_sync_every]}
    return [Point(s, n, dict(params)) for s in syncs for params in variants.get(s, [{}]) for n in workers]


# -- running one point -----------------------------------------------------
def worker_env(extra: dict | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)
    root = os.path.dirname(CONF_DIR)  # workers import this checkout's disttrain
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def _wait(procs: list[subprocess.Popen], timeout_s: float) -> list[int]:
    """Wait for all; if one fails or time runs out, end the rest (they would wait on it)."""
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)  # each worker leads its own process group
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [p.returncode for p in procs]


def run_local(point: Point, run_dir: str, overrides: list[str], timeout_s: float) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={point.world_size}", "-m", "disttrain.train",
           *overrides, f"hydra.run.dir={run_dir}"]
    with open(os.path.join(run_dir, "workers.log"), "w") as log:
        proc = subprocess.Popen(cmd, env=worker_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        codes = _wait([proc], timeout_s)
    return {"returncodes": codes, "launcher": "torchrun --standalone"}


def run_emulated(point: Point, run_dir: str, overrides: list[str], timeout_s: float, rate: str) -> dict:
    n = point.world_size
    with netem.EmulatedNetwork(n, rate) as net:
        master = net.hosts[0].address
        procs, logs = [], []
        try:
            for i in range(n):
                env = worker_env({"RANK": str(i), "WORLD_SIZE": str(n), "LOCAL_RANK": "0",
                                  "MASTER_ADDR": master, "MASTER_PORT": str(MASTER_PORT),
                                  "GLOO_SOCKET_IFNAME": "eth0"})
                logs.append(open(os.path.join(run_dir, f"worker{i}.log"), "w"))
                procs.append(subprocess.Popen(
                    net.exec_prefix(i) + [sys.executable, "-m", "disttrain.train", *overrides,
                                          f"hydra.run.dir={run_dir}"],
                    env=env, stdout=logs[-1], stderr=subprocess.STDOUT, start_new_session=True))
            codes = _wait(procs, timeout_s)
        finally:
            _wait(procs, 0)
            for log in logs:
                log.close()
        tx = [net.tx_bytes(i) for i in range(n)]
        return {"returncodes": codes, "launcher": "ip netns exec + env RANK/WORLD_SIZE",
                "net": net.settings(), "tc_tx_bytes": tx}


# -- the results table -----------------------------------------------------
def read_run(run_dir: str) -> tuple[dict, list[dict]]:
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    return summary, metrics


def expected_wire_bytes(by_op: dict, n: int) -> float:
    """Payload a rank puts on the wire for what the communicator counted.

    Factors measured on gloo (sysfs tx_bytes, 4 hosts): ring all-reduce 2(N-1)/N, ring
    all-gather N-1, broadcast a binomial tree whose root sends ceil(log2 N) copies.
    """
    factor = {"all_reduce": 2 * (n - 1) / n, "all_gather_v": n - 1,
              "broadcast": math.ceil(math.log2(n)) if n > 1 else 0, "barrier": 0}
    return sum(op["bytes_sent"] * factor.get(name, 1) for name, op in by_op.items())


def make_row(point: Point, run_dir: str, launch: dict, model_params: int | None) -> dict:
    row = {"variant": point.variant, "name": point.name, "sync": point.sync,
           "world_size": point.world_size,
           "run_dir": os.path.basename(run_dir), "cores": os.cpu_count(),
           "net": launch.get("net"), "launcher": launch.get("launcher"),
           "returncodes": launch.get("returncodes")}
    if not os.path.exists(os.path.join(run_dir, "summary.json")):
        return {**row, "status": "failed"}
    summary, metrics = read_run(run_dir)
    cfg, stats = summary["config"], summary["stats"]
    steps = summary["steps"]
    # The initial broadcast of rank 0's model happens before the timed loop: not a step's comm.
    comm_s = summary["comm_s"] - (stats.get("by_op") or {}).get("broadcast", {}).get("seconds", 0.0)
    row.update(
        status="ok", steps=steps, samples=summary["samples"], batch_size=cfg["train"]["batch_size"],
        wall_s=summary["wall_s"], samples_per_s=summary["samples_per_s"],
        steps_per_s=steps / summary["wall_s"],
        eval_loss=summary["eval_loss"], eval_acc=summary["eval_acc"],
        bytes_sent_per_step=summary["bytes_sent_per_step"], comm_s=comm_s, comm_s_per_step=comm_s / steps,
        compute_s_per_step=(summary["wall_s"] - comm_s) / steps,
        model=cfg["model"].get("_target_", "").rsplit(".", 1)[-1], model_params=model_params,
        bucket_mb=cfg["sync"].get("bucket_mb"), sync_every=cfg["sync"].get("sync_every"),
        tau=cfg["sync"].get("tau"), density_mean=stats.get("density_mean"),
        by_op=stats.get("by_op"),
        eval_curve=[{k: m[k] for k in ("step", "samples", "wall_s", "eval_loss")}
                    for m in metrics if "eval_loss" in m],
    )
    if launch.get("tc_tx_bytes"):
        row["tc_tx_bytes"] = launch["tc_tx_bytes"]
        row["expected_wire_bytes_rank0"] = expected_wire_bytes(stats.get("by_op") or {}, point.world_size)
        row["accounted_bytes_rank0"] = stats["bytes_sent"]
    return row


def count_params(overrides: list[str]) -> int:
    from hydra.utils import instantiate

    from ..config import compose

    cfg = compose(overrides)
    data = instantiate(cfg.data)
    model = instantiate(cfg.model, input_dim=data.feat_dim, num_classes=data.num_classes)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def write_table(out: str, rows: list[dict]) -> None:
    with open(os.path.join(out, "results.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    flat_keys = [k for k in dict.fromkeys(k for r in rows for k in r)
                 if all(not isinstance(r.get(k), (dict, list)) for r in rows)]
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=flat_keys + ["net_rate", "tc_tx_bytes_rank0"],
                                extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "net_rate": (r.get("net") or {}).get("rate", "none"),
                             "tc_tx_bytes_rank0": (r.get("tc_tx_bytes") or [None])[0]})


# -- the sweep -------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m disttrain.bench.scaling", description=__doc__.splitlines()[0],
        epilog="Hydra overrides for every point go after '--', e.g. -- train.steps=50 model.hidden=512")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--out", help="results directory (default: outputs/scaling/<preset>-<time>)")
    parser.add_argument("--net", help=f"emulated link rate: {', '.join(netem.NET_CHOICES)} or any tc rate "
                                      f"(default: the preset's)")
    parser.add_argument("--workers", type=int, nargs="+", help="worker counts (1 to 8)")
    parser.add_argument("--syncs", nargs="+", help="synchronizers (conf/sync/<name>.yaml)")
    parser.add_argument("--gtc-tau", type=float, nargs="+", help="GTC thresholds to sweep (sync.tau)")
    parser.add_argument("--bmuf-sync-every", type=int, nargs="+", help="BMUF block lengths (sync.sync_every)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per point before it is ended")
    parser.add_argument("--resume", action="store_true", help="reuse points that already have a summary.json")
    parser.add_argument("--no-report", action="store_true", help="only the results table")
    parser.add_argument("--report-dir", help="where REPORT.md, its plots and a copy of the table go "
                                             "(default: OUT)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every point")
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    args.command = " ".join(["python -m disttrain.bench.scaling", *given])
    preset = PRESETS[args.preset]
    for key in ("workers", "net", "syncs", "gtc_tau", "bmuf_sync_every"):
        if getattr(args, key) is None:
            setattr(args, key, copy.deepcopy(preset[key]))
    if any(not 1 <= n <= 8 for n in args.workers):
        parser.error(f"--workers must lie in 1..8 (one machine's emulated hosts), got {args.workers}")
    if any(t <= 0 for t in args.gtc_tau):
        parser.error(f"--gtc-tau (sync.tau) must be > 0, got {args.gtc_tau}")
    if any(k < 1 for k in args.bmuf_sync_every):
        parser.error(f"--bmuf-sync-every (sync.sync_every) must be >= 1, got {args.bmuf_sync_every}")
    if args.net != "none":
        try:
            netem.parse_rate(args.net)
        except ValueError as error:
            parser.error(f"--net: {error}; or none")
    args.overrides = preset["overrides"] + ["train.progress=false"] + args.overrides
    args.out = args.out or os.path.join(
        "outputs", "scaling", f"{args.preset}-{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        return sweep(parse_args(argv))
    except KeyboardInterrupt:
        print("scaling: interrupted; the running point's workers and namespaces were removed",
              file=sys.stderr)
        return 130
    except netem.NetemUnavailable as error:
        print(f"scaling: error: {error}", file=sys.stderr)
        return 2


def sweep(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.net != "none":
        reason = netem.unavailable_reason()
        if reason:
            print(f"scaling: error: --net {args.net}: {reason}", file=sys.stderr)
            return 2
    syncs, missing = available_syncs(args.syncs)
    if missing:
        print(f"scaling: warning: no conf/sync/{{{','.join(missing)}}}.yaml: sweeping {syncs} only",
              file=sys.stderr)
    if not syncs:
        print("scaling: error: none of the synchronizers has a config", file=sys.stderr)
        return 2
    points = make_points(syncs, sorted(set(args.workers)), args.gtc_tau, args.bmuf_sync_every)
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    model_params = count_params(args.overrides)
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump({"command": args.command,
                   "preset": args.preset, "net": args.net, "overrides": args.overrides,
                   "points": [p.name for p in points], "model_params": model_params,
                   "cores": os.cpu_count(), "missing_syncs": missing}, f, indent=2)

    rows = []
    bar = tqdm(points, desc="scaling", unit="point", dynamic_ncols=True)
    with netem.handle_signals():
        for point in bar:
            bar.set_postfix_str(point.name)
            run_dir = os.path.abspath(os.path.join(args.out, "runs", point.name))
            launch_file = os.path.join(run_dir, "launch.json")
            if args.resume and os.path.exists(os.path.join(run_dir, "summary.json")) \
                    and os.path.exists(launch_file):
                with open(launch_file) as f:
                    launch = json.load(f)
            else:
                shutil.rmtree(run_dir, ignore_errors=True)
                os.makedirs(run_dir)
                overrides = args.overrides + point.overrides()
                start = time.perf_counter()
                if args.net == "none":
                    launch = run_local(point, run_dir, overrides, args.timeout)
                else:
                    launch = run_emulated(point, run_dir, overrides, args.timeout, args.net)
                launch["elapsed_s"] = time.perf_counter() - start
                with open(launch_file, "w") as f:
                    json.dump(launch, f)
            row = make_row(point, run_dir, launch, model_params)
            rows.append(row)
            write_table(args.out, rows)
            bar.write(_one_line(row, run_dir))
    bar.close()
    failed = [r["name"] for r in rows if r["status"] != "ok"]
    if failed:
        print(f"scaling: {len(failed)} point(s) failed: {failed} (logs in their run directories)",
              file=sys.stderr)
    print(f"results: {os.path.join(args.out, 'results.jsonl')} and results.csv")
    costmodel.print_check(rows)
    if not args.no_report:
        from ..report import write_report

        path = write_report(args.out, args.report_dir)
        print(f"report: {path}")
    return 1 if failed else 0


def _one_line(row: dict, run_dir: str) -> str:
    if row["status"] != "ok":
        return f"{row['name']:<28} FAILED (exit codes {row['returncodes']}; see {run_dir}/*.log)"
    line = (f"{row['name']:<28} {row['steps_per_s']:6.2f} steps/s  {row['samples_per_s']:8.1f} samples/s  "
            f"eval loss {row['eval_loss']:.4f}  {row['bytes_sent_per_step'] / 1e6:8.3f} MB/step/worker")
    if row.get("expected_wire_bytes_rank0"):
        line += f"  tc/expected (rank 0) {row['tc_tx_bytes'][0] / row['expected_wire_bytes_rank0']:.3f}"
    return line


if __name__ == "__main__":
    sys.exit(main())
