"""The seed experiment: a teacher labels unlabelled data, students learn from labels and top-k posteriors.

Seed article (Alexa acoustic model, ICASSP 2019): a 5-layer bidirectional LSTM
teacher (78M parameters) labels the unlabelled corpus keeping its 20 highest
posteriors per frame; a 5-layer unidirectional LSTM student (24M) is trained on
labelled and machine-labelled batches interleaved, labelled ones at a higher
learning rate; interleaving beat training on the two separately.  Here, on the
synthetic corpus (disttrain/data.py: confusable class pairs told apart only by
a marker at the end of each segment, so looking ahead helps), the stages are:

1. teacher: bidirectional LSTM, about 3x the student's parameters, trained by
   ``disttrain.train.run`` on the labelled split (``data=labelled``);
2. label: every rank runs the teacher over its shard of the unlabelled split
   and stores the top-k posteriors (soft_targets.py: int16 indices, float16
   probabilities, atomic .npz shards, a manifest with the storage figures);
3. students (unidirectional LSTMs, same steps each): on the labelled split
   only (plain cross-entropy, no loss weight); ``data=interleaved`` with
   ``schedule=interleaved``; the same with ``schedule=separate`` (all
   machine-labelled batches first, then the same number of labelled ones as
   the interleaved student saw).

Commands::

    # the whole pipeline, one worker, in this process -> OUT/teacher_student.json
    python -m disttrain.experiments.teacher_student run --out OUT [--preset small] [--sync gtc]
    # N workers: re-launches itself under torchrun --standalone --nproc-per-node N
    # (the same as: torchrun --standalone --nproc-per-node 2 -m disttrain.experiments.teacher_student run ...)
    python -m disttrain.experiments.teacher_student run --out OUT --workers 2 --sync bmuf
    # only the labelling, for a teacher trained by python -m disttrain.train data=labelled ...
    torchrun --nproc-per-node 2 -m disttrain.experiments.teacher_student label --model-dir RUN --out TARGETS

Every stage runs on all ranks of one process group (created once, joined by
every ``disttrain.train.run``); ``--sync`` picks the synchronizer of every
training stage (``gtc`` also sets ``optim.momentum=0``: its momentum correction
replaces the optimizer's momentum).  ``--set KEY=VALUE`` adds a Hydra override
to every training stage.

teacher_student.json holds the eval frame accuracy (and loss) of the teacher
and the three students, the parameter counts, the top-k storage against dense
float32 posteriors (bytes per frame) and the loader's frames per second.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ..comm import TorchCommunicator
from ..comm.base import Communicator
from ..config import CONF_DIR, compose
from ..train import run
from .soft_targets import (MANIFEST, InterleavedData, atomic_write, bytes_per_frame, index_dtype, topk_posteriors,
                           write_topk_shard)

# Corpus and run sizes.  "small" finishes in a few minutes on 2 cores; "tiny" is for tests.
PRESETS = {
    "small": {
        "corpus": {"labelled_utts": 128, "train_utts": 128 + 2048, "eval_utts": 256, "utt_len": 32},
        "teacher": {"hidden": 72, "layers": 2, "steps": 300},
        "student": {"hidden": 64, "layers": 2, "steps": 400},
        "batch_size": 16, "labelled_every": 4, "labelled_lr_scale": 2.0,
    },
    "tiny": {
        "corpus": {"labelled_utts": 16, "train_utts": 16 + 32, "eval_utts": 16, "utt_len": 16},
        "teacher": {"hidden": 24, "layers": 1, "steps": 8},
        "student": {"hidden": 16, "layers": 1, "steps": 8},
        "batch_size": 4, "labelled_every": 2, "labelled_lr_scale": 2.0,
    },
}
SYNC_OVERRIDES = {"allreduce": [], "gtc": ["optim.momentum=0"], "bmuf": []}


# -- labelling ------------------------------------------------------------------

def _shard_name(rank: int, part: int) -> str:
    return f"topk-{rank:05d}-{part:03d}.npz"


@torch.no_grad()
def label(model_dir: str, out_dir: str, comm: Communicator, top_k: int = 20, shards_per_rank: int = 2,
          batch_size: int = 64) -> dict:
    """Label this rank's shard of the unlabelled split with the teacher in ``model_dir``.

    Rank r writes ``topk-<r>-<part>.npz`` for its utterances r, r + N, ...;
    rank 0 writes ``manifest.json`` (the file list and storage figures) once
    every rank is done, so a manifest never names a missing shard.  Returns
    the manifest on every rank.
    """
    if top_k < 1 or shards_per_rank < 1:
        raise ValueError(f"--top-k={top_k} and --shards-per-rank={shards_per_rank} must be >= 1")
    if comm.rank == 0 and os.path.exists(os.path.join(out_dir, MANIFEST)):
        os.unlink(os.path.join(out_dir, MANIFEST))  # stale until this labelling is complete
    comm.barrier()  # rank 0 writes the teacher's files at the end of its run: wait for them
    with open(os.path.join(model_dir, "summary.json")) as f:
        cfg = OmegaConf.create(json.load(f)["config"])
    data = instantiate(cfg.data)
    if not hasattr(data, "unlabelled_set"):
        raise ValueError(f"the teacher in {model_dir} was trained on {cfg.data._target_}, which has no "
                         "unlabelled split: train it with data=labelled")
    model = instantiate(cfg.model, input_dim=data.feat_dim, num_classes=data.num_classes)
    model.load_state_dict(torch.load(os.path.join(model_dir, "model.pt")))
    model.eval()
    os.makedirs(out_dir, exist_ok=True)
    start = time.perf_counter()
    features, utts = data.unlabelled_set(comm.rank, comm.world_size)
    parts = min(len(utts), shards_per_rank)
    for part in range(parts):
        feats, ids = features[part::parts], utts[part::parts]
        logits = torch.cat([model(feats[i: i + batch_size]) for i in range(0, len(feats), batch_size)])
        indices, probs = topk_posteriors(logits, top_k)
        write_topk_shard(os.path.join(out_dir, _shard_name(comm.rank, part)), feats.numpy(), indices, probs,
                         ids.numpy())
    totals = torch.tensor([features.shape[0] * features.shape[1], time.perf_counter() - start],
                          dtype=torch.float64)
    comm.all_reduce_(totals)

    unlabelled = data.train_utts - data.labelled_utts
    files = [_shard_name(r, p) for r in range(comm.world_size)
             for p in range(min(len(range(r, unlabelled, comm.world_size)), shards_per_rank))]
    per_frame = bytes_per_frame(data.num_classes, top_k)
    frames = int(totals[0])
    manifest = {
        "teacher": os.path.abspath(model_dir), "top_k": top_k, "num_classes": data.num_classes,
        "feat_dim": data.feat_dim, "utt_len": data.utt_len, "index_dtype": str(index_dtype(data.num_classes)),
        "prob_dtype": "float16", "files": files, "utterances": unlabelled, "frames": frames,
        "bytes_per_frame_topk": per_frame["topk"], "bytes_per_frame_dense": per_frame["dense"],
        "target_bytes_topk": frames * per_frame["topk"], "target_bytes_dense": frames * per_frame["dense"],
        "labelling_frames_per_s": frames / (float(totals[1]) / comm.world_size),
        "workers": comm.world_size,
    }
    comm.barrier()
    if comm.rank == 0:
        atomic_write(os.path.join(out_dir, MANIFEST), lambda f: f.write(json.dumps(manifest, indent=2).encode()))
    comm.barrier()
    return manifest


# -- the pipeline -----------------------------------------------------------------

def _loader_speed(data: InterleavedData, batch_size: int, batches: int = 200) -> dict:
    """Frames per second reading the top-k shards from disk, and drawing interleaved batches."""
    start = time.perf_counter()
    frames = data.machine_set(0, 1).features.shape[:2].numel()
    read_s = time.perf_counter() - start
    stream = data.batches(0, 1, batch_size, seed=0)
    start = time.perf_counter()
    drawn = sum(next(stream)[0].shape[:2].numel() for _ in range(batches))
    return {"shard_read_frames_per_s": frames / read_s,
            "stream_frames_per_s": drawn / (time.perf_counter() - start)}


def _param_count(run_dir: str) -> int:
    return sum(v.numel() for v in torch.load(os.path.join(run_dir, "model.pt")).values())


def run_pipeline(out_dir: str, preset: str = "small", sync: str = "allreduce", overrides: tuple[str, ...] | list[str] = (),
                 top_k: int = 20) -> dict:
    """Teacher, labelling, three students; writes ``out_dir/teacher_student.json`` (rank 0), returns it."""
    if preset not in PRESETS:
        raise ValueError(f"--preset={preset!r}: valid values are {', '.join(PRESETS)}")
    if sync not in SYNC_OVERRIDES or not os.path.isfile(os.path.join(CONF_DIR, "sync", f"{sync}.yaml")):
        available = [s for s in SYNC_OVERRIDES if os.path.isfile(os.path.join(CONF_DIR, "sync", f"{s}.yaml"))]
        raise ValueError(f"--sync={sync!r}: valid values are {', '.join(available)}")
    p = PRESETS[preset]
    corpus = [f"{k}={v}" for k, v in p["corpus"].items()]
    common = [f"sync={sync}", *SYNC_OVERRIDES[sync], f"train.batch_size={p['batch_size']}",
              "train.eval_every=0", "train.progress=false", "model=lstm",
              # every stage starts fresh: a stale run dir must not be resumed into this one
              "train.checkpoint_every=0", "train.resume=never", *overrides]

    def lstm(role: str, bidirectional: bool) -> list[str]:
        m = p[role]
        return [f"model.hidden={m['hidden']}", f"model.layers={m['layers']}",
                f"model.bidirectional={str(bidirectional).lower()}", f"train.steps={m['steps']}"]

    targets_dir = os.path.join(out_dir, "targets")
    interleaved = ["data=interleaved", *[f"data.labelled.{c}" for c in corpus], f"data.targets_dir={targets_dir}",
                   f"data.labelled_every={p['labelled_every']}", f"data.labelled_lr_scale={p['labelled_lr_scale']}"]
    stages = {
        "teacher": ["data=labelled", *[f"data.{c}" for c in corpus], *lstm("teacher", True)],
        "student_labelled": ["data=labelled", *[f"data.{c}" for c in corpus], *lstm("student", False)],
        "student_interleaved": [*interleaved, "data.schedule=interleaved", *lstm("student", False)],
        "student_separate": [*interleaved, "data.schedule=separate", *lstm("student", False)],
    }
    comm = TorchCommunicator()  # one process group for every stage (train.run joins it)
    try:
        summaries, wall = {}, {}
        for name, stage in stages.items():
            run_dir = os.path.join(out_dir, name)
            os.makedirs(run_dir, exist_ok=True)
            start = time.perf_counter()
            summaries[name] = run(compose(common + stage), run_dir)
            wall[name] = time.perf_counter() - start
            if name == "teacher":
                start = time.perf_counter()
                manifest = label(run_dir, targets_dir, comm, top_k=top_k)
                wall["label"] = time.perf_counter() - start
        result = None
        if comm.rank == 0:
            data = instantiate(compose(common + stages["student_interleaved"]).data)
            teacher_params = _param_count(os.path.join(out_dir, "teacher"))
            student_params = _param_count(os.path.join(out_dir, "student_labelled"))
            result = {
                "preset": preset, "sync": sync, "workers": comm.world_size, "overrides": list(overrides),
                "corpus": {**p["corpus"], "unlabelled_utts": p["corpus"]["train_utts"] - p["corpus"]["labelled_utts"],
                           "num_classes": data.num_classes},
                "eval_acc": {k: s["eval_acc"] for k, s in summaries.items()},
                "eval_loss": {k: s["eval_loss"] for k, s in summaries.items()},
                "params": {"teacher": teacher_params, "student": student_params,
                           "ratio": teacher_params / student_params},
                "storage": {k: manifest[k] for k in ("top_k", "index_dtype", "prob_dtype", "frames",
                                                     "bytes_per_frame_topk", "bytes_per_frame_dense",
                                                     "target_bytes_topk", "target_bytes_dense",
                                                     "labelling_frames_per_s")},
                "storage_at_3000_classes": bytes_per_frame(3000, top_k),  # the article's output layer
                "loader": _loader_speed(data, p["batch_size"]),
                "wall_s": wall,
            }
            atomic_write(os.path.join(out_dir, "teacher_student.json"),
                         lambda f: f.write(json.dumps(result, indent=2).encode()))
        comm.barrier()
        return result
    finally:
        comm.close()


def _without_workers(argv: list[str]) -> list[str]:
    """The command line minus ``--workers N`` / ``--workers=N`` (for the re-launched workers)."""
    out, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--workers="):
            skip = False
        elif arg == "--workers":
            skip = True
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m disttrain.experiments.teacher_student",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="the whole pipeline -> OUT/teacher_student.json")
    p_run.add_argument("--out", required=True, help="output directory")
    p_run.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p_run.add_argument("--sync", default="allreduce", help="allreduce | gtc | bmuf (where conf/sync has it)")
    p_run.add_argument("--workers", type=int, default=1, help="N > 1: re-launch under torchrun --standalone")
    p_run.add_argument("--top-k", type=int, default=20)
    p_run.add_argument("--threads", type=int, default=1,
                       help="torch threads per worker (small LSTMs gain little from more; a busy machine loses)")
    p_run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="Hydra override for every training stage (repeatable)")
    p_label = sub.add_parser("label", help="top-k labelling of the unlabelled split, every rank its shard")
    p_label.add_argument("--model-dir", required=True, help="a teacher's run directory (data=labelled)")
    p_label.add_argument("--out", required=True, help="directory for the shards and manifest.json")
    p_label.add_argument("--top-k", type=int, default=20)
    p_label.add_argument("--shards-per-rank", type=int, default=2)
    args = parser.parse_args(argv)

    try:
        if args.command == "label":
            comm = TorchCommunicator()
            try:
                manifest = label(args.model_dir, args.out, comm, args.top_k, args.shards_per_rank)
            finally:
                comm.close()
            if comm.rank == 0:
                print(json.dumps({k: v for k, v in manifest.items() if k != "files"}, indent=2))
        elif args.workers > 1 and "RANK" not in os.environ:
            sys.exit(subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                      f"--nproc-per-node={args.workers}", "-m", __spec__.name,
                                      *_without_workers(sys.argv[1:] if argv is None else argv)]))
        else:
            torch.set_num_threads(args.threads)
            result = run_pipeline(args.out, args.preset, args.sync, args.set, args.top_k)
            if result is not None:
                print(json.dumps({k: result[k] for k in ("eval_acc", "params", "storage", "loader")}, indent=2))
    except ValueError as error:
        print(f"teacher_student: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
