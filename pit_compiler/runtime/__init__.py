"""Run-time objects: the kernel cache, the micro-tile index, counts read back without waiting,
answers kept per call signature (torch and tvm.runtime only)."""

from .cache import ENV_CACHE_DIR, KernelCache, default_cache_dir
from .compact_copies import CompactCopies
from .index import MicroTileIndex
from .kept import kept, next_turn
from .recent_counts import RecentCounts

__all__ = ["CompactCopies", "ENV_CACHE_DIR", "KernelCache", "MicroTileIndex", "RecentCounts", "default_cache_dir", "kept", "next_turn"]
