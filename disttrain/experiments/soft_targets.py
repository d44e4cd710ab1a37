"""Data for the seed experiment's teacher-student training: splits, top-k soft targets, interleaving.

Seed article (Alexa acoustic model, ICASSP 2019): a bidirectional LSTM teacher
labels a large unlabelled corpus; only its ``k = 20`` highest posteriors per
frame are kept; a unidirectional student is trained on machine-labelled
batches interleaved with labelled ones, the labelled ones at a higher learning
rate.  This module holds the data side of that recipe:

* ``LabelledAcoustic`` (``data=labelled``): the synthetic corpus with a small
  labelled split (the first ``labelled_utts`` training utterances) and a large
  unlabelled split (the rest; its labels are never used for training).
* Top-k store: per frame the class indices (int16, int32 above 32767 classes)
  and float16 probabilities, ``k * (2 + 2)`` bytes a frame against
  ``4 * num_classes`` for dense float32 posteriors (80 against 12,000 bytes
  for the article's 20 of about 3,000 senones).  Shards are ``.npz`` files
  with ``features`` float32 [U, T, F], ``indices`` [U, T, k], ``probs``
  float16 [U, T, k] and ``utts`` int64 [U] (utterance numbers in the
  corpus), written atomically (temp file, fsync, ``os.replace``), listed by a
  ``manifest.json``.
* ``soft_target_loss``: cross-entropy against the renormalised top-k
  distribution, ``-sum_j p_j / (sum_i p_i) * log_softmax(z)[c_j]`` averaged
  over frames (the mass outside the top k is dropped, as in the article).
* ``InterleavedData`` (``data=interleaved``): a stream that puts one labelled
  batch after every ``labelled_every - 1`` machine-labelled ones
  (``schedule=interleaved``), or all machine-labelled batches first and then
  the same number of labelled ones (``schedule=separate``).

Labelled batches get loss weight ``labelled_lr_scale``.  For SGD without
momentum that is exactly a learning-rate scale for those steps.  With momentum
it scales that batch's contribution to the velocity, which is a per-batch
learning rate in the ``v = mu v + lr g; w -= v`` form of momentum (torch's
``w -= lr v`` form would instead scale the whole step, history included).  For
Adam it is not a learning-rate scale at all: Adam divides the scale out.

Example::

    python -m disttrain.train data=labelled model.bidirectional=true   # a teacher
    python -m disttrain.experiments.teacher_student label --model-dir RUN --out TARGETS
    python -m disttrain.train data=interleaved data.targets_dir=TARGETS data.labelled_every=4
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..data import BatchStream, FrameData, FrameSet, SyntheticAcoustic, check_positive

MANIFEST = "manifest.json"
SCHEDULES = ("interleaved", "separate")


class LabelledAcoustic(SyntheticAcoustic):
    """``SyntheticAcoustic`` whose first ``labelled_utts`` training utterances are the labelled split.

    ``train_set`` is the labelled split only; ``unlabelled_set`` hands the
    rest to the labeller (rank r takes unlabelled utterances r, r + N, ...).
    """

    def __init__(self, labelled_utts: int = 256, **corpus) -> None:
        super().__init__(**corpus)
        check_positive(labelled_utts=labelled_utts)
        if labelled_utts >= self.train_utts:
            raise ValueError(f"data.labelled_utts={labelled_utts} must be < data.train_utts="
                             f"{self.train_utts} (the rest is the unlabelled split)")
        self.labelled_utts = labelled_utts

    def train_set(self, rank: int, world_size: int) -> FrameSet:
        if world_size > self.labelled_utts:
            raise ValueError(f"{world_size} workers but data.labelled_utts={self.labelled_utts}: "
                             "every worker needs at least one utterance")
        corpus = self._generate()[0]
        labelled = FrameSet(corpus.features[: self.labelled_utts], corpus.labels[: self.labelled_utts])
        return labelled.shard(rank, world_size)

    def unlabelled_set(self, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's unlabelled utterances: ``(features [U, T, F], utterance numbers [U])``."""
        corpus = self._generate()[0]
        utts = torch.arange(self.labelled_utts, self.train_utts)[rank::world_size]
        return corpus.features[utts], utts


# -- top-k store --------------------------------------------------------------

def index_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.int16) if num_classes <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


def bytes_per_frame(num_classes: int, top_k: int) -> dict:
    """Target storage per frame: top-k (indices + float16) against dense float32 posteriors."""
    return {"topk": top_k * (index_dtype(num_classes).itemsize + 2), "dense": 4 * num_classes}


def topk_posteriors(logits: torch.Tensor, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``top_k`` largest posteriors per frame: (class indices, float16 probabilities)."""
    num_classes = logits.shape[-1]
    if not 1 <= top_k <= num_classes:
        raise ValueError(f"top_k={top_k} must be in [1, {num_classes}] (the number of classes)")
    probs, indices = torch.softmax(logits.float(), dim=-1).topk(top_k, dim=-1)
    return indices.numpy().astype(index_dtype(num_classes)), probs.numpy().astype(np.float16)


def atomic_write(path: str, write) -> None:
    """``write(file)`` into a temp file beside ``path``, fsync it, then rename it over ``path``.

    Readers see the old file or the whole new one, never a partial one; a
    failed write leaves no temp file behind.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_topk_shard(path: str, features: np.ndarray, indices: np.ndarray, probs: np.ndarray,
                     utts: np.ndarray) -> None:
    atomic_write(path, lambda f: np.savez(f, features=features, indices=indices, probs=probs, utts=utts))


class SoftTargets(NamedTuple):
    """Machine labels of a batch: top-k class indices and their probabilities, [B, T, k] each."""

    indices: torch.Tensor
    probs: torch.Tensor


class SoftLabels:
    """Top-k targets of many utterances, indexed like a label tensor (what ``BatchStream`` needs)."""

    def __init__(self, indices: torch.Tensor, probs: torch.Tensor) -> None:
        self.indices, self.probs = indices, probs

    def __getitem__(self, idx) -> SoftTargets:
        return SoftTargets(self.indices[idx], self.probs[idx])


def read_topk_shard(path: str, num_classes: int) -> FrameSet:
    """A shard as a ``FrameSet`` whose labels are ``SoftLabels``; checks shapes, dtypes and ranges."""
    try:
        with np.load(path) as shard:
            feats, indices, probs = shard["features"], shard["indices"], shard["probs"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"top-k shard {path}: cannot read .npz with features, indices, probs ({e})") from None
    if (feats.ndim != 3 or feats.dtype != np.float32 or indices.shape != probs.shape
            or indices.shape[:2] != feats.shape[:2] or probs.dtype != np.float16
            or not np.issubdtype(indices.dtype, np.integer)):
        raise ValueError(f"top-k shard {path}: want features float32 [U, T, F], indices int and probs "
                         f"float16 [U, T, k]; got {feats.dtype} {feats.shape}, {indices.dtype} "
                         f"{indices.shape}, {probs.dtype} {probs.shape}")
    if indices.size and (indices.min() < 0 or indices.max() >= num_classes):
        raise ValueError(f"top-k shard {path}: class indices must lie in [0, {num_classes})")
    return FrameSet(torch.from_numpy(feats),
                    SoftLabels(torch.from_numpy(indices.astype(np.int64)), torch.from_numpy(probs)))


def soft_target_loss(logits: torch.Tensor, targets: SoftTargets) -> torch.Tensor:
    """Mean over frames of ``-sum_j p_j / sum_i p_i * log_softmax(logits)[indices_j]``."""
    probs = targets.probs.float()
    probs = probs / probs.sum(-1, keepdim=True)
    log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.indices.long())
    return -(probs * log_probs).sum(-1).mean()


# -- the interleaved stream ------------------------------------------------------

def is_labelled_step(schedule: str, labelled_every: int, total_steps: int, step: int) -> bool:
    """Is step ``step`` (0-based) a labelled batch?

    interleaved: steps labelled_every-1, 2 labelled_every-1, ... (one in labelled_every);
    separate: the last ``total_steps // labelled_every`` of ``total_steps`` (and any later step),
    so both schedules see the same number of each kind in ``total_steps``.
    """
    if schedule == "interleaved":
        return step % labelled_every == labelled_every - 1
    return step >= total_steps - total_steps // labelled_every


class InterleavedStream:
    """Endless ``(features, targets)``: labels (a tensor) or ``SoftTargets``, in schedule order.

    Its position (the step and both streams' positions) is resumable state.
    """

    def __init__(self, labelled: BatchStream, machine: BatchStream, schedule: str, labelled_every: int,
                 total_steps: int) -> None:
        self.labelled, self.machine = labelled, machine
        self.schedule, self.labelled_every, self.total_steps = schedule, labelled_every, total_steps
        self.step = 0

    def __iter__(self):
        return self

    def __next__(self):
        is_labelled = is_labelled_step(self.schedule, self.labelled_every, self.total_steps, self.step)
        self.step += 1
        return next(self.labelled if is_labelled else self.machine)

    def state_dict(self) -> dict:
        return {"step": self.step, "labelled": self.labelled.state_dict(), "machine": self.machine.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.labelled.load_state_dict(state["labelled"])
        self.machine.load_state_dict(state["machine"])


class InterleavedData(FrameData):
    """Labelled batches from ``labelled`` and machine-labelled ones from the top-k shards in ``targets_dir``.

    Args:
        labelled: the labelled source (any ``FrameData``; its eval set is the eval set).
        targets_dir: the labeller's output (``manifest.json`` and shards).  Read when
            ``batches`` is called, so the config builds before the shards exist.
        schedule: ``interleaved`` or ``separate`` (all machine-labelled, then labelled).
        labelled_every: one labelled batch in every ``labelled_every``.
        labelled_lr_scale: loss weight of labelled batches (see the module docstring).
        total_steps: the run's ``train.steps``; fixes where ``separate`` switches.
    """

    def __init__(self, labelled: FrameData, targets_dir: str | None = None, schedule: str = "interleaved",
                 labelled_every: int = 4, labelled_lr_scale: float = 2.0, total_steps: int = 300) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"data.schedule={schedule!r}: valid values are {', '.join(SCHEDULES)}")
        check_positive(labelled_every=labelled_every, total_steps=total_steps)
        if not isinstance(labelled_lr_scale, (int, float)) or not labelled_lr_scale > 0:
            raise ValueError(f"data.labelled_lr_scale must be a number > 0, got {labelled_lr_scale!r}")
        if targets_dir is not None and not os.path.isfile(os.path.join(targets_dir, MANIFEST)):
            raise ValueError(f"data.targets_dir={targets_dir!r} holds no {MANIFEST}: "
                             "point it at the labeller's --out directory")
        self.labelled, self.targets_dir, self.schedule = labelled, targets_dir, schedule
        self.labelled_every, self.labelled_lr_scale, self.total_steps = labelled_every, labelled_lr_scale, total_steps
        self.feat_dim, self.num_classes = labelled.feat_dim, labelled.num_classes

    def eval_set(self) -> FrameSet:
        return self.labelled.eval_set()

    def machine_set(self, rank: int, world_size: int) -> FrameSet:
        """This rank's top-k shards (round robin over the manifest's files), concatenated."""
        if self.targets_dir is None:
            raise ValueError("data.targets_dir is not set: run the labeller and pass its --out directory")
        with open(os.path.join(self.targets_dir, MANIFEST)) as f:
            manifest = json.load(f)
        if (manifest["num_classes"], manifest["feat_dim"]) != (self.num_classes, self.feat_dim):
            raise ValueError(f"data.targets_dir={self.targets_dir!r} was labelled for {manifest['num_classes']} "
                             f"classes and {manifest['feat_dim']} features, the labelled data has "
                             f"{self.num_classes} and {self.feat_dim}")
        files = manifest["files"][rank::world_size]
        if not files:
            raise ValueError(f"{world_size} workers but data.targets_dir has only {len(manifest['files'])} "
                             "top-k shards: label with more --shards-per-rank")
        sets = [read_topk_shard(os.path.join(self.targets_dir, name), self.num_classes) for name in files]
        return FrameSet(torch.cat([s.features for s in sets]),
                        SoftLabels(torch.cat([s.labels.indices for s in sets]),
                                   torch.cat([s.labels.probs for s in sets])))

    def batches(self, rank: int, world_size: int, batch_size: int, seed: int) -> InterleavedStream:
        # Different seeds so the two permutations are not tied to each other.
        labelled = self.labelled.batches(rank, world_size, batch_size, seed)
        machine = BatchStream(self.machine_set(rank, world_size), batch_size, seed + 1, rank)
        return InterleavedStream(labelled, machine, self.schedule, self.labelled_every, self.total_steps)

    def loss(self, logits: torch.Tensor, targets) -> torch.Tensor:
        if isinstance(targets, SoftTargets):
            return soft_target_loss(logits, targets)
        return self.labelled_lr_scale * nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
