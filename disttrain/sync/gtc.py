"""Gradient threshold compression (GTC): send only the entries that crossed a threshold.

Paper: Nikko Strom, "Scalable distributed DNN training using commodity GPU cloud
computing", Interspeech 2015.  Momentum correction: Lin et al., "Deep Gradient
Compression", ICLR 2018.

Maths.  Worker k keeps a float32 residual r_k over all trainable parameters
(one flat layout, zero at the start).  Per step, with its gradient g_k::

    r_k += g_k
    for every i with |r_k[i]| >= tau:  s = sign(r_k[i]);  r_k[i] -= s * tau;  send word(i, s)
    all workers gather all messages; each decodes them, in rank order, into d = 0:
        d[i] += s * tau / N          (per word)
    p.grad = d                       (the same bits on every rank, so replicas stay identical)

Only tau is subtracted, never the whole entry, so a large entry drains over
several steps (the paper's per-weight rate control), and nothing is lost: over
any number of steps

    N * sum_t d_t  ==  sum_k sum_t g_k,t  -  sum_k r_k          (conservation)

exactly in real arithmetic (and in float32 for dyadic gradients and a
power-of-two tau).  Residual clipping (``clip``) gives this up and says so in
``stats()["conserving"]``.

Word layout: one 32-bit word per sent entry, ``(flat_index << 1) | sign_bit``
(sign_bit 1 = negative; LBANN's layout), so a sent entry costs 4 bytes against
4 bytes per entry of a dense float32 all-reduce: the wire saving is 1/density.
One message per worker per step covers the whole model, exchanged with
``comm.all_gather_v`` (which pads to the longest message on gloo/NCCL and counts
the padding).  A flat index must fit in 31 bits: models with more than 2^31 - 1
trainable elements are rejected.  The codec is ``disttrain.gtc`` (C++ on CPU).

Options (the ``sync.*`` keys of ``conf/sync/gtc.yaml``):

* ``tau``: the threshold (the starting value when ``adaptive``).
* ``adaptive``: every ``adapt_every`` steps compare the density of the window
  (all words gathered / (steps * N * elements), a figure every rank knows after
  the all-gather, so no extra collective and every rank picks the same tau)
  with the band [``density_min``, ``density_max``]; outside it, move tau
  towards the band's geometric centre c by ``sqrt(density / c)`` (density
  goes roughly as tau^-1 to tau^-2, so the square root does not overshoot),
  at most by ``adapt_factor`` per change (DL4J: start 1e-3, band [1e-4, 1e-2],
  x2 every 20 steps).
* ``capacity``: at most this many words per worker per step; the overflow
  stays in the residual (entries later in the flat layout wait first).
* ``clip``: every ``clip_every`` compressed steps clamp the residual to
  +-clip * tau (DL4J: 5 tau every 5 steps).  Off by default: it breaks
  conservation.
* ``warmup_steps``: the first steps use the dense all-reduce (in
  ``bucket_mb`` buckets; GTC itself sends one message per step).
* ``momentum_correction`` m (DGC): momentum applied after decoding loses badly
  (measured on a 4-worker LSTM: +7% eval loss at 1.2% density), so each worker keeps its own velocity
  u_k = m * u_k + g_k, adds u_k (not g_k) to its residual, and zeroes u_k where
  it sent; the optimizer must then have no momentum of its own (plain SGD on
  the decoded average): ``optim.momentum=0`` (``sync=gtc`` selects
  ``optim=sgd_dgc``, which has none), or ``setup`` raises.  During
  warm-up the velocity runs on the dense average, which is exactly dense
  momentum SGD.
* ``domain``: ``gradient`` (above; GRACE/DGC) or ``update`` (Strom's and
  DL4J's): each worker's own optimizer computes its step Delta_k = W_after -
  W_before, GTC thresholds Delta_k instead of g_k, and every rank sets
  W = W_before + decoded mean of the Delta_k.  The local optimizer keeps its
  own (per-worker) momentum, so ``momentum_correction`` does not apply.  The
  decoded updates are averaged (divided by N) in both domains.

A NaN or Inf in a gradient raises ``disttrain.gtc.NonFiniteGradientError``
naming the parameter, the element and the step, with the residual and the
velocity as they were; the failing rank sends a poison word (-1, an index no
layout has), so every other rank raises too instead of waiting on it.

Example (Hydra)::

    python -m disttrain.train sync=gtc       # conf/sync/gtc.yaml also picks optim=sgd_dgc (no momentum)
    python -m disttrain.train sync=gtc sync.adaptive=true sync.density_max=0.005

In a user's loop::

    with GTC(TorchCommunicator(), tau=1e-3, momentum_correction=0.9).attach(model, optimizer):
        ...  # the plain training loop; optimizer = SGD(..., momentum=0)
"""
from __future__ import annotations

import math

import torch

from .. import gtc as codec
from .allreduce import average_gradients
from .base import Synchronizer
from .flat import FlatBuffer, gradients_of, set_gradients

DOMAINS = ("gradient", "update")
_POISON = -1  # word 0xFFFFFFFF: index 2^31 - 1, beyond every accepted layout


class GTC(Synchronizer):
    name = "gtc"

    def __init__(self, comm, tau: float = 1e-3, adaptive: bool = False, density_min: float = 1e-4,
                 density_max: float = 1e-2, adapt_every: int = 20, adapt_factor: float = 2.0,
                 capacity: int | None = None, clip: float | None = None, clip_every: int = 5,
                 warmup_steps: int = 0, momentum_correction: float = 0.0, domain: str = "gradient",
                 bucket_mb: float = 25.0) -> None:
        super().__init__(comm)
        _check(isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0,
               "sync.tau", tau, "a finite number > 0")
        _check(isinstance(density_min, (int, float)) and isinstance(density_max, (int, float))
               and 0 < density_min < density_max < 1, "sync.density_min/sync.density_max",
               (density_min, density_max), "0 < density_min < density_max < 1 (words per element)")
        _check(_is_int(adapt_every) and adapt_every >= 1, "sync.adapt_every", adapt_every, "an integer >= 1")
        _check(isinstance(adapt_factor, (int, float)) and math.isfinite(adapt_factor) and adapt_factor > 1,
               "sync.adapt_factor", adapt_factor, "a finite number > 1")
        _check(capacity is None or (_is_int(capacity) and capacity >= 1), "sync.capacity", capacity,
               "null (no cap) or an integer >= 1 (words per worker per step)")
        _check(clip is None or (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0),
               "sync.clip", clip, "null (off) or a number > 0 (multiples of tau)")
        _check(_is_int(clip_every) and clip_every >= 1, "sync.clip_every", clip_every, "an integer >= 1")
        _check(_is_int(warmup_steps) and warmup_steps >= 0, "sync.warmup_steps", warmup_steps,
               "an integer >= 0")
        _check(isinstance(momentum_correction, (int, float)) and 0 <= momentum_correction < 1,
               "sync.momentum_correction", momentum_correction, "a number in [0, 1) (0: off)")
        _check(domain in DOMAINS, "sync.domain", domain, " or ".join(DOMAINS))
        _check(not (domain == "update" and momentum_correction),
               "sync.momentum_correction", momentum_correction,
               "0 with sync.domain=update (the local optimizer's own momentum runs there)")
        _check(isinstance(bucket_mb, (int, float)) and bucket_mb > 0, "sync.bucket_mb", bucket_mb,
               "a number > 0 (megabytes per warm-up all-reduce)")
        self.tau = codec.float32_tau(tau)
        self.adaptive = bool(adaptive)
        self.density_min, self.density_max = float(density_min), float(density_max)
        self.adapt_every, self.adapt_factor = int(adapt_every), float(adapt_factor)
        self.capacity = None if capacity is None else int(capacity)
        self.clip, self.clip_every = (None if clip is None else float(clip)), int(clip_every)
        self.warmup_steps = int(warmup_steps)
        self.momentum = float(momentum_correction)
        self.domain = domain
        self.bucket_bytes = int(bucket_mb * 2**20)
        # Set up in setup(): float32 flat layouts over the trainable parameters.
        self.residual: FlatBuffer | None = None
        self.work: FlatBuffer | None = None      # gradients in, decoded mean out
        self.before: FlatBuffer | None = None    # update domain: the weights before the local step
        self.velocity: torch.Tensor | None = None
        self._spare: torch.Tensor | None = None  # next velocity, built here so a NaN leaves u alone
        self.names: list[str] = []
        # Figures (all part of state_dict).
        self.compressed_steps = 0
        self.words_sent = 0          # this worker, all compressed steps
        self.words_last = 0          # this worker, last step
        self.words_gathered_last = 0  # all workers, last step
        self.bytes_last = 0          # this worker, last step, as the communicator counted it
        self._window_words = 0       # adaptive tau: words gathered since the last decision
        self._window_steps = 0
        self._pending_state: dict | None = None

    # -- life cycle --------------------------------------------------------
    def setup(self, model, optimizer=None) -> None:
        super().setup(model, optimizer)
        if self.momentum and optimizer is not None:
            for group in optimizer.param_groups:
                if group.get("momentum", 0):
                    raise ValueError(
                        f"sync.momentum_correction={self.momentum} applies momentum before compression, "
                        f"but the optimizer has momentum={group['momentum']} too (optim.momentum), which "
                        "would apply it twice: run with optim.momentum=0 "
                        "(python -m disttrain.train sync=gtc optim.momentum=0) or sync.momentum_correction=0")
        names = {id(p): n for n, p in model.named_parameters()}
        self.names = [names.get(id(p), f"#{i}") for i, p in enumerate(self.params)]
        self.residual = FlatBuffer([p.data for p in self.params], dtype=torch.float32, device=self.comm_device)
        codec.check_numel(self.residual.numel)
        self.work = FlatBuffer([p.data for p in self.params], dtype=torch.float32, device=self.comm_device)
        if self.domain == "update":
            self.before = FlatBuffer([p.data for p in self.params], dtype=torch.float32,
                                     device=self.comm_device)
        if self.momentum:
            self.velocity = torch.zeros_like(self.residual.data)
            self._spare = torch.zeros_like(self.residual.data)
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)

    def after_backward(self) -> None:
        assert self.work is not None
        if self.steps < self.warmup_steps:
            self._dense_step()
        elif self.domain == "gradient":
            grads = self.work.copy_from(gradients_of(self.params))
            if self.velocity is not None:
                # u' = m u + g into the spare buffer; it becomes u only once encode accepted it.
                torch.mul(self.velocity, self.momentum, out=self._spare).add_(grads)
                grads = self._spare
            words = self._exchange(grads, "momentum-corrected gradient" if self.velocity is not None
                                   else "gradient")
            if self.velocity is not None:
                self.velocity, self._spare = self._spare, self.velocity
                self.velocity[codec.words_to_indices_signs(words)[0].to(self.velocity.device)] = 0
            set_gradients(self.params, self.work)
        else:
            self.before.copy_from([p.data for p in self.params])

    def after_step(self) -> None:
        if self.domain == "update" and self.steps >= self.warmup_steps:
            update = self.work.copy_from([p.data for p in self.params]).sub_(self.before.data)
            try:
                self._exchange(update, "update")
            except (FloatingPointError, ValueError):
                self.before.copy_to([p.data for p in self.params])  # undo the local step too
                raise
            self.work.data.add_(self.before.data)
            self.work.copy_to([p.data for p in self.params])
        super().after_step()

    # -- the exchange ------------------------------------------------------
    def _exchange(self, source: torch.Tensor, what: str) -> torch.Tensor:
        """Encode ``source`` against the residual, all-gather, decode the mean into ``self.work``."""
        assert self.residual is not None and self.work is not None
        failure = None
        try:
            words = codec.encode(source, self.residual.data, self.tau, self.capacity)
        except codec.NonFiniteGradientError as error:
            failure = self._non_finite_error(error, what)
            words = torch.full((1,), _POISON, dtype=torch.int32, device=source.device)
        bytes_before = self.comm.stats.bytes_sent
        messages = self.comm.all_gather_v(words)
        if failure is not None:
            raise failure
        for rank, message in enumerate(messages):
            if message.numel() == 1 and int(message[0]) == _POISON:
                raise codec.NonFiniteGradientError(
                    f"sync=gtc: step {self.steps + 1}: rank {rank} had a non-finite {what} and sent "
                    f"nothing; stopping every rank (rank {rank}'s error names the parameter)", -1)
        self.bytes_last = self.comm.stats.bytes_sent - bytes_before
        self.words_last = words.numel()
        self.words_sent += self.words_last
        self.words_gathered_last = sum(m.numel() for m in messages)
        self.compressed_steps += 1
        self.work.data.zero_()
        codec.decode(self.work.data, messages, self.tau, 1.0 / self.comm.world_size)
        if self.clip is not None and self.compressed_steps % self.clip_every == 0:
            bound = self.clip * self.tau
            self.residual.data.clamp_(-bound, bound)
        if self.adaptive:  # after decoding: this step's words were made with this step's tau
            self._adapt_tau()
        return words

    def _adapt_tau(self) -> None:
        # Every rank knows words_gathered_last, so every rank takes the same tau, collective-free.
        self._window_words += self.words_gathered_last
        self._window_steps += 1
        if self._window_steps < self.adapt_every:
            return
        density = self._window_words / (self._window_steps * self.comm.world_size * self.residual.numel)
        self._window_words = self._window_steps = 0
        if self.density_min <= density <= self.density_max:
            return
        centre = math.sqrt(self.density_min * self.density_max)
        factor = math.sqrt(density / centre) if density > 0 else 0.0
        factor = min(max(factor, 1.0 / self.adapt_factor), self.adapt_factor)
        self.tau = codec.float32_tau(self.tau * factor)

    def _dense_step(self) -> None:
        """Warm-up: the dense all-reduce (with the velocity on the average: dense momentum SGD)."""
        flat = average_gradients(self.comm, self.params, self.work, self.bucket_bytes)
        if self.velocity is not None:
            self.velocity.mul_(self.momentum).add_(flat)
            flat.copy_(self.velocity)
        set_gradients(self.params, self.work)

    def _non_finite_error(self, error: codec.NonFiniteGradientError, what: str) -> Exception:
        tensor, offset = self.residual.locate(error.index)
        position = tuple(int(i) for i in torch.unravel_index(torch.tensor(offset), self.params[tensor].shape))
        if error.what == "grad":
            problem = f"the {what} of parameter '{self.names[tensor]}' is not finite (NaN or Inf)"
        else:
            problem = f"residual + {what} of parameter '{self.names[tensor]}' is not finite (float32 overflow)"
        state = ("the residual may be modified" if error.residual_modified
                 else "the residual and velocity are unchanged")
        return codec.NonFiniteGradientError(
            f"sync=gtc: step {self.steps + 1}: {problem} at index {position}; nothing was sent and {state}",
            error.index, error.what, error.residual_modified)

    # -- state and figures -------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's state (residuals and velocity differ per rank: checkpoint every rank)."""
        assert self.residual is not None, "state_dict() needs setup()/attach() first"
        return {
            "steps": self.steps, "rank": self.comm.rank, "world_size": self.comm.world_size,
            "numel": self.residual.numel, "tau": self.tau,
            "residual": self.residual.data.clone(),
            "velocity": None if self.velocity is None else self.velocity.clone(),
            "compressed_steps": self.compressed_steps, "words_sent": self.words_sent,
            "words_last": self.words_last, "words_gathered_last": self.words_gathered_last,
            "bytes_last": self.bytes_last,
            "window_words": self._window_words, "window_steps": self._window_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``; before setup() it is kept and applied by setup()."""
        if self.residual is None:
            self._pending_state = state
            return
        for key, mine in (("world_size", self.comm.world_size), ("rank", self.comm.rank),
                          ("numel", self.residual.numel)):
            if state[key] != mine:
                raise ValueError(f"GTC state is for {key}={state[key]}, this run has {key}={mine}: "
                                 "residuals are per rank and per model layout")
        if (state["velocity"] is None) != (self.velocity is None):
            raise ValueError("GTC state and sync.momentum_correction disagree on having a velocity")
        super().load_state_dict(state)
        self.tau = float(state["tau"])
        self.residual.data.copy_(state["residual"])
        if self.velocity is not None:
            self.velocity.copy_(state["velocity"])
        self.compressed_steps = int(state["compressed_steps"])
        self.words_sent, self.words_last = int(state["words_sent"]), int(state["words_last"])
        self.words_gathered_last, self.bytes_last = int(state["words_gathered_last"]), int(state["bytes_last"])
        self._window_words, self._window_steps = int(state["window_words"]), int(state["window_steps"])

    def stats(self) -> dict:
        s = super().stats()
        numel = self.residual.numel if self.residual is not None else 0
        s.update(
            tau=self.tau,
            words_sent=self.words_sent,              # this worker, total
            words_last_step=self.words_last,         # this worker, last step
            bytes_last_step=self.bytes_last,         # this worker, last step, padding included
            density=self.words_last / numel if numel else 0.0,
            density_mean=self.words_sent / (self.compressed_steps * numel) if self.compressed_steps else 0.0,
            density_global=self.words_gathered_last / (self.comm.world_size * numel) if numel else 0.0,
            compressed_steps=self.compressed_steps,
            conserving=self.clip is None,
        )
        return s


def _check(ok: bool, key: str, value, valid: str) -> None:
    if not ok:
        raise ValueError(f"{key} must be {valid}, got {value!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


