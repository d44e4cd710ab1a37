"""Synchronizers: one algorithm per module, all built on ``Synchronizer``."""
from .allreduce import AllReduce
from .base import Synchronizer

__all__ = ["Synchronizer", "AllReduce"]
