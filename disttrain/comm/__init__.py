"""Communicators: the only way synchronizers talk to other workers."""
from .base import CommStats, Communicator, LocalCommunicator
from .torch_dist import TorchCommunicator

__all__ = ["Communicator", "CommStats", "LocalCommunicator", "TorchCommunicator"]
