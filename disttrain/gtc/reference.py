"""Pure-torch GTC encode/decode: the specification the C++ codec is tested against.

These functions give results bit-for-bit identical to ``disttrain._gtc_codec`` (words, residual
and decoded output) and run on any device, so they also serve CUDA tensors.  They are slower
(several full-size temporaries); use :func:`disttrain.gtc.encode` / :func:`disttrain.gtc.decode`,
which dispatch to the C++ codec for CPU float32 tensors.

Bitwise agreement rests on doing the same float32 operations in the same order:

* encode: ``s = residual + grad`` (one float32 add per element), ``|s| >= tau32`` with
  ``tau32 = float32(tau)``, then ``s - tau32`` or ``s + tau32`` at the emitted entries;
* decode: ``step = float32(tau32 * float32(scale))`` computed once, then ``out[i] + step`` or
  ``out[i] - step`` per word, words applied in order and messages in list order.  Within one
  round every index occurs at most once (advanced-index read, add, write back), so no atomic or
  unordered accumulation (``index_add_`` on CUDA) is involved; a message that repeats an index is
  applied in rounds of first, second, ... occurrence, which is the word order.
"""
from __future__ import annotations

import math
import struct
from typing import Sequence

import torch

__all__ = [
    "MAX_NUMEL",
    "NonFiniteGradientError",
    "check_numel",
    "float32_tau",
    "float32_step",
    "reference_encode",
    "reference_decode",
    "words_to_indices_signs",
    "indices_signs_to_words",
]

#: Largest number of elements one encoded tensor may have (flat index must fit in 31 bits).
MAX_NUMEL = 2**31 - 1

_F32 = struct.Struct("f")


class NonFiniteGradientError(FloatingPointError):
    """``encode`` met a NaN/Inf gradient (or a non-finite ``residual + grad``).

    Attributes:
        index: flat index (into ``grad.reshape(-1)``) of the first offending element.
        what: ``"grad"`` if the gradient itself is not finite there, ``"sum"`` if the gradient is
            finite but ``residual + grad`` is not (the residual already held NaN/Inf, or the sum
            overflowed float32).
        residual_modified: ``False`` when the residual was left exactly as it was (always the case
            for ``what == "grad"``); ``True`` only for ``what == "sum"`` on the C++ fast path,
            which notices a non-finite sum while it is already updating the residual.
    """

    def __init__(self, message: str, index: int, what: str = "grad", residual_modified: bool = False):
        super().__init__(message)
        self.index = int(index)
        self.what = what
        self.residual_modified = bool(residual_modified)


def check_numel(numel: int) -> None:
    """Raise ``ValueError`` if a tensor of ``numel`` elements cannot be encoded in 32-bit words."""
    if numel < 0:
        raise ValueError("gtc: negative size")
    if numel > MAX_NUMEL:
        raise ValueError(
            f"gtc: tensor has {numel} elements; GTC words are 32-bit (index << 1 | sign), so the flat "
            f"index must fit in 31 bits: at most 2^31 - 1 = {MAX_NUMEL} elements per encoded tensor. "
            "Split the parameter into smaller tensors."
        )


def _to_f32(x: float) -> float | None:
    """Round a Python float to the nearest float32 (None if it overflows float32)."""
    try:
        return _F32.unpack(_F32.pack(x))[0]
    except OverflowError:
        return None


def float32_tau(tau: float) -> float:
    """Validate tau and return it rounded to float32 (as a Python float)."""
    if isinstance(tau, bool):
        raise ValueError(f"gtc: tau must be a number, got {tau!r}")
    try:
        t = float(tau)
    except (TypeError, ValueError):
        raise ValueError(f"gtc: tau must be a number, got {tau!r}") from None
    t32 = _to_f32(t) if math.isfinite(t) else None
    if t32 is None or not (t > 0.0 and t32 > 0.0):
        raise ValueError(f"gtc: tau must be a finite positive number representable in float32, got {tau!r}")
    return t32


def float32_step(tau: float, scale: float = 1.0) -> float:
    """``float32(float32(tau) * float32(scale))``: the value one word adds in decode.

    The double product of two float32 values is exact (48-bit significand), so rounding it to
    float32 once equals the float32 multiplication the C++ codec does.
    """
    t32 = float32_tau(tau)
    s = float(scale)
    s32 = _to_f32(s) if math.isfinite(s) else None
    if s32 is None:
        raise ValueError(f"gtc.decode: scale must be finite (in float32), got {scale!r}")
    step = _to_f32(t32 * s32)
    if step is None:
        raise ValueError("gtc.decode: tau * scale overflows float32")
    return step


def _check_pair(grad: torch.Tensor, residual: torch.Tensor) -> None:
    if not isinstance(grad, torch.Tensor) or not isinstance(residual, torch.Tensor):
        raise ValueError("gtc.encode: grad and residual must be torch tensors")
    if residual.dtype != torch.float32:
        raise ValueError(f"gtc.encode: residual must be float32, got {residual.dtype}")
    if grad.dtype != torch.float32:
        raise ValueError(
            f"gtc.encode: grad must be float32 like the residual, got {grad.dtype} (cast with grad.float())"
        )
    if grad.shape != residual.shape:
        raise ValueError(f"gtc.encode: grad shape {tuple(grad.shape)} != residual shape {tuple(residual.shape)}")
    if grad.device != residual.device:
        raise ValueError(f"gtc.encode: grad on {grad.device} but residual on {residual.device}")
    check_numel(grad.numel())


def _check_capacity(capacity) -> int | None:
    if capacity is None:
        return None
    if isinstance(capacity, bool) or int(capacity) != capacity or capacity < 0:
        raise ValueError(f"gtc.encode: capacity must be None or an integer >= 0, got {capacity!r}")
    return int(capacity)


def indices_signs_to_words(indices: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """int32 words ``(index << 1) | negative`` (read as uint32) from int64 indices and a bool mask."""
    w = (indices.to(torch.int64) << 1) | negative.to(torch.int64)
    w = torch.where(w >= 2**31, w - 2**32, w)  # reinterpret uint32 as int32
    return w.to(torch.int32)


def words_to_indices_signs(words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split int32 words into ``(indices: int64, signs: float32 of +1/-1)``."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    idx = w >> 1
    signs = 1.0 - 2.0 * (w & 1).to(torch.float32)
    return idx, signs


def reference_encode(
    grad: torch.Tensor, residual: torch.Tensor, tau: float, capacity: int | None = None
) -> torch.Tensor:
    """Pure-torch :func:`disttrain.gtc.encode` (any device; bit-identical to the C++ codec).

    On a non-finite gradient (or ``residual + grad``) raises :class:`NonFiniteGradientError` with
    the residual untouched.
    """
    _check_pair(grad, residual)
    tau32 = float32_tau(tau)
    capacity = _check_capacity(capacity)
    g = grad.detach().reshape(-1)
    s = residual.detach().reshape(-1) + g
    bad = ~(torch.isfinite(s) & torch.isfinite(g))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        if not bool(torch.isfinite(g[i])):
            msg = f"gtc.encode: gradient is not finite (NaN or Inf) at flat index {i}; residual left unchanged"
            raise NonFiniteGradientError(msg, i, "grad", False)
        msg = (
            f"gtc.encode: residual + gradient is not finite at flat index {i} (the residual already held "
            "NaN/Inf or the sum overflowed float32); residual left unchanged"
        )
        raise NonFiniteGradientError(msg, i, "sum", False)
    tau_t = torch.tensor(tau32, dtype=torch.float32, device=s.device)
    idx = (s.abs() >= tau_t).nonzero().reshape(-1)  # increasing index order
    if capacity is not None:
        idx = idx[:capacity]
    v = s[idx]
    neg = v < 0
    s[idx] = torch.where(neg, v + tau_t, v - tau_t)
    residual.detach().copy_(s.view(residual.shape))
    return indices_signs_to_words(idx, neg)


def _as_messages(words) -> list[torch.Tensor]:
    if isinstance(words, torch.Tensor):
        msgs = [words]
    elif isinstance(words, Sequence):
        msgs = list(words)
    else:
        raise ValueError("gtc.decode: words must be an int32 tensor or a list of int32 tensors")
    for k, m in enumerate(msgs):
        if not isinstance(m, torch.Tensor) or m.dtype != torch.int32:
            raise ValueError(f"gtc.decode: message {k} must be an int32 tensor, got {getattr(m, 'dtype', type(m))}")
        if m.dim() != 1:
            raise ValueError(f"gtc.decode: message {k} must be 1-D, got shape {tuple(m.shape)}")
    return msgs


def _check_out(out: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32:
        raise ValueError(f"gtc.decode: out must be a float32 tensor, got {getattr(out, 'dtype', type(out))}")


def reference_decode(out: torch.Tensor, words, tau: float, scale: float = 1.0) -> torch.Tensor:
    """Pure-torch :func:`disttrain.gtc.decode` (any device; bit-identical to the C++ codec)."""
    _check_out(out)
    msgs = _as_messages(words)
    step = float32_step(tau, scale)
    flat = out.detach().view(-1) if out.is_contiguous() else out.detach().reshape(-1).clone()
    n = flat.numel()
    decoded = []
    for k, m in enumerate(msgs):
        idx, signs = words_to_indices_signs(m.to(flat.device))
        if idx.numel() and int(idx.max()) >= n:
            raise IndexError(
                f"gtc.decode: message {k} holds index {int(idx.max())} but out has only {n} elements "
                "(wrong tensor, or words from another layout); out left unchanged"
            )
        decoded.append((idx, signs))
    step_t = torch.tensor(step, dtype=torch.float32, device=flat.device)
    for idx, signs in decoded:
        if idx.numel() == 0:
            continue
        vals = torch.where(signs < 0, -step_t, step_t)
        if idx.numel() == 1 or bool((idx[1:] > idx[:-1]).all()):
            flat[idx] = flat[idx] + vals
            continue
        # Repeated indices: apply first occurrences, then second occurrences, ... (= word order).
        sorted_idx, perm = torch.sort(idx, stable=True)
        pos = torch.arange(idx.numel(), device=idx.device)
        start = torch.ones_like(sorted_idx, dtype=torch.bool)
        start[1:] = sorted_idx[1:] != sorted_idx[:-1]
        group_start = torch.cummax(torch.where(start, pos, torch.zeros_like(pos)), 0).values
        rank = torch.empty_like(pos)
        rank[perm] = pos - group_start
        for r in range(int(rank.max()) + 1):
            sel = rank == r
            i, v = idx[sel], vals[sel]
            flat[i] = flat[i] + v
    if not out.is_contiguous():
        out.detach().copy_(flat.view(out.shape))
    return out
