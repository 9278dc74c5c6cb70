"""PIT: a sparse tensor compiler for PyTorch (``import pit_compiler as pit``).

PIT turns operators with dynamically sparse operands into gather -> dense tile -> scatter
kernels (Permutation Invariant Transformation, SOSP'23), generated and built with Apache TVM.
"""

from pit_compiler import nn
from pit_compiler.api import detect_micro_tiles, select_micro_tile, sparse_matmul
from pit_compiler.frontend.compile import compile
from pit_compiler.ops import kernel_cache, set_kernel_cache
from pit_compiler.ir import (
    BackendUnavailable,
    CompilationError,
    InvalidKnobs,
    PITError,
    UnsupportedPattern,
    derive_pit_rules,
    parse_operator,
)
from pit_compiler.runtime import MicroTileIndex

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "CompilationError",
    "InvalidKnobs",
    "MicroTileIndex",
    "PITError",
    "UnsupportedPattern",
    "compile",
    "derive_pit_rules",
    "detect_micro_tiles",
    "kernel_cache",
    "nn",
    "parse_operator",
    "select_micro_tile",
    "set_kernel_cache",
    "sparse_matmul",
]
