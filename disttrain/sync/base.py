"""The synchronizer contract shared by all-reduce, GTC and BMUF.

A synchronizer keeps N data-parallel replicas in step.  It gets two chances
per training step, both around ``optimizer.step()``:

* ``after_backward()`` - the gradient-exchange point: gradients are complete,
  the optimizer has not run yet.  All-reduce and GTC work here.
* ``after_step()`` - the model-exchange point: the optimizer has updated the
  parameters.  BMUF works here (every ``sync_every`` steps).

``attach(model, optimizer)`` broadcasts rank 0's parameters and buffers (so
differently initialised replicas start equal) and registers both points as
optimizer step hooks, so a user's loop only gains a ``with`` line::

    with AllReduce(comm).attach(model, optimizer):
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()

State that differs per synchronizer lives in ``state_dict()``; traffic
figures come from ``stats()``.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..comm import Communicator
from .flat import FlatBuffer


class Synchronizer:
    """Base class: no exchange at all (each replica trains alone)."""

    name = "none"

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.params: list[torch.nn.Parameter] = []
        self.steps = 0  # optimizer steps taken while attached

    # -- life cycle --------------------------------------------------------
    def setup(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Bind to a model and start every replica from rank 0's parameters and buffers."""
        self.model, self.optimizer = model, optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.broadcast_model()

    def after_backward(self) -> None:
        """Gradient-exchange point (before ``optimizer.step()``)."""

    def after_step(self) -> None:
        """Model-exchange point (after ``optimizer.step()``)."""
        self.steps += 1

    def finish(self) -> None:
        """End of training: flush anything still pending (BMUF's partial block)."""

    @contextmanager
    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """Set up, then run the exchange points as hooks on ``optimizer.step()``."""
        self.setup(model, optimizer)
        pre = optimizer.register_step_pre_hook(lambda *_: self.after_backward())
        post = optimizer.register_step_post_hook(lambda *_: self.after_step())
        try:
            yield self
        finally:
            pre.remove()
            post.remove()

    # -- helpers for subclasses --------------------------------------------
    def model_tensors(self) -> list[torch.Tensor]:
        """Everything that must be equal across replicas: parameters, then floating buffers."""
        assert self.model is not None
        buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        return [p.data for p in self.model.parameters()] + buffers

    def broadcast_model(self, src: int = 0) -> None:
        if self.comm.world_size == 1:
            return
        tensors = self.model_tensors()
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = FlatBuffer(group, device=self.comm_device)
            flat.copy_from(group)
            self.comm.broadcast_(flat.data, src)
            flat.copy_to(group)
        # Integer buffers (BatchNorm's num_batches_tracked) travel one by one: rare and tiny.
        assert self.model is not None
        for b in self.model.buffers():
            if not b.is_floating_point():
                staged = b.detach().reshape(-1).to(self.comm_device, copy=True)
                self.comm.broadcast_(staged, src)
                b.copy_(staged.view(b.shape))

    @property
    def comm_device(self) -> torch.device:
        return getattr(self.comm, "device", torch.device("cpu"))

    # -- state and figures -------------------------------------------------
    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])

    def stats(self) -> dict:
        """Traffic so far: bytes this worker sent, collectives, seconds communicating."""
        s = self.comm.stats.as_dict()
        s["sync"] = self.name
        s["steps"] = self.steps
        s["bytes_sent_per_step"] = s["bytes_sent"] / self.steps if self.steps else 0.0
        return s
