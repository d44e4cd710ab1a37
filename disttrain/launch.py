"""Who am I and how many are we: read the launcher's environment.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.
MPI launchers set their own variables (Open MPI: OMPI_COMM_WORLD_*, MPICH and
Intel MPI through PMI: PMI_RANK / PMI_SIZE, MPICH's hydra also MPI_LOCALRANKID),
Slurm's srun sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID.  No launcher at
all means a single worker.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun", "mpi", "slurm" or "none"

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


# Checked in order; the first launcher whose size variable is present wins.
# torchrun comes first because torchrun inside an MPI or Slurm allocation is
# common and its variables are the ones that describe *this* process group.
_LAUNCHERS = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("mpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("mpi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("mpi", "PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from None


def detect_world(env: Mapping[str, str] | None = None) -> WorldInfo:
    """Rank, world size and local rank from whichever launcher started us."""
    env = os.environ if env is None else env
    for launcher, rank_key, size_key, local_key in _LAUNCHERS:
        if size_key in env and rank_key in env:
            rank, size = _int(env, rank_key), _int(env, size_key)
            local = _int(env, local_key) if local_key in env else rank
            if size < 1 or not 0 <= rank < size:
                raise ValueError(f"{rank_key}={rank} and {size_key}={size} do not describe a valid rank")
            return WorldInfo(rank, size, local, launcher)
    return WorldInfo(0, 1, 0, "none")
