"""Module-level replacements: structures whose sparsity a graph pass cannot see.

MoE routing and attention masks are data-dependent control flow that tracers break on, and a
pruned weight is a parameter's value, not a graph operation; so these are matched as modules
and swapped for their PIT drop-ins before tracing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from pit_compiler.api import detect_micro_tiles
from pit_compiler.nn.linear import SparseLinear

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModuleOptions:
    """Which module-level replacements run, and their thresholds."""

    attention: bool = True
    moe: bool = True
    weight_micro_tile: tuple[int, int] = (1, 32)
    min_weight_sparsity: float = 0.5  # fraction of empty weight micro-tiles worth a PIT kernel


def weight_sparsity(weight: torch.Tensor, micro_tile) -> float:
    """Fraction of ``weight``'s micro-tiles that are entirely zero."""
    with torch.no_grad():
        index = detect_micro_tiles(weight.detach(), micro_tile)
        listed = index.counts.sum().item()
    return 1.0 - listed / index.indices.numel()


def replacement(module: nn.Module, options: ModuleOptions) -> nn.Module | None:
    """PIT's drop-in for ``module`` itself, or None where ``options`` match none."""
    if options.attention and type(module) is nn.TransformerEncoderLayer:
        from pit_compiler.nn.encoder import SparseTransformerEncoderLayer

        return SparseTransformerEncoderLayer.from_module(module)
    if options.attention and type(module) is nn.MultiheadAttention:
        from pit_compiler.nn.attention import SparseAttention

        return SparseAttention.from_module(module)
    if options.moe:
        from pit_compiler.nn.moe import SparseMoE
        from pit_compiler.nn.moe_reference import MixtralMoE, SwitchMoE

        if isinstance(module, (SwitchMoE, MixtralMoE)):
            return SparseMoE.from_module(module)
        if type(module).__name__ == "SwitchTransformersSparseMLP":
            from pit_compiler.nn.huggingface import SwitchTransformersMoE

            return SwitchTransformersMoE.from_module(module)
    if type(module) is nn.Linear and module.weight.dtype in (torch.float32, torch.float16, torch.bfloat16):
        sparsity = weight_sparsity(module.weight, options.weight_micro_tile)
        if sparsity >= options.min_weight_sparsity:
            log.debug("pruned Linear %s: %.0f%% empty micro-tiles", tuple(module.weight.shape), 100 * sparsity)
            return SparseLinear.from_module(module, weight_micro_tile=options.weight_micro_tile)
    return None


def replace_modules(root: nn.Module, options: ModuleOptions) -> dict[str, str]:
    """Swap matched submodules of ``root`` in place; return ``{qualified name: new type}``."""
    replaced = {}
    for name, child in list(root.named_children()):
        new = replacement(child, options)
        if new is not None:
            setattr(root, name, new)
            replaced[name] = type(new).__name__
        else:
            replaced.update({f"{name}.{k}": v for k, v in replace_modules(child, options).items()})
    if replaced and isinstance(root, nn.TransformerEncoder):
        # Nested tensors drop the padding PIT turns into sparsity, and reach no PIT kernel.
        root.use_nested_tensor = False
    return replaced
