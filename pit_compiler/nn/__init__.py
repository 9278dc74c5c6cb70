"""Drop-in modules for explicit control: each replaces the PyTorch module it names."""

from . import functional
from .linear import SparseLinear

__all__ = ["SparseLinear", "functional"]
