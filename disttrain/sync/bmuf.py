"""Blockwise model-update filtering (BMUF), Chen & Huo, ICASSP 2016.

Every worker trains alone for a block of ``sync_every`` (tau) optimizer steps,
starting from the global model W_g(t-1), and ends at W_i(t).  Then, with
block momentum eta (``block_momentum``) and block learning rate zeta
(``block_lr``)::

    Wbar(t) = (1/N) sum_i W_i(t)
    G(t)    = Wbar(t) - W_g(t-1)                # block-level gradient
    D(t)    = eta * D(t-1) + zeta * G(t),  D(0) = 0
    W(t)    = W(t-1) + D(t)

and the next block starts from W_g(t), which ``variant`` chooses:

* ``classical`` (CBM):  W_g(t) = W(t)
* ``nesterov``  (NBM, the paper's, the default):  W_g(t) = W(t) + eta * D(t).
  Only W_g and D are stored: W_g(t) = W_g(t-1) + zeta * G(t) + eta * D(t) is the
  same recursion (W(t-1) = W_g(t-1) - eta * D(t-1)), and is what an outer
  ``torch.optim.SGD(lr=zeta, momentum=eta, nesterov=True)`` stepped on the
  pseudo-gradient W_g(t-1) - Wbar(t) computes.
* ``fairseq_nesterov``: fairseq's NBM (fairseq/optim/bmuf.py) keeps the
  look-ahead point as the base, W_g(t) = W_g(t-1) + (1 + eta) * D(t); its
  long-run gain is zeta (1 + eta) / (1 - eta) instead of the paper's
  zeta / (1 - eta).  Offered for comparison with fairseq runs only.

eta = 0, zeta = 1 is local SGD / periodic model averaging.  ``block_momentum``
left unset (None, ``null`` in yaml) is 1 - 1/N, CNTK's recommendation, which
tunes BMUF to match *serial* single-worker SGD; against synchronous all-reduce
at the same local learning rate it can overshoot (measured: the README's results).

Around the blocks:

* Start: rank 0's parameters and buffers are broadcast (base class), and the
  global copy W_g is taken after that.  ``warmup_steps`` steps of dense
  gradient all-reduce come first (CNTK's "distributed after"); the first block
  starts after them, W_g taken there.
* After every sync the local optimizer's momentum is handled by
  ``local_momentum``: ``reset`` (CNTK; default) zeroes the first-moment state
  (``momentum_buffer`` of SGD and RMSprop, ``exp_avg`` of the Adam family).
  For Adam that restarts the first moment from zero while ``step`` and
  ``exp_avg_sq`` (a scale estimate, not a direction) are kept, so there is no
  bias correction and the update ramps back up over about 1/(1 - beta1)
  steps.  ``keep`` leaves the state alone; ``average`` all-reduces every
  optimizer-state tensor shaped like its parameter (note that averaging Adam
  state is not averaging gradients).
* Floating buffers (BatchNorm statistics) are plainly averaged at each sync,
  in the same flat all-reduce as the parameters; integer buffers are left alone.
* Traffic per sync: one control all-reduce of two int64 words (who is still
  training, who is mid-block) and one all-reduce of the flat model, in
  ``bucket_mb`` slices (plus the optimizer state with ``average``).

``finish()`` (train.py calls it after the last step; a user's loop must call
it on every rank) ends training with all replicas identical, and is how
uneven data works.  A rank that runs out of batches calls ``finish()`` and
takes part in the block syncs of the ranks still training: it contributes its
partial block once, then the global model (a zero block gradient, as
DistributedDataParallel's ``Join`` does for gradients; the mean is still over
all N).  When every rank is in ``finish()`` and some are mid-block, a last
exchange *plainly averages* the models (W_g = Wbar, no filter): a partial
block's G covers fewer steps, and the momentum term, already applied once as
Nesterov's look-ahead, would extrapolate from a block that did not happen.
Every rank ends with the same number of syncs.  Warm-up steps are a gradient
all-reduce each, so every rank needs at least ``warmup_steps`` batches.

On one worker the block filter still runs as the equations say (with eta > 0
the model differs from plain local SGD); fairseq's BMUF does nothing there.

Checkpoints: ``state_dict()`` holds W_g, D, the step counter and the position
in the block.  Mid-block the replicas differ, so each rank saves its own model
and optimizer state.  To resume, load them and the synchronizer state *before*
``attach()``: set up then keeps every rank's local model instead of
broadcasting rank 0's, and the run continues bitwise as if never stopped.

Example::

    sync = BMUF(TorchCommunicator(), sync_every=50, variant="nesterov")
    with sync.attach(model, optimizer):
        for x, y in my_loader:              # may hold fewer batches on some ranks
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()                # a block sync every 50th step
        sync.finish()                       # every rank: partial block, uneven data
"""
from __future__ import annotations

import torch

from .allreduce import average_gradients
from .base import Synchronizer
from .flat import FlatBuffer, set_gradients

VARIANTS = ("classical", "nesterov", "fairseq_nesterov")
LOCAL_MOMENTUM = ("reset", "keep", "average")
FIRST_MOMENT_STATE = ("momentum_buffer", "exp_avg")  # what ``reset`` zeroes


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class BMUF(Synchronizer):
    name = "bmuf"

    def __init__(self, comm, sync_every: int = 50, block_momentum: float | None = None,
                 block_lr: float = 1.0, variant: str = "nesterov", warmup_steps: int = 0,
                 local_momentum: str = "reset", bucket_mb: float = 25.0) -> None:
        super().__init__(comm)
        if not isinstance(sync_every, int) or isinstance(sync_every, bool) or sync_every < 1:
            raise ValueError(f"sync.sync_every must be an integer >= 1 (local steps per block), "
                             f"got {sync_every!r}")
        if block_momentum is not None and not (_is_number(block_momentum) and 0 <= block_momentum < 1):
            raise ValueError(f"sync.block_momentum must be in [0, 1) or null (1 - 1/N), "
                             f"got {block_momentum!r}")
        if not (_is_number(block_lr) and block_lr > 0):
            raise ValueError(f"sync.block_lr must be a number > 0, got {block_lr!r}")
        if variant not in VARIANTS:
            raise ValueError(f"sync.variant={variant!r}: valid values are {', '.join(VARIANTS)}")
        if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
            raise ValueError(f"sync.warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if local_momentum not in LOCAL_MOMENTUM:
            raise ValueError(f"sync.local_momentum={local_momentum!r}: valid values are "
                             f"{', '.join(LOCAL_MOMENTUM)}")
        if not (_is_number(bucket_mb) and bucket_mb > 0):
            raise ValueError(f"sync.bucket_mb must be > 0 (megabytes per collective), got {bucket_mb!r}")
        self.sync_every = sync_every
        self.block_momentum = 1.0 - 1.0 / comm.world_size if block_momentum is None else float(block_momentum)
        self.block_lr = float(block_lr)
        self.variant = variant
        self.warmup_steps = warmup_steps
        self.local_momentum = local_momentum
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.block_step = 0  # local steps since the current block started
        self.syncs = 0       # model exchanges (block syncs and the final average)
        self.global_params: torch.Tensor | None = None  # W_g, flat over the trainable parameters
        self.block_delta: torch.Tensor | None = None    # D
        self.model_flat: FlatBuffer | None = None       # parameters, then floating buffers
        self.grads: FlatBuffer | None = None            # warm-up gradients
        self._before_sync = (0, 0)  # (collectives, bytes) when the current sync began
        self._last_sync = {"collectives": 0, "bytes": 0}

    # -- life cycle --------------------------------------------------------
    def setup(self, model, optimizer=None) -> None:
        super().setup(model, optimizer)  # broadcast first: W_g is taken from the common model
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise ValueError(f"BMUF needs every trainable parameter in one dtype, "
                             f"got {sorted(map(str, dtypes))}")
        buffers = [b for b in model.buffers() if b.is_floating_point()]
        self.model_flat = FlatBuffer([p.data for p in self.params] + buffers, dtype=self.params[0].dtype,
                                     device=self.comm_device)
        self.n_params = sum(p.numel() for p in self.params)
        if self.warmup_steps:
            self.grads = FlatBuffer([p.data for p in self.params], device=self.comm_device)
        if self.global_params is None:
            self.block_delta = torch.zeros(self.n_params, dtype=self.params[0].dtype, device=self.comm_device)
            self._start_block()
        elif self.global_params.numel() != self.n_params:
            raise ValueError(f"the loaded BMUF state has {self.global_params.numel()} parameters, "
                             f"the model {self.n_params}")

    def broadcast_model(self, src: int = 0) -> None:
        if self.block_step == 0:  # resumed mid-block: every replica keeps its own local model
            super().broadcast_model(src)

    def after_backward(self) -> None:
        if self.steps >= self.warmup_steps or self.comm.world_size == 1:
            return
        assert self.grads is not None
        average_gradients(self.comm, self.params, self.grads, self.bucket_bytes)
        set_gradients(self.params, self.grads)

    def after_step(self) -> None:
        super().after_step()
        if self.steps <= self.warmup_steps:
            if self.steps == self.warmup_steps:
                self._start_block()
            return
        self.block_step += 1
        if self.block_step == self.sync_every:
            self._control(training=True)
            self._exchange(filtered=True)

    def finish(self) -> None:
        """Follow the others' block syncs until every rank is here, then average a partial block."""
        if self.steps < self.warmup_steps:
            return  # still in warm-up: the replicas are equal after every step
        while True:
            training, mid_block = self._control(training=False)
            if training:
                self._exchange(filtered=True)
            else:
                if mid_block:
                    self._exchange(filtered=False)
                return

    # -- the block sync ----------------------------------------------------
    def _tensors(self) -> list[torch.Tensor]:
        assert self.model is not None
        return [p.data for p in self.params] + [b for b in self.model.buffers() if b.is_floating_point()]

    def _start_block(self) -> None:
        assert self.model_flat is not None
        self.global_params = self.model_flat.copy_from(self._tensors())[: self.n_params].clone()

    def _control(self, training: bool) -> tuple[int, int]:
        """(ranks still training, ranks mid-block): a rank in finish() matches the others' collectives."""
        self._before_sync = (self.comm.stats.calls, self.comm.stats.bytes_sent)
        flags = torch.tensor([int(training), int(self.block_step > 0)], dtype=torch.int64,
                             device=self.comm_device)
        self.comm.all_reduce_(flags)
        training_ranks, mid_block_ranks = flags.tolist()
        return training_ranks, mid_block_ranks

    @torch.no_grad()
    def _exchange(self, filtered: bool) -> None:
        """Average the models; then the block filter (``filtered``) or plain averaging sets W_g."""
        assert self.model_flat is not None and self.global_params is not None and self.block_delta is not None
        tensors = self._tensors()
        flat = self.model_flat.copy_from(tensors)
        for bucket in self.model_flat.buckets(self.bucket_bytes):
            self.comm.all_reduce_(bucket)
        flat.div_(self.comm.world_size)
        mean, w_g, d = flat[: self.n_params], self.global_params, self.block_delta
        eta, zeta = self.block_momentum, self.block_lr
        if filtered:
            g = mean.sub_(w_g)  # G(t) = Wbar(t) - W_g(t-1), in place: the mean is not needed again
            d.mul_(eta).add_(g, alpha=zeta)
            if self.variant == "classical":
                w_g.add_(d)
            elif self.variant == "nesterov":
                w_g.add_(g, alpha=zeta).add_(d, alpha=eta)
            else:  # fairseq_nesterov
                w_g.add_(d, alpha=1.0 + eta)
        else:
            w_g.copy_(mean)
        mean.copy_(w_g)
        self.model_flat.copy_to(tensors)  # parameters = W_g, buffers = their average
        self._local_optimizer_state()
        self.block_step = 0
        self.syncs += 1
        calls, sent = self._before_sync
        self._last_sync = {"collectives": self.comm.stats.calls - calls,
                           "bytes": self.comm.stats.bytes_sent - sent}

    def _local_optimizer_state(self) -> None:
        if self.optimizer is None or self.local_momentum == "keep":
            return
        states = [self.optimizer.state.get(p, {}) for p in self.params]
        if self.local_momentum == "reset":
            for state in states:
                for key in FIRST_MOMENT_STATE:
                    if torch.is_tensor(state.get(key)):
                        state[key].zero_()
            return
        # average: every rank must have stepped at least once, so all hold the same state tensors
        shaped = [t for p, state in zip(self.params, states) for _, t in sorted(state.items())
                  if torch.is_tensor(t) and t.is_floating_point() and t.shape == p.shape]
        if not shaped:
            return
        flat = FlatBuffer(shaped, device=self.comm_device)
        flat.copy_from(shaped)
        for bucket in flat.buckets(self.bucket_bytes):
            self.comm.all_reduce_(bucket)
        flat.data.div_(self.comm.world_size)
        flat.copy_to(shaped)

    # -- state and figures -------------------------------------------------
    def state_dict(self) -> dict:
        if self.global_params is None or self.block_delta is None:
            raise RuntimeError("BMUF.state_dict() needs attach()/setup() first")
        return {"steps": self.steps, "block_step": self.block_step, "syncs": self.syncs,
                "global_params": self.global_params.clone(), "block_delta": self.block_delta.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Load before ``attach()`` so set up keeps each rank's mid-block model (see the module docs)."""
        if self.global_params is not None and state["global_params"].numel() != self.global_params.numel():
            raise ValueError(f"the BMUF state has {state['global_params'].numel()} parameters, "
                             f"the model {self.global_params.numel()}")
        super().load_state_dict(state)
        self.block_step, self.syncs = int(state["block_step"]), int(state["syncs"])
        self.global_params = state["global_params"].to(self.comm_device, copy=True)
        self.block_delta = state["block_delta"].to(self.comm_device, copy=True)

    def stats(self) -> dict:
        """Base figures plus syncs so far and the cost of one sync, whole and per step of its block."""
        s = super().stats()
        s.update(syncs=self.syncs, block_position=self.block_step,
                 collectives_per_block=self._last_sync["collectives"],
                 bytes_per_block=self._last_sync["bytes"],
                 bytes_per_step_amortised=self._last_sync["bytes"] / self.sync_every)
        return s
