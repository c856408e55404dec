"""fastpeft: kernel-backed parameter-efficient fine-tuning for PyTorch.

Importing fastpeft never fails for a missing extension, Triton or GPU and never
initialises CUDA; ``fastpeft info`` tells which backends are active and why.
"""
from ._version import __version__
from .backends import BackendError, use_backend
from . import ops

__all__ = ["__version__", "BackendError", "use_backend", "ops"]
