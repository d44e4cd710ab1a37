"""Checkpoints that survive crashes: atomic, checksummed, one file per rank.

Layout inside the run directory::

    checkpoints/step-00000200/rank-00000.ckpt   # each rank's own state
    checkpoints/step-00000200/rank-00001.ckpt
    checkpoints/step-00000200/COMPLETE          # written by rank 0 once every rank's file is on disk

Each rank saves its own file because synchronizer state differs per rank
(GTC residuals, BMUF's local models and momentum mid-block).  A file is
``MAGIC + sha256(payload) + payload`` written to a temporary name, fsynced and
renamed, so a reader sees either a whole file or none; the checksum catches
truncation and bit rot.  ``COMPLETE`` marks a step whose every rank file was
written, so a crash between ranks never yields a mixed checkpoint.

Resuming picks the newest complete step whose files all verify; a damaged one
is skipped with a warning (falling back to the previous one).  A checkpoint
written for another model, world size or synchronizer is an error: silently
training something else is worse than stopping.  Rank 0 decides and tells
the others, so all ranks resume from the same step; the run directory must
be shared by all ranks (as it is for the rest of the run's files).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil

import torch

log = logging.getLogger("disttrain")

MAGIC = b"DISTTRAIN-CKPT-1\n"
_DIGEST = 32


class CheckpointError(ValueError):
    """A checkpoint is damaged or does not belong to this run."""


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, payload: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def save_file(path: str, state: dict) -> int:
    """Write ``state`` atomically with a checksum; returns the bytes written."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    write_atomic(path, MAGIC + hashlib.sha256(payload).digest() + payload)
    return len(MAGIC) + _DIGEST + len(payload)


def load_file(path: str) -> dict:
    """Read a file written by ``save_file``; ``CheckpointError`` if it is damaged."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e.strerror})") from None
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + _DIGEST:
        raise CheckpointError(f"checkpoint {path} is not a disttrain checkpoint or is truncated")
    digest, payload = blob[len(MAGIC): len(MAGIC) + _DIGEST], blob[len(MAGIC) + _DIGEST:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path} fails its checksum (truncated or damaged)")
    return torch.load(io.BytesIO(payload), weights_only=False)


def model_signature(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


class Checkpointer:
    """Saves and finds this rank's checkpoints under ``run_dir/checkpoints``."""

    def __init__(self, run_dir: str, comm, every: int, keep: int = 2) -> None:
        self.root = os.path.join(run_dir, "checkpoints")
        self.comm, self.every, self.keep = comm, every, keep
        self.last_bytes = 0
        self.last_seconds = 0.0

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.root, f"step-{step:08d}")

    def _rank_file(self, step: int, rank: int) -> str:
        return os.path.join(self._step_dir(step), f"rank-{rank:05d}.ckpt")

    def due(self, step: int, last_step: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == last_step)

    def save(self, step: int, state: dict) -> None:
        import time

        start = time.perf_counter()
        os.makedirs(self._step_dir(step), exist_ok=True)
        self.last_bytes = save_file(self._rank_file(step, self.comm.rank), state)
        with self.comm.uncounted():
            self.comm.barrier()  # every rank's file is on disk before COMPLETE says so
        if self.comm.rank == 0:
            marker = json.dumps({"step": step, "world_size": self.comm.world_size}).encode()
            write_atomic(os.path.join(self._step_dir(step), "COMPLETE"), marker)
            for old in self._complete_steps()[self.keep:]:
                shutil.rmtree(self._step_dir(old), ignore_errors=True)
        self.last_seconds = time.perf_counter() - start

    def _complete_steps(self) -> list[int]:
        """Steps with a COMPLETE marker, newest first."""
        if not os.path.isdir(self.root):
            return []
        steps = []
        for name in os.listdir(self.root):
            if name.startswith("step-") and os.path.exists(os.path.join(self.root, name, "COMPLETE")):
                try:
                    steps.append(int(name[5:]))
                except ValueError:
                    continue
        return sorted(steps, reverse=True)

    def _verify(self, step: int, expect: dict) -> None:
        """Rank 0 checks every rank's file of ``step``: whole, and written by this kind of run."""
        for rank in range(self.comm.world_size):
            path = self._rank_file(step, rank)
            state = load_file(path)  # raises CheckpointError when damaged
            for key, wanted in expect.items():
                if state.get(key) != wanted:
                    raise _Mismatch(f"checkpoint {path} was written with {key}={state.get(key)!r}, "
                                    f"this run has {key}={wanted!r}: use a new run directory "
                                    f"(hydra.run.dir) or train.resume=never")

    def load_latest(self, expect: dict) -> dict | None:
        """This rank's state from the newest complete, intact checkpoint (None: start fresh)."""
        chosen = -1
        if self.comm.rank == 0:
            for step in self._complete_steps():
                try:
                    self._verify(step, expect)
                except _Mismatch:
                    raise
                except CheckpointError as e:
                    log.warning("%s; falling back to an earlier checkpoint", e)
                    continue
                chosen = step
                break
        flag = torch.tensor([chosen], dtype=torch.float64, device=getattr(self.comm, "device", "cpu"))
        with self.comm.uncounted():
            self.comm.broadcast_(flag, src=0)
        chosen = int(flag.item())
        if chosen < 0:
            return None
        log.info("resuming from checkpoint step %d", chosen)
        return load_file(self._rank_file(chosen, self.comm.rank))


class _Mismatch(CheckpointError):
    pass
