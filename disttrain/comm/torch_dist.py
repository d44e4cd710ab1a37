"""Communicator over torch.distributed: gloo for CPU tensors, NCCL for CUDA."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from ..launch import WorldInfo, detect_world
from .base import Communicator

# torch 2.13 renamed all_gather_into_tensor (the old name warns); keep both working.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _resolve_device(device: str, world: WorldInfo) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"comm.device={device!r}: valid values are auto, cpu, cuda, cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("comm.device=cuda but no CUDA device is visible; use comm.device=cpu")
        if dev.index is None:
            dev = torch.device("cuda", world.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    return dev


def _store(world: WorldInfo, timeout_s: float) -> dist.Store:
    """The rendezvous store, with a key prefix per torchrun restart.

    After ``torchrun --max-restarts`` restarts a failed group, the agent's store
    still holds the dead workers' gloo addresses under the same keys; without a
    per-attempt prefix the new workers read them and fail to connect.
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    tcp = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world.world_size,
                        is_master=not agent_store and world.rank == 0,
                        timeout=datetime.timedelta(seconds=timeout_s))
    return dist.PrefixStore(f"disttrain/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", tcp)


class TorchCommunicator(Communicator):
    """Collectives through torch.distributed.

    Joins the default process group if one exists (a user who already called
    ``init_process_group`` keeps theirs), otherwise creates one from the
    launcher's environment.  ``timeout_s`` bounds every collective: a dead or
    hung peer ends the job with an error instead of a hang.

    Args:
        backend: ``auto`` (NCCL for CUDA, gloo for CPU), ``gloo`` or ``nccl``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; ``cuda`` picks LOCAL_RANK's GPU.
        timeout_s: collective timeout in seconds.
    """

    def __init__(self, backend: str = "auto", device: str = "auto", timeout_s: float = 300.0,
                 world: WorldInfo | None = None) -> None:
        super().__init__()
        if timeout_s <= 0:
            raise ValueError(f"comm.timeout_s must be > 0 seconds, got {timeout_s}")
        if backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"comm.backend={backend!r}: valid values are auto, gloo, nccl")
        self.timeout_s = float(timeout_s)
        self._owns_group = False
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            world = WorldInfo(self.rank, self.world_size,
                              int(os.environ.get("LOCAL_RANK", self.rank)), "existing")
            self.device = _resolve_device(device, world)
            self.backend = dist.get_backend()
            return
        world = world or detect_world()
        self.rank, self.world_size = world.rank, world.world_size
        self.device = _resolve_device(device, world)
        self.backend = ("nccl" if self.device.type == "cuda" else "gloo") if backend == "auto" else backend
        if self.backend == "nccl" and self.device.type != "cuda":
            raise ValueError("comm.backend=nccl needs comm.device=cuda (NCCL has no CPU tensors)")
        if world.world_size > 1:
            if world.launcher != "torchrun" and not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
                from .mpi import share_master_address  # only MPI launchers lack MASTER_ADDR

                share_master_address()
            os.environ.setdefault("RANK", str(world.rank))
            os.environ.setdefault("WORLD_SIZE", str(world.world_size))
            for key in ("MASTER_ADDR", "MASTER_PORT"):
                if key not in os.environ:
                    raise ValueError(f"{key} is not set: launch with torchrun, or set {key} for rank 0's host")
            dist.init_process_group(
                self.backend, store=_store(world, self.timeout_s), rank=world.rank,
                world_size=world.world_size,
                timeout=datetime.timedelta(seconds=self.timeout_s),
                device_id=self.device if self.device.type == "cuda" else None,
            )
            self._owns_group = True

    def _sync_device(self) -> None:
        # NCCL calls return once enqueued; wait so the seconds we record are real.
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _all_reduce_(self, buffer):
        dist.all_reduce(buffer)
        self._sync_device()
        return buffer.numel() * buffer.element_size()

    def _broadcast_(self, buffer, src):
        dist.broadcast(buffer, src)
        self._sync_device()
        return buffer.numel() * buffer.element_size() if self.rank == src else 0

    def _all_gather_v(self, message):
        # gloo and NCCL want equal sizes: exchange the counts, then pad to the longest.
        counts = torch.empty(self.world_size, dtype=torch.int64, device=message.device)
        _all_gather_flat(counts, torch.tensor([message.numel()], dtype=torch.int64,
                                                         device=message.device))
        counts = counts.tolist()
        sent = 8
        longest = max(counts)
        if longest == 0:  # everyone knows it: skip the second collective, nobody waits
            return [message.new_empty(0) for _ in counts], sent
        padded = message.new_zeros(longest)
        padded[: message.numel()] = message
        gathered = message.new_empty(self.world_size * longest)
        _all_gather_flat(gathered, padded)
        self._sync_device()
        sent += longest * message.element_size()
        return [gathered[r * longest: r * longest + n] for r, n in enumerate(counts)], sent

    def _barrier(self):
        dist.barrier()
        return 0

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False
