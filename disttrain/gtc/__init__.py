"""Gradient threshold compression (GTC): the encode/decode codec.

Paper: Nikko Strom, "Scalable distributed DNN training using commodity GPU cloud computing",
Interspeech 2015.  Each worker k keeps a float32 residual ``r_k`` (same shape as the parameter,
starts at zero).  Per step, with gradient (or update) ``g_k`` and threshold ``tau``::

    r_k += g_k
    S    = { i : |r_k[i]| >= tau }                      # in increasing index order
    for i in S:  s = sign(r_k[i]);  r_k[i] -= s * tau;  emit word(i, s)
    # all workers allgather all words; every worker decodes every message into one buffer
    d[i] += s * tau   (per word, messages in rank order)  -> synchronized gradient d / N

Only ``tau`` is subtracted, never the whole value, so a large entry drains over several steps
(the paper's per-weight rate control), and nothing is lost: the sum of everything sent plus the
residual equals the sum of all gradients (conservation; exact with dyadic values and a
power-of-two ``tau``).

Word layout (LBANN's): one 32-bit word per sent element, ``word = (index << 1) | sign_bit`` with
``sign_bit = 1`` for a negative step, stored in an ``int32`` tensor (indices >= 2^30 give negative
int32 values; :func:`words_to_indices_signs` reads them as uint32).  A tensor may therefore have at
most ``2^31 - 1`` elements (:data:`MAX_NUMEL`); larger tensors raise ``ValueError``.

Public API::

    encode(grad, residual, tau, capacity=None) -> int32 words    # residual updated in place
    decode(out, words_or_list_of_words, tau, scale=1.0) -> out    # out += words * tau * scale
    reference_encode / reference_decode                           # pure torch, bit-identical
    words_to_indices_signs(words) -> (int64 indices, float32 +-1 signs)
    HAVE_CPP                                                      # C++ codec importable?
    NonFiniteGradientError(FloatingPointError)                    # .index, .what, .residual_modified

Dispatch: CPU, float32, contiguous tensors go to the C++ codec ``disttrain._gtc_codec`` through
zero-copy ``.numpy()`` views, with the codec's OpenMP thread count set to
``torch.get_num_threads()`` on every call; everything else (CUDA tensors, non-contiguous tensors,
or no compiled extension) uses the pure-torch reference.  Both give bit-identical words, residuals
and decoded outputs, and the output does not depend on the thread count.

Semantics worth knowing:

* ``capacity`` (int >= 0) caps the words of one call: only the first ``capacity`` qualifying
  indices (index order) are sent and drained; the others keep their full residual.
* Arithmetic is float32: ``tau`` is rounded to float32 once, the decode step is
  ``float32(float32(tau) * float32(scale))``, e.g. ``scale = 1 / world_size`` to get the mean.
* Non-finite input: if ``grad`` holds NaN/Inf, ``encode`` raises :class:`NonFiniteGradientError`
  (a ``FloatingPointError``) whose ``index`` is the flat index of the first offending element,
  and the residual is left exactly as it was.  The C++ fast path checks the gradient in a cheap
  read-only pre-pass and then runs one fused pass; a non-finite ``residual + grad`` with a finite
  gradient (a residual that already holds NaN/Inf, or float32 overflow above ~3.4e38) is only seen
  during that fused pass and raises with ``what == "sum"`` and ``residual_modified == True``.
  With ``capacity`` set (or on the reference path) everything is checked before anything is
  written, so the residual is always untouched on error.
* ``decode`` validates all indices (``IndexError``, ``out`` untouched) before writing, and applies
  words in order and messages in list order, so every rank decoding the same list gets bitwise
  identical results.

Example::

    >>> import torch
    >>> from disttrain import gtc
    >>> g = torch.tensor([0.3, -1.2, 0.05, 2.5])
    >>> r = torch.zeros(4)
    >>> w = gtc.encode(g, r, tau=1.0)
    >>> gtc.words_to_indices_signs(w)
    (tensor([1, 3]), tensor([-1.,  1.]))
    >>> r                                   # 2.5 drains by tau only; -1.2 keeps -0.2
    tensor([ 0.3000, -0.2000,  0.0500,  1.5000])
    >>> gtc.decode(torch.zeros(4), [w, w], tau=1.0, scale=0.5)   # two ranks sent the same words
    tensor([ 0., -1.,  0.,  1.])
"""
from __future__ import annotations

import torch

from .reference import (
    MAX_NUMEL,
    NonFiniteGradientError,
    _as_messages,
    _check_capacity,
    _check_out,
    _check_pair,
    check_numel,
    float32_step,
    float32_tau,
    indices_signs_to_words,
    reference_decode,
    reference_encode,
    words_to_indices_signs,
)

try:  # the compiled codec is optional: without it everything runs on the torch reference
    from .. import _gtc_codec as _C
except ImportError:  # pragma: no cover - depends on the build
    _C = None

#: True when the C++ codec ``disttrain._gtc_codec`` is importable.
HAVE_CPP: bool = _C is not None

__all__ = [
    "HAVE_CPP",
    "MAX_NUMEL",
    "NonFiniteGradientError",
    "check_numel",
    "decode",
    "encode",
    "float32_step",
    "float32_tau",
    "indices_signs_to_words",
    "reference_decode",
    "reference_encode",
    "set_codec_threads",
    "words_to_indices_signs",
]


def set_codec_threads(n: int | None = None) -> None:
    """Set the C++ codec's thread count (default: ``torch.get_num_threads()``).

    :func:`encode` and :func:`decode` call this on every call, so the codec follows
    ``torch.set_num_threads``; results never depend on it.
    """
    if _C is None:
        return
    n = torch.get_num_threads() if n is None else int(n)
    if _C.get_num_threads() != n:
        _C.set_num_threads(n)


def _cpp_ok(*tensors: torch.Tensor) -> bool:
    return _C is not None and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def encode(grad: torch.Tensor, residual: torch.Tensor, tau: float, capacity: int | None = None) -> torch.Tensor:
    """Add ``grad`` into ``residual`` and emit GTC words for entries with ``|residual| >= tau``.

    Args:
        grad: float32 tensor, any shape.
        residual: float32 tensor of the same shape and device; updated in place.
        tau: threshold, finite and > 0 (rounded to float32).
        capacity: ``None`` (no cap) or int >= 0: at most this many words; the first qualifying
            indices in index order are sent, the rest keep their full residual.

    Returns:
        1-D int32 tensor of words ``(index << 1) | sign_bit`` (flat indices, increasing), on
        ``grad``'s device.

    Raises:
        ValueError: bad ``tau``/``capacity``, dtype, shape or device mismatch, > 2^31 - 1 elements.
        NonFiniteGradientError: NaN/Inf in ``grad`` (residual untouched); see the module docstring.
    """
    _check_pair(grad, residual)
    tau32 = float32_tau(tau)
    cap = _check_capacity(capacity)
    if not _cpp_ok(grad, residual):
        return reference_encode(grad, residual, tau32, cap)
    return _encode_cpp(grad, residual, tau32, cap, 0 if cap is None else 1)


def _encode_cpp(grad: torch.Tensor, residual: torch.Tensor, tau32: float, cap: int | None, strategy: int):
    """C++ encode of contiguous CPU float32 tensors with an explicit strategy.

    strategy 0: read-only gradient check, then one fused pass (no capacity support: falls back to 1);
    strategy 1: checked two-pass (scan residual + grad without storing, then apply).
    """
    set_codec_threads()
    g = grad.detach().view(-1).numpy()
    r = residual.detach().view(-1).numpy()
    if cap is not None:
        strategy = 1
    try:
        words = _C._encode_strategy(g, r, tau32, -1 if cap is None else cap, strategy)
    except FloatingPointError as e:
        if len(e.args) == 3:
            msg, index, what = e.args
            raise NonFiniteGradientError(msg, index, what, strategy == 0 and what == "sum") from None
        raise
    return torch.from_numpy(words)


def decode(out: torch.Tensor, words, tau: float, scale: float = 1.0) -> torch.Tensor:
    """Add decoded words into ``out`` in place: ``out.view(-1)[i] += (+-1) * tau * scale`` per word.

    Args:
        out: float32 tensor (any shape; indices are flat indices into it).
        words: an int32 word tensor or a list of them (e.g. one per rank), applied in list order.
        tau: the encode threshold (> 0).
        scale: multiplier, e.g. ``1 / world_size``; the step is ``float32(float32(tau) * float32(scale))``.

    Returns:
        ``out``.

    Raises:
        ValueError: bad dtypes, tau or scale.  IndexError: an index >= ``out.numel()`` (out untouched).
    """
    _check_out(out)
    msgs = _as_messages(words)
    float32_step(tau, scale)  # validates tau and scale
    if not (_cpp_ok(out) and all(m.device.type == "cpu" for m in msgs)):
        return reference_decode(out, msgs, tau, scale)
    set_codec_threads()
    arrays = [m.contiguous().numpy() for m in msgs]
    _C.decode_many(out.detach().view(-1).numpy(), arrays, float32_tau(tau), float(scale))
    return out
