"""Dense gradient all-reduce: the baseline GTC and BMUF must beat.

After backward every worker holds its own gradient g_k.  All workers replace
it with the average

    g = (1/N) * sum_k g_k

so replicas that start equal take identical optimizer steps.  This is what
``torch.nn.parallel.DistributedDataParallel`` computes; here the gradients are
copied into one flat buffer and reduced in ``bucket_mb``-sized slices (one
collective per bucket, never one per parameter), without DDP's hooks.

Example::

    comm = TorchCommunicator()
    with AllReduce(comm, bucket_mb=25).attach(model, optimizer):
        ...  # plain training loop
"""
from __future__ import annotations

import torch

from .base import Synchronizer
from .flat import FlatBuffer, gradients_of, set_gradients


class AllReduce(Synchronizer):
    name = "allreduce"

    def __init__(self, comm, bucket_mb: float = 25.0) -> None:
        super().__init__(comm)
        if not bucket_mb > 0:
            raise ValueError(f"sync.bucket_mb must be > 0 (megabytes per collective), got {bucket_mb}")
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.grads: FlatBuffer | None = None

    def setup(self, model, optimizer=None) -> None:
        super().setup(model, optimizer)
        self.grads = FlatBuffer([p.data for p in self.params], device=self.comm_device)

    def after_backward(self) -> None:
        if self.comm.world_size == 1:
            return
        assert self.grads is not None
        average_gradients(self.comm, self.params, self.grads, self.bucket_bytes)
        set_gradients(self.params, self.grads)


def average_gradients(comm, params, grads: FlatBuffer, bucket_bytes: int) -> torch.Tensor:
    """Copy ``params``' gradients into ``grads`` and replace them by their mean over workers.

    One collective per ``bucket_bytes`` slice.  Also the warm-up step of GTC and BMUF.
    Returns the flat buffer; writing it back into ``p.grad`` is the caller's choice.
    """
    grads.copy_from(gradients_of(params))
    if comm.world_size > 1:
        for bucket in grads.buckets(bucket_bytes):
            comm.all_reduce_(bucket)
        grads.data.div_(comm.world_size)
    return grads.data
