"""Schedule templates: knob validation, target gating, and CUDA builds without a GPU."""

import dataclasses

import pytest
import tvm
from tvm import s_tir
from tvm.target import Target

from pit_compiler import schedules
from pit_compiler.codegen import build_detect, build_pit_matmul, compile_primfunc
from pit_compiler.ir import BackendUnavailable, CompilationError, InvalidKnobs, SparsityAttr, as_contraction, plan_pit
from pit_compiler.schedules import CpuParallel, SimtThreads

CUDA = Target({"kind": "cuda", "arch": "sm_90"})
LLVM = Target("llvm")
MATMUL = as_contraction("C[m, n] += A[m, k] * B[k, n]")
SIZES = {"m": 64, "n": 64, "k": 64}

# name -> (sparse operand, micro-tile, form, whether partial sums are added)
MATMUL_CASES = {
    "reduce": ("A", (32, 1), "reduce", False),
    "scatter_accumulate": ("A", (32, 1), "scatter", True),
    "scatter": ("A", (1, 64), "scatter", False),
    "output": ("C", (32, 1), "output", False),
}
KERNELS = [*MATMUL_CASES, "detect"]


def matmul_plan(name: str):
    operand, tile, form, accumulate = MATMUL_CASES[name]
    plan = plan_pit(MATMUL, SparsityAttr(operand, tile), SIZES, form=form)
    assert (plan.form, plan.accumulate) == (form, accumulate)
    return plan


def primfunc(name: str, dtype: str = "float32"):
    """A fresh PrimFunc of one PIT kernel (atomic adds on, as CUDA builds them)."""
    if name == "detect":
        return build_detect(("batch", "rows", "cols"), "rows", "cols", 32, 1, dtype)
    return build_pit_matmul(matmul_plan(name), dtype, "float32", atomic=True)


def cuda_source(executable) -> str:
    return executable.mod.imports[0].inspect_source()


@pytest.fixture(scope="module")
def cuda_sources():
    """The CUDA C of every PIT kernel, built once with the default knobs."""
    return {name: cuda_source(compile_primfunc(primfunc(name), CUDA)) for name in KERNELS}


def scheduled_loops(sch: s_tir.Schedule):
    """Per annotated block: its name and the loops above it."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    return [(sch.get(b).name_hint, [sch.get(loop) for loop in sch.get_loops(b)]) for b in blocks]


# Knobs


@pytest.mark.parametrize("threads", [0, 16, 31, 48, 100, 1056, 2048, -32])
def test_simt_rejects_bad_thread_counts(threads):
    with pytest.raises(InvalidKnobs, match="threads"):
        SimtThreads.Knobs(threads=threads)


@pytest.mark.parametrize("threads", [32, 96, 128, 1024])
def test_simt_accepts_warp_multiples(threads):
    assert SimtThreads.Knobs(threads=threads).threads == threads


@pytest.mark.parametrize("knobs", [SimtThreads.Knobs(), CpuParallel.Knobs()], ids=["simt", "cpu"])
def test_knobs_are_frozen(knobs):
    field = dataclasses.fields(knobs)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(knobs, field, getattr(knobs, field))


def test_invalid_knobs_is_a_value_error():
    with pytest.raises(ValueError):
        SimtThreads.Knobs(threads=48)


@pytest.mark.parametrize("template, target", [(SimtThreads(), CUDA), (CpuParallel(), LLVM)], ids=["simt", "cpu"])
def test_space_is_valid(template, target):
    space = list(template.space(target))
    assert space[0] == template.Knobs()
    assert len(set(space)) == len(space)
    for knobs in space:
        assert isinstance(knobs, template.Knobs)
        assert dataclasses.replace(knobs) == knobs  # re-validates through __post_init__
        assert isinstance(template.apply(primfunc("reduce"), target, knobs), s_tir.Schedule)


@pytest.mark.parametrize("knobs", list(SimtThreads().space(CUDA)), ids=lambda k: f"threads{k.threads}")
def test_simt_space_builds(knobs):
    source = cuda_source(compile_primfunc(primfunc("reduce"), CUDA, knobs))
    assert f"__launch_bounds__({knobs.threads})" in source


# Target gating


def test_simt_declines_llvm():
    assert SimtThreads().apply(primfunc("reduce"), LLVM, SimtThreads.Knobs()) is None


def test_cpu_declines_cuda():
    assert CpuParallel().apply(primfunc("reduce"), CUDA, CpuParallel.Knobs()) is None


@pytest.mark.parametrize("target, template", [(LLVM, CpuParallel), (CUDA, SimtThreads)], ids=["llvm", "cuda"])
def test_template_for(target, template):
    assert isinstance(schedules.template_for(target), template)


def test_template_for_unknown_target():
    with pytest.raises(BackendUnavailable, match='"kind":"c"'):
        schedules.template_for(Target("c"))


def test_fallback_comes_last():
    assert [type(t) for t in schedules.TEMPLATES] == [SimtThreads, CpuParallel]


def test_foreign_knobs_raise_compilation_error():
    with pytest.raises(CompilationError, match="simt_threads") as error:
        compile_primfunc(primfunc("reduce"), CUDA, CpuParallel.Knobs())
    assert isinstance(error.value.__cause__, AttributeError)


# Schedules


@pytest.mark.parametrize("name", KERNELS)
def test_simt_binds_every_annotated_block(name):
    knobs = SimtThreads.Knobs(threads=256)
    sch = SimtThreads().apply(primfunc(name), CUDA, knobs)
    blocks = scheduled_loops(sch)
    assert blocks
    for block, loops in blocks:
        tags = [loop.thread_binding.thread_tag if loop.thread_binding is not None else None for loop in loops]
        # The parallel loops are fused and bound; loops past them stay serial in each thread.
        assert tags[:2] == ["blockIdx.x", "threadIdx.x"] and all(t is None for t in tags[2:]), (block, tags)
        assert int(loops[1].extent) == knobs.threads


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("name", KERNELS)
def test_cpu_parallelizes_annotated_loops(name, parallel):
    sch = CpuParallel().apply(primfunc(name), LLVM, CpuParallel.Knobs(parallel=parallel))
    for block, loops in scheduled_loops(sch):
        kinds = [loop.kind for loop in loops]
        if parallel:
            assert kinds[0] == tvm.tirx.ForKind.PARALLEL, block
            assert tvm.tirx.ForKind.PARALLEL not in kinds[1:], block
        else:
            assert tvm.tirx.ForKind.PARALLEL not in kinds, block


# CUDA builds on a machine without a GPU


@pytest.mark.parametrize("name", KERNELS)
def test_cuda_kernels_build(cuda_sources, name):
    source = cuda_sources[name]
    assert 'extern "C" __global__' in source
    assert "blockIdx.x" in source and "threadIdx.x" in source
    assert f"__launch_bounds__({SimtThreads.Knobs().threads})" in source


@pytest.mark.parametrize("name", KERNELS)
def test_only_accumulating_scatter_adds_atomically(cuda_sources, name):
    assert ("atomicAdd" in cuda_sources[name]) == (name == "scatter_accumulate")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_half_inputs_build(dtype):
    source = cuda_source(compile_primfunc(primfunc("scatter_accumulate", dtype), CUDA))
    assert "atomicAdd" in source
    assert ("half" if dtype == "float16" else "nv_bfloat16") in source
