"""Frame-classification data: a synthetic acoustic corpus and features on disk.

Both sources hand out the same thing: utterances of ``utt_len`` frames, each
frame a float32 feature vector with an integer class label, as batches
``features [B, T, F]`` and ``labels [B, T]``.  Each rank reads a disjoint
shard (rank r takes utterances or files r, r + N, r + 2N, ...).

The synthetic corpus (``SyntheticAcoustic``) imitates what makes acoustic
modelling a sequence problem rather than a per-frame lookup:

* labels come from a Markov chain over classes (each class has a few likely
  successors) with segment durations drawn between ``min_dur`` and ``max_dur``
  frames - like senones in a phone sequence;
* classes come in confusable pairs (2j, 2j+1) whose segments share one mean
  vector; only the last ``tail`` frames of a segment carry a marker that
  tells the pair apart, so a model that can look ahead (a bidirectional LSTM)
  can label the whole segment while a unidirectional one must guess until the
  marker arrives or infer it from the preceding segments;
* Gaussian noise on every frame.

Everything is generated from ``seed`` alone, so every rank builds the same
corpus and takes its own shard of it.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class FrameSet:
    """Utterances as dense tensors: ``features [U, T, F]`` float32, ``labels [U, T]`` int64."""

    features: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.features.shape[0]

    def shard(self, rank: int, world_size: int) -> "FrameSet":
        return FrameSet(self.features[rank::world_size], self.labels[rank::world_size])


class BatchStream:
    """Endless shuffled batches over one rank's shard; its position is resumable state.

    Each epoch is a fresh permutation drawn from ``(seed, rank, epoch)``, so the
    order is reproducible and different on every rank.
    """

    def __init__(self, frames: FrameSet, batch_size: int, seed: int, rank: int = 0) -> None:
        if len(frames) < batch_size:
            raise ValueError(
                f"this rank's data shard has {len(frames)} utterances, fewer than "
                f"train.batch_size={batch_size}: use more data or fewer workers")
        self.frames, self.batch_size, self.seed, self.rank = frames, batch_size, seed, rank
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.rank) * 1_000_033 + self.epoch)
        return torch.randperm(len(self.frames), generator=g)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cursor + self.batch_size > len(self._order):  # drop the ragged tail
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation()
        idx = self._order[self.cursor: self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return self.frames.features[idx], self.frames.labels[idx]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation()


class FrameData:
    """What the training loop needs from a data source.

    ``batches`` yields ``(features, targets)``; ``loss(logits, targets)`` turns
    the model's output into the training loss.  Here targets are frame labels
    and the loss is frame cross-entropy; a source with other targets (the
    teacher-student soft labels, say) overrides both.
    """

    feat_dim: int
    num_classes: int

    def loss(self, logits: torch.Tensor, targets) -> torch.Tensor:
        from .models import frame_loss

        return frame_loss(logits, targets)

    def train_set(self, rank: int, world_size: int) -> FrameSet:
        raise NotImplementedError

    def eval_set(self) -> FrameSet:
        raise NotImplementedError

    def batches(self, rank: int, world_size: int, batch_size: int, seed: int) -> BatchStream:
        return BatchStream(self.train_set(rank, world_size), batch_size, seed, rank)


def check_positive(**values) -> None:
    """Each ``data.KEY=value`` must be a positive integer; the error names the key."""
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"data.{key} must be a positive integer, got {value!r}")


class SyntheticAcoustic(FrameData):
    """A deterministic, learnable acoustic-like corpus (see the module docstring)."""

    def __init__(self, num_classes: int = 32, feat_dim: int = 40, utt_len: int = 64,
                 train_utts: int = 4096, eval_utts: int = 256, min_dur: int = 3, max_dur: int = 10,
                 tail: int = 2, noise: float = 3.0, seed: int = 1234) -> None:
        check_positive(num_classes=num_classes, feat_dim=feat_dim, utt_len=utt_len,
                        train_utts=train_utts, eval_utts=eval_utts, min_dur=min_dur,
                        max_dur=max_dur, tail=tail)
        if num_classes < 2 or num_classes % 2:
            raise ValueError(f"data.num_classes must be an even number >= 2 (classes come in pairs), got {num_classes}")
        if max_dur < min_dur:
            raise ValueError(f"data.max_dur={max_dur} must be >= data.min_dur={min_dur}")
        if tail >= min_dur:
            raise ValueError(f"data.tail={tail} must be < data.min_dur={min_dur}")
        if not noise >= 0:
            raise ValueError(f"data.noise must be >= 0, got {noise}")
        self.num_classes, self.feat_dim, self.utt_len = num_classes, feat_dim, utt_len
        self.train_utts, self.eval_utts = train_utts, eval_utts
        self.min_dur, self.max_dur, self.tail, self.noise, self.seed = min_dur, max_dur, tail, noise, seed
        self._corpus: FrameSet | None = None

    def train_set(self, rank: int, world_size: int) -> FrameSet:
        if world_size > self.train_utts:
            raise ValueError(f"{world_size} workers but data.train_utts={self.train_utts}: "
                             "every worker needs at least one utterance")
        return self._generate()[0].shard(rank, world_size)

    def eval_set(self) -> FrameSet:
        return self._generate()[1]

    def _generate(self) -> tuple[FrameSet, FrameSet]:
        if self._corpus is None:
            g = torch.Generator().manual_seed(self.seed)
            pairs = self.num_classes // 2
            means = torch.randn(pairs, self.feat_dim, generator=g)
            markers = torch.randn(pairs, self.feat_dim, generator=g)
            # Each class prefers 3 successors (80% of the mass), the rest share 20%.
            transitions = torch.full((self.num_classes, self.num_classes), 0.2 / self.num_classes)
            for k in range(self.num_classes):
                transitions[k, torch.randperm(self.num_classes, generator=g)[:3]] += 0.8 / 3
            total = self.train_utts + self.eval_utts
            labels, tails = self._label_sequences(total, transitions, g)
            pair, parity = labels // 2, (labels % 2).float() * 2 - 1
            features = means[pair] + tails.unsqueeze(-1) * parity.unsqueeze(-1) * markers[pair]
            features += self.noise * torch.randn(features.shape, generator=g)
            self._corpus = (FrameSet(features[: self.train_utts], labels[: self.train_utts]),
                            FrameSet(features[self.train_utts:], labels[self.train_utts:]))
        return self._corpus

    def _label_sequences(self, utts: int, transitions: torch.Tensor, g: torch.Generator):
        frames = torch.arange(self.utt_len)
        labels = torch.empty(utts, self.utt_len, dtype=torch.int64)
        tails = torch.zeros(utts, self.utt_len)
        # Start each utterance mid-segment so the first frames are not special.
        start = -torch.randint(0, self.max_dur, (utts,), generator=g)
        state = torch.randint(0, self.num_classes, (utts,), generator=g)
        while bool((start < self.utt_len).any()):
            dur = torch.randint(self.min_dur, self.max_dur + 1, (utts,), generator=g)
            end = start + dur
            inside = (frames >= start[:, None]) & (frames < end[:, None])
            labels = torch.where(inside, state[:, None], labels)
            tails = torch.where(inside & (frames >= (end - self.tail)[:, None]), 1.0, tails)
            start = end
            state = torch.multinomial(transitions[state], 1, generator=g).squeeze(1)
        return labels, tails


class FeatureFiles(FrameData):
    """Features on disk: ``.npz`` shards holding ``features`` float32 [T, F] and ``labels`` int [T].

    Train shards are assigned to ranks round-robin by sorted file name; each
    shard is cut into utterances of ``utt_len`` frames (a ragged end is dropped).
    """

    def __init__(self, train_dir: str, eval_dir: str, num_classes: int, utt_len: int = 64) -> None:
        check_positive(num_classes=num_classes, utt_len=utt_len)
        self.train_files = self._list("train_dir", train_dir)
        self.eval_files = self._list("eval_dir", eval_dir)
        self.num_classes, self.utt_len = num_classes, utt_len
        self.feat_dim = self._load(self.train_files[0]).features.shape[-1]

    @staticmethod
    def _list(key: str, directory: str) -> list[str]:
        if not directory or not os.path.isdir(directory):
            raise ValueError(f"data.{key}={directory!r} is not a directory of .npz feature shards")
        files = sorted(glob.glob(os.path.join(directory, "*.npz")))
        if not files:
            raise ValueError(f"data.{key}={directory!r} holds no .npz feature shards")
        return files

    def _load(self, path: str) -> FrameSet:
        try:
            with np.load(path) as shard:
                feats, labels = shard["features"], shard["labels"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"feature shard {path}: cannot read it as .npz with arrays "
                             f"'features' [T, F] float32 and 'labels' [T] int ({e})") from None
        if feats.ndim != 2 or feats.dtype != np.float32:
            raise ValueError(f"feature shard {path}: 'features' must be float32 [T, F], "
                             f"got {feats.dtype} {list(feats.shape)}")
        if labels.shape != (feats.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"feature shard {path}: 'labels' must be integers [T] with T={feats.shape[0]}, "
                             f"got {labels.dtype} {list(labels.shape)}")
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"feature shard {path}: labels must lie in [0, data.num_classes="
                             f"{self.num_classes}), found {labels.min()}..{labels.max()}")
        if hasattr(self, "feat_dim") and feats.shape[1] != self.feat_dim:
            raise ValueError(f"feature shard {path} has {feats.shape[1]} features per frame, "
                             f"the first train shard has {self.feat_dim}")
        n = feats.shape[0] // self.utt_len * self.utt_len
        return FrameSet(torch.from_numpy(feats[:n]).view(-1, self.utt_len, feats.shape[1]),
                        torch.from_numpy(labels[:n].astype(np.int64)).view(-1, self.utt_len))

    def _concat(self, files: list[str]) -> FrameSet:
        sets = [self._load(f) for f in files]
        return FrameSet(torch.cat([s.features for s in sets]), torch.cat([s.labels for s in sets]))

    def train_set(self, rank: int, world_size: int) -> FrameSet:
        if world_size > len(self.train_files):
            raise ValueError(f"{world_size} workers but data.train_dir has only "
                             f"{len(self.train_files)} shards: each worker needs at least one")
        return self._concat(self.train_files[rank::world_size])

    def eval_set(self) -> FrameSet:
        return self._concat(self.eval_files)


def to_device(obj, device: torch.device):
    """Move a tensor, or a (named) tuple or dict of tensors, to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple):
        moved = [to_device(v, device) for v in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else tuple(moved)
    return obj


def write_feature_shards(frames: FrameSet, directory: str, num_shards: int) -> list[str]:
    """Write ``frames`` as ``num_shards`` .npz files in the format ``FeatureFiles`` reads."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i in range(num_shards):
        part = frames.shard(i, num_shards)
        path = os.path.join(directory, f"shard-{i:05d}.npz")
        np.savez(path, features=part.features.reshape(-1, part.features.shape[-1]).numpy(),
                 labels=part.labels.reshape(-1).numpy().astype(np.int32))
        paths.append(path)
    return paths
