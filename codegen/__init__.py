"""Code generation: the PIT transformation as TIR, scheduled and built with Apache TVM."""

from .build import CODEGEN_VERSION, compile_primfunc, kernel_key
from .detect import build_detect
from .kernels import detect_kernel, matmul_kernel, matmul_module
from .pit_matmul import build_pit_matmul, kernel_order

__all__ = [
    "CODEGEN_VERSION",
    "build_detect",
    "build_pit_matmul",
    "compile_primfunc",
    "detect_kernel",
    "kernel_key",
    "kernel_order",
    "matmul_kernel",
    "matmul_module",
]
