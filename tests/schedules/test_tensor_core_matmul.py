"""The tensor-core gather tile: knob checks, target gating, and a CUDA build checked here."""

from __future__ import annotations

import pytest
from tvm.target import Target

from cuda_build import SM90, assert_compiles_for_sm90
from pit_compiler.codegen.build import compile_primfunc
from pit_compiler.codegen.gather_matmul import build_row_gather_tile, fits_tensor_cores
from pit_compiler.ir import InvalidKnobs
from pit_compiler.schedules.tensor_core_matmul import TensorCoreMatmul

TEMPLATE = TensorCoreMatmul()


@pytest.mark.parametrize(
    "knobs",
    [dict(block_m=100), dict(block_k=24), dict(block_m=64, warps_m=4), dict(warps_m=4, warps_n=4), dict(block_n=64, warps_n=4), dict(vector_a=3),
     dict(stages=0), dict(block_n=256, warps_n=4, stages=2)],
)
def test_invalid_knobs_are_pruned(knobs):
    with pytest.raises(InvalidKnobs):
        TensorCoreMatmul.Knobs(**knobs)


def test_gated_to_cuda_sm80_and_the_gather_workload():
    func = build_row_gather_tile(64, 128, 128)
    assert TEMPLATE.apply(func, Target("llvm"), TEMPLATE.Knobs()) is None
    assert TEMPLATE.apply(func, Target({"kind": "cuda", "arch": "sm_75"}), TEMPLATE.Knobs()) is None
    assert fits_tensor_cores(64, 128, "float16", SM90, TEMPLATE.Knobs())
    assert not fits_tensor_cores(64, 130, "float16", SM90, TEMPLATE.Knobs())
    assert fits_tensor_cores(64, 128, "bfloat16", SM90, TEMPLATE.Knobs())
    assert not fits_tensor_cores(64, 128, "float32", SM90, TEMPLATE.Knobs())


@pytest.mark.parametrize("knobs", list(TEMPLATE.space(SM90)), ids=lambda k: f"{k.block_m}x{k.block_n}x{k.block_k}")
def test_builds_mma_with_the_gather_inlined(knobs, tmp_path):
    executable = compile_primfunc(build_row_gather_tile(256, 512, knobs.block_m), SM90, knobs, template=TEMPLATE)
    source = executable.mod.imports[0].inspect_source()
    assert "mma.sync" in source and "ldmatrix" in source
    gathers = [line for line in source.splitlines() if "A_ptr" in line and "idx_ptr[" in line]
    assert gathers, "the row gather was not folded into the shared-memory copy"
    if knobs.stages > 1:
        assert all("cp_async" in line for line in gathers), "the gathered rows are not fetched by cp.async"
    assert_compiles_for_sm90(source, tmp_path, "row_gather")


def test_bfloat16_row_gather_builds_bf16_mma(tmp_path):
    executable = compile_primfunc(build_row_gather_tile(256, 512, 128, "bfloat16"), SM90, TEMPLATE.Knobs(), template=TEMPLATE)
    source = executable.mod.imports[0].inspect_source()
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in source and "f16.f16" not in source
    assert_compiles_for_sm90(source, tmp_path, "row_gather_bf16")
