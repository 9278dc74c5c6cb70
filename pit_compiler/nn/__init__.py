"""Drop-in modules for explicit control: each replaces the PyTorch module it names."""

from . import attention_patterns, functional
from .attention import SparseAttention, sparse_attention
from .attention_patterns import bigbird, causal, from_dense_mask, longformer, sliding_window, vertical_slash
from .encoder import SparseTransformerEncoderLayer
from .linear import SparseLinear
from .moe import SparseMoE
from .moe_ops import ExpertIndex, expert_index
from .moe_reference import MixtralMoE, SwitchMoE

__all__ = [
    "ExpertIndex",
    "MixtralMoE",
    "SparseMoE",
    "SwitchMoE",
    "expert_index",
    "SparseAttention",
    "SparseLinear",
    "SparseTransformerEncoderLayer",
    "attention_patterns",
    "bigbird",
    "causal",
    "from_dense_mask",
    "functional",
    "longformer",
    "sliding_window",
    "sparse_attention",
    "vertical_slash",
]
