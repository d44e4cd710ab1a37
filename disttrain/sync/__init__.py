"""Synchronizers: one algorithm per module, all built on ``Synchronizer``."""
from .allreduce import AllReduce
from .base import Synchronizer
from .bmuf import BMUF
from .gtc import GTC

__all__ = ["Synchronizer", "AllReduce", "BMUF", "GTC"]
