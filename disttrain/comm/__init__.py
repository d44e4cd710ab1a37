"""Communicators: the only way synchronizers talk to other workers.

``TorchCommunicator`` (torch.distributed: gloo, NCCL) and ``MPICommunicator``
(mpi4py; imports MPI only when constructed).
"""
from .base import CommError, CommStats, Communicator, LocalCommunicator
from .mpi import MPICommunicator, share_master_address
from .torch_dist import TorchCommunicator

__all__ = ["CommError", "Communicator", "CommStats", "LocalCommunicator", "MPICommunicator",
           "TorchCommunicator", "share_master_address"]
