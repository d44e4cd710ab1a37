"""The training loop: ``python -m disttrain.train [overrides]``, under torchrun, mpiexec or alone.

Reads top to bottom: build every component from its config group, attach the
synchronizer to the optimizer, loop, write the run directory.  The only
synchronizer-specific code is inside ``optimizer.step()``, through the hooks
``Synchronizer.attach`` registers (see disttrain/sync/base.py).

Run directory (``hydra.run.dir``), written by rank 0 only:
    metrics.jsonl   one record per logged step
    summary.json    the run's figures and the resolved config
    model.pt        the final model's state_dict
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

import hydra
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import CONF_DIR, ConfigError, check_components, check_config
from .checkpoint import Checkpointer, model_signature
from .comm import CommError
from .data import to_device
from .models import evaluate

log = logging.getLogger("disttrain")


def run(cfg: DictConfig, run_dir: str) -> dict:
    """Train as ``cfg`` says, write ``run_dir``, return the summary (on every rank)."""
    check_config(cfg)
    check_components(cfg)
    comm = instantiate(cfg.comm)
    master = comm.rank == 0  # only rank 0 logs and writes shared files
    device = getattr(comm, "device", torch.device("cpu"))
    torch.manual_seed(cfg.train.seed)

    data = instantiate(cfg.data)
    batches = data.batches(comm.rank, comm.world_size, cfg.train.batch_size, cfg.train.seed)
    eval_set = data.eval_set() if master else None
    model = instantiate(cfg.model, input_dim=data.feat_dim, num_classes=data.num_classes).to(device)
    optimizer = instantiate(cfg.optim)(model.parameters())
    sync = instantiate(cfg.sync, comm=comm)

    checkpoints = Checkpointer(run_dir, comm, cfg.train.checkpoint_every, cfg.train.keep_checkpoints)
    progress = _progress_bar(cfg, master)
    samples_per_step = cfg.train.batch_size * comm.world_size
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # (sum, count) since last log
    eval_loss = eval_acc = float("nan")
    first_step, wall_before = 1, 0.0
    with sync.attach(model, optimizer):
        if cfg.train.resume == "auto":
            state = checkpoints.load_latest(_run_identity(model, sync, comm))
            if state is not None:
                _restore(state, model, optimizer, sync, batches, comm)
                first_step, wall_before = state["step"] + 1, state["wall_s"]
                loss_sum.copy_(state["loss_sum"])
        metrics = _open_metrics(run_dir, first_step) if master else None
        if first_step > cfg.train.steps:
            log.info("the run already reached train.steps=%d: raise train.steps to carry it on",
                     cfg.train.steps)
            sync.finish()
            if master:
                eval_loss, eval_acc = evaluate(model, eval_set.features, eval_set.labels)
        progress.update(first_step - 1)
        start = time.perf_counter() - wall_before
        for step in range(first_step, cfg.train.steps + 1):
            features, targets = to_device(next(batches), device)
            loss = data.loss(model(features), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()  # the synchronizer exchanges gradients / models in hooks here
            loss_sum[0] += loss.detach()  # stays on the device: no sync per step
            loss_sum[1] += 1
            progress.update()

            last = step == cfg.train.steps
            evaluating = last or (cfg.train.eval_every and step % cfg.train.eval_every == 0)
            logging_now = evaluating or step % cfg.train.log_every == 0
            if checkpoints.due(step, cfg.train.steps):  # before finish(): resumable mid-block
                pending_loss = torch.zeros_like(loss_sum) if logging_now else loss_sum
                checkpoints.save(step, _snapshot(step, model, optimizer, sync, batches, comm, pending_loss,
                                                 time.perf_counter() - start))
            if last:
                sync.finish()
            if not logging_now:
                continue
            with comm.uncounted():  # logging traffic is not the synchronizer's
                comm.all_reduce_(loss_sum)
            record = {"step": step, "samples": step * samples_per_step,
                      "train_loss": float(loss_sum[0] / loss_sum[1]),
                      "wall_s": time.perf_counter() - start}
            loss_sum.zero_()
            if master and evaluating:
                eval_loss, eval_acc = evaluate(model, eval_set.features, eval_set.labels)
                record.update(eval_loss=eval_loss, eval_acc=eval_acc)
            record.update(_scalar_stats(sync.stats()))
            if master:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                progress.set_postfix(loss=f"{record['train_loss']:.3f}", refresh=False)
                if evaluating:
                    log.info("step %d  train loss %.4f  eval loss %.4f  eval acc %.4f",
                             step, record["train_loss"], eval_loss, eval_acc)
    wall_s = time.perf_counter() - start
    progress.close()

    stats = sync.stats()
    # Ranks send different amounts (rank 0's initial broadcast, GTC's message sizes): report the mean.
    per_worker = torch.tensor([stats["bytes_sent"], stats["comm_s"]], dtype=torch.float64, device=device)
    with comm.uncounted():
        comm.all_reduce_(per_worker)
    bytes_mean, comm_s_mean = (per_worker / comm.world_size).tolist()
    summary = {
        "sync": sync.name, "world_size": comm.world_size, "steps": cfg.train.steps,
        "samples": cfg.train.steps * samples_per_step, "wall_s": wall_s,
        "samples_per_s": cfg.train.steps * samples_per_step / wall_s,
        "eval_loss": eval_loss, "eval_acc": eval_acc,
        "bytes_sent_per_step": bytes_mean / cfg.train.steps,  # mean over workers
        "comm_s": comm_s_mean, "stats": stats,  # stats: rank 0's own figures
        "checkpoint_bytes": checkpoints.last_bytes, "checkpoint_s": checkpoints.last_seconds,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if master:
        metrics.close()
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, os.path.join(run_dir, "model.pt"))
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        log.info("done: %d steps, %.1f samples/s, eval loss %.4f, eval acc %.4f, %.0f bytes/step/worker",
                 cfg.train.steps, summary["samples_per_s"], eval_loss, eval_acc,
                 summary["bytes_sent_per_step"])
    comm.close()
    return summary


def _run_identity(model, sync, comm) -> dict:
    """What a checkpoint must match to be resumed by this run."""
    return {"model_signature": model_signature(model), "world_size": comm.world_size, "sync": sync.name}


def _snapshot(step, model, optimizer, sync, batches, comm, loss_sum, wall_s) -> dict:
    """Everything that makes a resumed run continue bit for bit, for this rank."""
    import random

    import numpy as np

    return {
        "step": step, "rank": comm.rank, "wall_s": wall_s, "loss_sum": loss_sum.cpu().clone(),
        **_run_identity(model, sync, comm),
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "sync_state": sync.state_dict(), "data": batches.state_dict(), "comm_stats": comm.stats,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }


def _restore(state, model, optimizer, sync, batches, comm) -> None:
    import random

    import numpy as np

    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    sync.load_state_dict(state["sync_state"])
    batches.load_state_dict(state["data"])
    comm.stats = state["comm_stats"]
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def _open_metrics(run_dir: str, first_step: int):
    """metrics.jsonl for appending; on resume, records after the checkpoint are dropped."""
    path = os.path.join(run_dir, "metrics.jsonl")
    kept = []
    if first_step > 1 and os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] < first_step]
    metrics = open(path, "w")
    metrics.writelines(kept)
    return metrics


def _scalar_stats(stats: dict) -> dict:
    """The synchronizer's figures that fit one metrics record (numbers only)."""
    return {k: v for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _progress_bar(cfg: DictConfig, master: bool):
    from tqdm import tqdm

    # disable=None hides the bar when stderr is not a terminal (CI logs, files).
    return tqdm(total=cfg.train.steps, disable=None if (master and cfg.train.progress) else True,
                desc="train", unit="step", dynamic_ncols=True)


def _one_line(error: BaseException) -> str:
    # Hydra wraps a constructor's ValueError; the cause names the key.
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        run(cfg, HydraConfig.get().runtime.output_dir)
    except (ConfigError, ValueError, InstantiationException, OmegaConfBaseException) as error:
        print(f"disttrain: error: {_one_line(error)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except CommError as error:  # a peer is gone: say so in one line, exit non-zero at once
        print(f"disttrain: error: {_one_line(error)}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
