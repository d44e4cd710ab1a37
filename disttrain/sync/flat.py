"""One contiguous float buffer laid over many tensors.

Synchronizers move parameters and gradients as a single flat tensor so that a
whole model is one collective (or a few bucket-sized ones), never one per
parameter.  ``FlatBuffer`` keeps the layout (which slice belongs to which
tensor) and copies between the flat buffer and the tensors.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch


class FlatBuffer:
    """A flat buffer with one slice per tensor of ``like`` (same numel and order)."""

    def __init__(self, like: Sequence[torch.Tensor], dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        if not like:
            raise ValueError("FlatBuffer needs at least one tensor")
        self.numels = [t.numel() for t in like]
        self.shapes = [t.shape for t in like]
        self.offsets = [0]
        for n in self.numels:
            self.offsets.append(self.offsets[-1] + n)
        self.data = torch.zeros(self.offsets[-1], dtype=dtype or like[0].dtype,
                                device=device or like[0].device)
        self.views = list(self.data.split(self.numels))

    @property
    def numel(self) -> int:
        return self.offsets[-1]

    def copy_from(self, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Fill the buffer from ``tensors``; ``None`` (an unused parameter's grad) reads as zeros."""
        for view, t in zip(self.views, tensors):
            if t is None:
                view.zero_()
            else:
                view.copy_(t.reshape(-1))
        return self.data

    def copy_to(self, tensors: Sequence[torch.Tensor]) -> None:
        for view, t in zip(self.views, tensors):
            t.copy_(view.view(t.shape))

    def buckets(self, bucket_bytes: int) -> Iterator[torch.Tensor]:
        """Consecutive slices of at most ``bucket_bytes`` (at least one element each)."""
        step = max(1, bucket_bytes // self.data.element_size())
        for start in range(0, self.numel, step):
            yield self.data[start: start + step]

    def locate(self, flat_index: int) -> tuple[int, int]:
        """(tensor number, index inside it) of a flat index: to name a parameter in errors."""
        import bisect

        i = bisect.bisect_right(self.offsets, flat_index) - 1
        return i, flat_index - self.offsets[i]


def gradients_of(params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor | None]:
    return [p.grad for p in params]


def set_gradients(params: Sequence[torch.nn.Parameter], flat: FlatBuffer) -> None:
    """Write the flat buffer back into ``p.grad`` in the parameter's dtype (a float32 buffer
    serves fp16 parameters), creating grads that backward left as None."""
    for p, view in zip(params, flat.views):
        if p.grad is None:
            p.grad = view.view(p.shape).to(p.dtype, copy=True)
        else:
            p.grad.copy_(view.view(p.shape))
