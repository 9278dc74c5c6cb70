"""Run-time objects: the kernel cache and the micro-tile index (torch and tvm.runtime only)."""

from .cache import ENV_CACHE_DIR, KernelCache, default_cache_dir
from .index import MicroTileIndex

__all__ = ["ENV_CACHE_DIR", "KernelCache", "MicroTileIndex", "default_cache_dir"]
