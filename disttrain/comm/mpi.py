"""Communicator over MPI (mpi4py), and MASTER_ADDR sharing for torch.distributed under mpiexec.

``MPICommunicator`` runs the four collectives straight through MPI on
``tensor.numpy()`` views, with no torch.distributed process group at all:

    all_reduce_   Allreduce(MPI.IN_PLACE, buf, SUM)         typed: float32/64, int8/16/32/64, uint8
    broadcast_    Bcast(buf, root=src)                      raw bytes: any dtype
    all_gather_v  Allgather(count), then Allgatherv(msg)    raw bytes, exact counts, no padding
    barrier       Barrier()

Byte accounting is the same as TorchCommunicator's (payload this worker
contributes): an all-reduce counts the buffer, a broadcast counts it on the
source only, an all-gather counts the 8-byte count word plus the message.
Since Allgatherv sends each message at its own length, GTC's variable-size
messages cost what they weigh, where gloo pads every one to the longest.

CUDA tensors go to MPI as device pointers when the library says it is
CUDA-aware (``MPIX_Query_cuda_support``, Open MPI and MPICH >= 4), otherwise
they are staged through host memory; ``comm.path`` says which ("cpu",
"cuda-aware" or "host-staged") and rank 0 logs it.  With more ranks than
cores on a host, MPICH is told to yield instead of busy-polling (see
``_tune_for_oversubscription``).

Failure handling.  MPI has no collective timeout and no error a peer can
catch, so a rank that fails must take the job down, or the others wait in
their next collective forever.  With more than one rank the communicator

- installs a ``sys.excepthook`` that prints the error with the rank and calls
  ``MPI.COMM_WORLD.Abort(1)``;
- registers an ``atexit`` check: a process that exits (``sys.exit(2)`` after a
  caught ValueError, Hydra's exit after an uncaught one) before ``close()`` has
  failed, and aborts the job the same way;
- runs a watchdog thread that aborts the job when one collective has waited
  more than ``timeout_s`` (a peer that hangs without dying).

A peer that is killed outright is caught by mpiexec itself: MPICH's Hydra
ends every other rank as soon as one exits abnormally.

Example::

    # mpiexec -n 4 python -m disttrain.train comm=mpi sync=gtc
    comm = MPICommunicator()
    comm.all_gather_v(torch.tensor([3, 9], dtype=torch.int32))  # list of 4 tensors
    comm.close()
"""
from __future__ import annotations

import atexit
import ctypes
import logging
import os
import socket
import sys
import threading
import time
import traceback
from contextlib import contextmanager

import torch

from ..launch import WorldInfo
from .base import Communicator
from .torch_dist import _resolve_device

log = logging.getLogger("disttrain")


def _tune_for_oversubscription() -> None:
    """Settings for MPICH when a host runs more ranks than it has cores.

    MPICH busy-polls inside every blocking call; ranks spinning on a shared
    core starve the ones with data to move, so make it yield.  And every round
    of a collective waits for a peer that may be descheduled, so Allgatherv
    takes Bruck's log2(N) rounds instead of the ring's N - 1.  Measured with
    1e6 int32 words over 4 ranks on 2 busy cores: spinning ring 2 s, yielding
    ring 0.25 s, yielding Bruck 0.05 s.  Read at MPI_Init, so this runs before
    mpi4py.MPI is first imported; explicit settings win.
    """
    local = os.environ.get("MPI_LOCALNRANKS") or os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE")
    if local and local.isdigit() and int(local) > (os.cpu_count() or 1):
        os.environ.setdefault("MPIR_CVAR_ENABLE_HEAVY_YIELD", "1")
        os.environ.setdefault("MPIR_CVAR_ALLGATHERV_INTRA_ALGORITHM", "brucks")


def _mpi():
    if "mpi4py.MPI" not in sys.modules:
        _tune_for_oversubscription()
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise ValueError("comm=mpi needs mpi4py and an MPI library: pip install -e '.[mpi]' "
                         f"(or use comm=torch) [{error}]") from None
    return MPI


def _reduce_types(MPI) -> dict:
    return {torch.float32: MPI.FLOAT, torch.float64: MPI.DOUBLE, torch.int8: MPI.INT8_T,
            torch.int16: MPI.INT16_T, torch.int32: MPI.INT32_T, torch.int64: MPI.INT64_T,
            torch.uint8: MPI.UINT8_T}


def mpi_cuda_aware() -> bool:
    """Whether the loaded MPI library accepts CUDA device pointers.

    mpi4py does not wrap ``MPIX_Query_cuda_support``, so ask the libmpi the
    process has loaded (found in /proc/self/maps); no answer means no.
    """
    _mpi()  # loads libmpi
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libmpi.so" in line}
        for path in paths:
            query = getattr(ctypes.CDLL(path), "MPIX_Query_cuda_support", None)
            if query is not None:
                return bool(query())
    except OSError:
        pass
    return False


def _abort(message: str) -> None:
    """Print ``message`` and end every rank of the job (does not return)."""
    print(message, file=sys.stderr, flush=True)
    # The message sits in a pipe to mpiexec's proxy; Abort tears the proxies down at once,
    # so give them a moment to forward it, or the user sees the job die without a reason.
    time.sleep(0.5)
    _mpi().COMM_WORLD.Abort(1)
    os._exit(1)  # MPICH's Abort can return once mpiexec has been told; never run on


class _Watchdog:
    """Aborts the job when one collective runs longer than ``timeout_s``.

    mpi4py releases the GIL inside MPI calls and initialises MPI with
    THREAD_MULTIPLE, so this thread can still run and call Abort.
    """

    def __init__(self, timeout_s: float, rank: int) -> None:
        self.timeout_s, self.rank = timeout_s, rank
        self._op: str | None = None
        self._deadline = float("inf")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mpi-watchdog", daemon=True)
        self._thread.start()

    @contextmanager
    def watch(self, op: str):
        self._op, self._deadline = op, time.monotonic() + self.timeout_s
        try:
            yield
        finally:
            self._deadline = float("inf")

    def _run(self) -> None:
        poll = min(1.0, self.timeout_s / 4)
        while not self._stop.wait(poll):
            if time.monotonic() > self._deadline:
                _abort(f"disttrain: rank {self.rank}: MPI {self._op} waited more than "
                       f"comm.timeout_s={self.timeout_s:g} s for its peers; aborting the job")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class MPICommunicator(Communicator):
    """Collectives through mpi4py; launch with ``mpiexec -n N``.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (``cuda`` picks the
            node-local rank's GPU); where synchronizers keep their buffers.
        timeout_s: the longest one collective may wait before the watchdog
            aborts the whole job.
        abort_on_error: end the whole job when this rank raises or exits
            before ``close()`` (see the module docstring).
        cuda_aware: ``auto`` (ask the MPI library), ``true`` or ``false``.
    """

    def __init__(self, device: str = "auto", timeout_s: float = 300.0, abort_on_error: bool = True,
                 cuda_aware: str | bool = "auto") -> None:
        super().__init__()
        if not timeout_s > 0:
            raise ValueError(f"comm.timeout_s must be > 0 seconds, got {timeout_s}")
        if cuda_aware not in ("auto", True, False):
            raise ValueError(f"comm.cuda_aware={cuda_aware!r}: valid values are auto, true, false")
        MPI = _mpi()
        self._MPI = MPI
        self.comm = MPI.COMM_WORLD.Dup()  # our own context: no crosstalk with user MPI traffic
        self.rank, self.world_size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank = node.Get_rank()
        node.Free()
        self.device = _resolve_device(device, WorldInfo(self.rank, self.world_size, self.local_rank, "mpi"))
        self.timeout_s = float(timeout_s)
        if self.device.type == "cpu":
            self.path = "cpu"
        else:
            aware = mpi_cuda_aware() if cuda_aware == "auto" else cuda_aware
            self.path = "cuda-aware" if aware else "host-staged"
        if self.rank == 0:
            log.info("MPI communicator: %d ranks, %s, device %s, %s path",
                     self.world_size, MPI.Get_library_version().splitlines()[0].strip(),
                     self.device, self.path)
        self._closed = False
        self._watchdog = _Watchdog(self.timeout_s, self.rank) if self.world_size > 1 else None
        self._abort_on_error = abort_on_error and self.world_size > 1
        if self._abort_on_error:
            self._previous_excepthook = sys.excepthook
            sys.excepthook = self._excepthook
            atexit.register(self._exit_check)

    # -- failure handling ------------------------------------------------------
    def _excepthook(self, kind, value, tb) -> None:
        traceback.print_exception(kind, value, tb)
        _abort(f"disttrain: rank {self.rank} of {self.world_size} failed with "
               f"{kind.__name__}: {value}; aborting the MPI job")

    def _exit_check(self) -> None:
        if not self._closed:
            _abort(f"disttrain: rank {self.rank} of {self.world_size} is exiting before closing its "
                   "MPI communicator (see the error above); aborting the MPI job so no peer hangs")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.stop()
        if self._abort_on_error:
            atexit.unregister(self._exit_check)
            if sys.excepthook == self._excepthook:
                sys.excepthook = self._previous_excepthook
        self.comm.Free()

    # -- buffers ---------------------------------------------------------------
    def _host(self, t: torch.Tensor) -> torch.Tensor:
        """The tensor MPI reads and writes: ``t`` itself, or a host copy to stage through."""
        if t.device.type == "cpu" or self.path == "cuda-aware":
            if t.device.type == "cuda":  # MPI knows nothing of torch streams
                torch.cuda.current_stream(t.device).synchronize()
            return t
        return t.to("cpu")

    def _bytes(self, t: torch.Tensor):
        """An MPI buffer of ``t``'s raw bytes (a numpy view, or the CUDA tensor)."""
        raw = t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8, device=t.device)
        return [raw if raw.device.type == "cuda" else raw.numpy(), self._MPI.BYTE]

    # -- collectives -----------------------------------------------------------
    def _all_reduce_(self, buffer):
        mpi_type = _reduce_types(self._MPI).get(buffer.dtype)
        if mpi_type is None:
            valid = ", ".join(str(d).removeprefix("torch.") for d in _reduce_types(self._MPI))
            raise ValueError(f"MPICommunicator.all_reduce_ does not sum {buffer.dtype}; valid dtypes: {valid}")
        host = self._host(buffer)
        view = host if host.device.type == "cuda" else host.numpy()
        with self._watchdog.watch("all_reduce"):
            self.comm.Allreduce(self._MPI.IN_PLACE, [view, mpi_type], op=self._MPI.SUM)
        if host is not buffer:
            buffer.copy_(host)
        return buffer.numel() * buffer.element_size()

    def _broadcast_(self, buffer, src):
        if not 0 <= src < self.world_size:
            raise ValueError(f"broadcast_ src={src} is not a rank of this {self.world_size}-rank world")
        host = self._host(buffer)
        with self._watchdog.watch("broadcast"):
            self.comm.Bcast(self._bytes(host), root=src)
        if host is not buffer:
            buffer.copy_(host)
        return buffer.numel() * buffer.element_size() if self.rank == src else 0

    def _all_gather_v(self, message):
        import numpy as np

        counts = np.empty(self.world_size, dtype=np.int64)
        with self._watchdog.watch("all_gather_v"):
            self.comm.Allgather([np.array([message.numel()], dtype=np.int64), self._MPI.INT64_T],
                                [counts, self._MPI.INT64_T])
        sent = 8
        total = int(counts.sum())
        if total == 0:  # everyone knows it: skip the second collective
            return [message.new_empty(0) for _ in counts], sent
        host = self._host(message)
        gathered = host.new_empty(total)
        size = message.element_size()
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        with self._watchdog.watch("all_gather_v"):
            recv, byte = self._bytes(gathered)
            self.comm.Allgatherv(self._bytes(host), [recv, (counts * size, offsets * size), byte])
        if gathered.device != message.device:
            gathered = gathered.to(message.device)
        sent += message.numel() * size
        return [gathered[o:o + n] for o, n in zip(offsets.tolist(), counts.tolist())], sent

    def _barrier(self):
        with self._watchdog.watch("barrier"):
            self.comm.Barrier()
        return 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _master_address(single_host: bool) -> str:
    """Rank 0's address as the other ranks can reach it (MASTER_ADDR wins)."""
    if os.environ.get("MASTER_ADDR"):
        return os.environ["MASTER_ADDR"]
    if single_host:
        return "127.0.0.1"
    address = socket.gethostbyname(socket.getfqdn())
    if address.startswith("127."):  # /etc/hosts maps the name to loopback: useless to other hosts
        raise ValueError(f"rank 0's host name {socket.getfqdn()!r} resolves to {address}, which other hosts "
                         "cannot reach: set MASTER_ADDR to rank 0's address (mpiexec -genv MASTER_ADDR ...)")
    return address


def share_master_address() -> tuple[str, int]:
    """Give every rank of an MPI job rank 0's MASTER_ADDR and a free MASTER_PORT.

    torch.distributed's env:// rendezvous needs both; mpiexec sets neither.
    Rank 0 picks them (127.0.0.1 when all ranks share one host, else its
    resolvable address; MASTER_ADDR / MASTER_PORT already set on rank 0 win)
    and broadcasts them over MPI.COMM_WORLD; every rank writes them to
    os.environ.  An error on rank 0 is raised on every rank, so none hangs.
    """
    MPI = _mpi()
    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    single_host = node.Get_size() == world.Get_size()
    node.Free()
    choice: tuple | str | None = None
    if world.Get_rank() == 0:
        try:
            choice = (_master_address(single_host), int(os.environ.get("MASTER_PORT") or _free_port()))
        except (OSError, ValueError) as error:
            choice = f"share_master_address on rank 0: {error}"
    choice = world.bcast(choice, root=0)
    if isinstance(choice, str):
        raise ValueError(choice)
    address, port = choice
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address, str(port)
    return address, port
