"""CUDA schedule without tensor cores: one thread per element of each block's parallel loops.

Correct for every PIT form on any NVIDIA GPU; the tensor-core tile templates are the fast path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from tvm import s_tir
from tvm.target import Target

from .common import ScheduleTemplate, annotated_blocks, check, fuse_parallel_loops


class SimtThreads(ScheduleTemplate):
    """Fuse the parallel loops, split them over thread blocks of ``threads`` threads."""

    name = "simt_threads"

    @dataclass(frozen=True)
    class Knobs:
        threads: int = 128

        def __post_init__(self):
            check(
                32 <= self.threads <= 1024 and self.threads % 32 == 0,
                f"threads must be a multiple of 32 in [32, 1024], got {self.threads!r}",
            )

    def is_target_available(self, target: Target) -> bool:
        return target.kind.name == "cuda"

    def space(self, target: Target) -> Iterator[Knobs]:
        yield self.Knobs()
        for threads in (64, 256, 512):
            yield self.Knobs(threads=threads)

    def apply(self, func, target: Target, knobs: Knobs) -> s_tir.Schedule | None:
        if not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        for block, count in annotated_blocks(sch):
            fused = fuse_parallel_loops(sch, block, count)
            blocks, threads = sch.split(fused, [None, knobs.threads])
            sch.bind(blocks, "blockIdx.x")
            sch.bind(threads, "threadIdx.x")
        return sch
