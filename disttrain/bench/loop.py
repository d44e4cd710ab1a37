"""One-worker ``disttrain.train`` against a plain PyTorch loop on the same model and data.

    python -m disttrain.bench.loop [--steps 200] [--repeats 3] [overrides ...]

The framework's overhead per step (hooks, synchronizer, logging, metrics)
should be invisible: the steps/s ratio framework / plain should be >= 0.95.
Both sides do the same work: the same batches from the same stream, the same
model, optimizer and final evaluation; setup (data generation, model
construction) is outside both timings.  Runs alternate so drift on a shared
machine hits both; the best of ``--repeats`` is reported.  Last line: JSON.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from hydra.utils import instantiate

from ..config import compose
from ..models import evaluate, frame_loss
from ..train import run


def plain_loop(cfg) -> float:
    """The 30-line loop a user would write by hand; returns steps/s."""
    torch.manual_seed(cfg.train.seed)
    data = instantiate(cfg.data)
    batches = data.batches(0, 1, cfg.train.batch_size, cfg.train.seed)
    eval_set = data.eval_set()
    model = instantiate(cfg.model, input_dim=data.feat_dim, num_classes=data.num_classes)
    optimizer = instantiate(cfg.optim)(model.parameters())
    start = time.perf_counter()
    for _ in range(cfg.train.steps):
        features, labels = next(batches)
        loss = frame_loss(model(features), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    evaluate(model, eval_set.features, eval_set.labels)
    return cfg.train.steps / (time.perf_counter() - start)


def framework(cfg) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        summary = run(cfg, run_dir)
    return summary["steps"] / summary["wall_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=mlp")
    args = parser.parse_args()
    cfg = compose([f"train.steps={args.steps}", "train.eval_every=0", "train.progress=false",
                   *args.overrides])
    plain, ours = [], []
    for _ in range(args.repeats):
        plain.append(plain_loop(cfg))
        ours.append(framework(cfg))
    result = {"model": cfg.model._target_.rsplit(".", 1)[-1], "steps": args.steps,
              "threads": torch.get_num_threads(), "plain_steps_per_s": max(plain),
              "disttrain_steps_per_s": max(ours), "ratio": max(ours) / max(plain)}
    print(f"plain loop      {result['plain_steps_per_s']:8.2f} steps/s  (runs: "
          + ", ".join(f"{x:.2f}" for x in plain) + ")")
    print(f"disttrain.train {result['disttrain_steps_per_s']:8.2f} steps/s  (runs: "
          + ", ".join(f"{x:.2f}" for x in ours) + ")")
    print(f"ratio disttrain / plain: {result['ratio']:.3f}  (target >= 0.95)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
