"""Communicators: the only way synchronizers talk to other workers."""
from .base import CommError, CommStats, Communicator, LocalCommunicator
from .torch_dist import TorchCommunicator

__all__ = ["CommError", "Communicator", "CommStats", "LocalCommunicator", "TorchCommunicator"]
