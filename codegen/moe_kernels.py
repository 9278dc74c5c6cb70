"""Compiled MoE kernels on demand, built once per form and options, then served from the cache."""

from __future__ import annotations

import json

from tvm.target import Target

from pit_compiler.runtime.cache import KernelCache

from .build import compile_primfunc, default_knobs, kernel_key
from .moe import (
    build_expert_index,
    build_grouped_gather_matmul,
    build_grouped_scatter_matmul,
    build_grouped_weight_grad,
)

BUILDERS = {
    "index": build_expert_index,
    "gather": build_grouped_gather_matmul,
    "scatter": build_grouped_scatter_matmul,
    "weight_grad": build_grouped_weight_grad,
}


def moe_kernel(form: str, target: Target, cache: KernelCache, knobs=None, **options):
    """The compiled ``main`` of MoE kernel ``form`` (see :mod:`.moe`) built with ``options``.

    The scatter form's add is atomic exactly on CUDA targets, where its loops run in parallel.
    """
    if form not in BUILDERS:
        raise ValueError(f"form must be one of {sorted(BUILDERS)}, got {form!r}")
    if form == "scatter":
        options = {**options, "atomic": target.kind.name == "cuda"}
    knobs = knobs if knobs is not None else default_knobs(target)
    signature = json.dumps(options, sort_keys=True)
    key = kernel_key(f"moe_{form}", signature, {}, target, knobs)

    def build():
        return compile_primfunc(BUILDERS[form](**options), target, knobs, what=f"MoE {form} kernel ({signature})")

    return cache.main(key, build)
