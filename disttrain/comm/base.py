"""The communicator interface: every byte a synchronizer exchanges goes through here.

Synchronizers never call torch.distributed or MPI directly.  They use four
collectives on flat tensors, and the communicator counts bytes sent and
seconds spent for each, so every backend reports traffic the same way.

Bytes are *payload bytes contributed by this worker*: a dense all-reduce of a
B-byte buffer counts B (a ring algorithm puts 2(N-1)/N * B on the wire), a
variable-length all-gather counts the count word plus the message as it is
actually sent (padding included where the backend pads).
"""
from __future__ import annotations

import abc
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class OpStats:
    calls: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0


@dataclass
class CommStats:
    ops: dict[str, OpStats] = field(default_factory=dict)

    def record(self, op: str, nbytes: int, seconds: float) -> None:
        s = self.ops.setdefault(op, OpStats())
        s.calls += 1
        s.bytes_sent += nbytes
        s.seconds += seconds

    @property
    def calls(self) -> int:
        return sum(s.calls for s in self.ops.values())

    @property
    def bytes_sent(self) -> int:
        return sum(s.bytes_sent for s in self.ops.values())

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.ops.values())

    def as_dict(self) -> dict:
        return {
            "collectives": self.calls,
            "bytes_sent": self.bytes_sent,
            "comm_s": self.seconds,
            "by_op": {k: vars(v).copy() for k, v in self.ops.items()},
        }


class CommError(RuntimeError):
    """A collective failed: a peer died, hung past the timeout, or the link broke."""


class Communicator(abc.ABC):
    """Collectives on flat tensors, with accounting.

    Subclasses implement the underscored methods and return the bytes they
    sent; the public methods time them and record the figures.
    """

    rank: int
    world_size: int

    def __init__(self) -> None:
        self.stats = CommStats()
        self._counting = True

    # -- collectives -------------------------------------------------------
    def all_reduce_(self, buffer: torch.Tensor) -> torch.Tensor:
        """Sum ``buffer`` over all workers, in place. Returns ``buffer``."""
        self._check_flat(buffer, "all_reduce_")
        if self.world_size > 1:
            with self._timed("all_reduce"):
                self._last_bytes = self._all_reduce_(buffer)
        return buffer

    def broadcast_(self, buffer: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``buffer`` on every worker with ``src``'s copy, in place."""
        self._check_flat(buffer, "broadcast_")
        if self.world_size > 1:
            with self._timed("broadcast"):
                self._last_bytes = self._broadcast_(buffer, src)
        return buffer

    def all_gather_v(self, message: torch.Tensor) -> list[torch.Tensor]:
        """Every worker's 1-D message, in rank order; lengths may differ (and may be 0)."""
        self._check_flat(message, "all_gather_v")
        if self.world_size == 1:
            return [message]
        with self._timed("all_gather_v"):
            messages, self._last_bytes = self._all_gather_v(message)
        return messages

    def barrier(self) -> None:
        if self.world_size > 1:
            with self._timed("barrier"):
                self._last_bytes = self._barrier()

    def close(self) -> None:
        """Release the backend (idempotent)."""

    # -- backend hooks -----------------------------------------------------
    @abc.abstractmethod
    def _all_reduce_(self, buffer: torch.Tensor) -> int: ...

    @abc.abstractmethod
    def _broadcast_(self, buffer: torch.Tensor, src: int) -> int: ...

    @abc.abstractmethod
    def _all_gather_v(self, message: torch.Tensor) -> tuple[list[torch.Tensor], int]: ...

    @abc.abstractmethod
    def _barrier(self) -> int: ...

    # -- accounting --------------------------------------------------------
    @contextmanager
    def uncounted(self):
        """Traffic inside this block (logging, evaluation) is left out of the stats."""
        previous, self._counting = self._counting, False
        try:
            yield
        finally:
            self._counting = previous

    @contextmanager
    def _timed(self, op: str):
        self._last_bytes = 0
        start = time.perf_counter()
        try:
            yield
        except RuntimeError as e:  # gloo / NCCL / MPI errors: say what it means, keep the cause
            if isinstance(e, CommError):
                raise
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CommError(
                f"{op} failed on rank {self.rank} after {time.perf_counter() - start:.1f} s: a peer "
                f"died, hung past comm.timeout_s={getattr(self, 'timeout_s', '?')}, or the link broke "
                f"({detail[:300]})") from e
        if self._counting:
            self.stats.record(op, self._last_bytes, time.perf_counter() - start)

    @staticmethod
    def _check_flat(t: torch.Tensor, op: str) -> None:
        if t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"{op} takes a contiguous 1-D tensor, got shape {tuple(t.shape)}")


class LocalCommunicator(Communicator):
    """A world of one: every collective is the identity and sends nothing."""

    rank = 0
    world_size = 1

    def __init__(self, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device)

    def _all_reduce_(self, buffer):  # pragma: no cover - world_size 1 never calls it
        return 0

    def _broadcast_(self, buffer, src):  # pragma: no cover
        return 0

    def _all_gather_v(self, message):  # pragma: no cover
        return [message], 0

    def _barrier(self):  # pragma: no cover
        return 0
