"""The tensor-core intrinsics the matmul tile tensorizes with, per input dtype.

TVM 0.27 registers ``ldmatrix`` and ``mma`` intrinsics for float16 inputs only. bfloat16 moves
through the same warp layouts and instructions (``ldmatrix`` copies 16-bit words whatever they
hold; ``mma.sync.m16n8k16`` takes ``bf16`` operands with float32 accumulators from sm_80 on), so
its intrinsics are TVM's float16 definitions with the operand type renamed, registered here on
first use. Accumulators are float32 for both: the fill and store intrinsics are shared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import sys

INPUT_DTYPES = ("float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class MmaIntrinsics:
    """Registered names of the intrinsics of one input dtype."""

    ldmatrix_a: str
    ldmatrix_b: str
    mma: str
    fill: str
    store_global: str
    store_shared: str


def cuda_intrinsics():
    """TVM's CUDA tensor intrinsics module, imported on first use: the import parses and
    registers several hundred TVMScript functions, which ``import pit_compiler`` must not pay."""
    with _cheap_frame_stack():
        from tvm.s_tir.tensor_intrin import cuda

    return cuda


@contextlib.contextmanager
def _cheap_frame_stack():
    """Make ``inspect.stack()`` cheap while TVM's intrinsics are parsed.

    TVMScript's ``prim_func`` calls ``inspect.stack()`` once per function, and the standard one
    looks up every frame's source file, scanning all of ``sys.modules`` for each frame of the
    import machinery (which has no file): after ``import torch``, 80 to 200 s on a 2-core VM
    for this one import. The parser reads frames, and source lines of its caller's caller only
    (``utils.is_defined_in_class``), so those are all this one computes: the import takes ~5 s.
    """
    original = inspect.stack

    def stack(context: int = 1) -> list:
        frames, frame = [], sys._getframe(1)
        while frame is not None:
            code = frame.f_code
            frames.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, None, None))
            frame = frame.f_back
        if len(frames) > 2 and context:
            frames[2] = inspect.FrameInfo(frames[2].frame, *inspect.getframeinfo(frames[2].frame, context))
        return frames

    inspect.stack = stack
    try:
        yield
    finally:
        inspect.stack = original


@functools.lru_cache(maxsize=None)
def mma_intrinsics(dtype: str) -> MmaIntrinsics:
    """The intrinsics for ``dtype`` inputs (one of :data:`INPUT_DTYPES`), registered once."""
    if dtype not in INPUT_DTYPES:
        raise ValueError(f"tensor-core tiles take {INPUT_DTYPES} inputs, got {dtype!r}")
    from tvm.s_tir import TensorIntrin

    cuda = cuda_intrinsics()

    float16 = MmaIntrinsics(
        ldmatrix_a=cuda.LDMATRIX_f16_A_INTRIN,
        ldmatrix_b=cuda.LDMATRIX_f16_B_INTRIN,
        mma=cuda.MMA_f16f16f32_INTRIN,
        fill=cuda.MMA_fill_16x16_f32_INTRIN,
        store_global=cuda.MMA_store_16x16_f32_global_INTRIN,
        store_shared=cuda.MMA_store_16x16_f32_shared_dyn_INTRIN,
    )
    if dtype == "float16":
        return float16
    definitions = {
        "ldmatrix_a": cuda.get_ldmatrix_intrin(16, "float16", "A", False),
        "ldmatrix_b": cuda.get_ldmatrix_intrin(16, "float16", "B", False),
        "mma": cuda.get_mma_intrin(16, "float16", "float16", "float32", False, False),
    }
    names = {}
    for field, (desc, impl) in definitions.items():
        names[field] = f"pit_{getattr(float16, field)}_bf16"
        TensorIntrin.register(names[field], _as_bfloat16(desc), _as_bfloat16(impl), override=True)
    return dataclasses.replace(float16, **names)


def _as_bfloat16(func):
    """``func`` (TVMScript of a float16 intrinsic) with its 16-bit operands typed bfloat16."""
    from tvm.script.parser.core.entry import parse

    text = func.script().replace('"float16"', '"bfloat16"').replace('"fp16"', '"bf16"')
    return parse(text).without_attr("global_symbol")
