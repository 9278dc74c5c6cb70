"""CPU (LLVM) schedule: run each block's race-free loops on a thread pool."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from tvm import s_tir
from tvm.target import Target

from .common import ScheduleTemplate, annotated_blocks, fuse_parallel_loops


class CpuParallel(ScheduleTemplate):
    """Fuse the loops codegen marked parallel and hand them to TVM's CPU thread pool."""

    name = "cpu_parallel"

    @dataclass(frozen=True)
    class Knobs:
        parallel: bool = True

    def is_target_available(self, target: Target) -> bool:
        return target.kind.name == "llvm"

    def space(self, target: Target) -> Iterator[Knobs]:
        yield self.Knobs(parallel=True)
        yield self.Knobs(parallel=False)

    def apply(self, func, target: Target, knobs: Knobs) -> s_tir.Schedule | None:
        if not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        if knobs.parallel:
            for block, count in annotated_blocks(sch):
                sch.parallel(fuse_parallel_loops(sch, block, count))
        return sch
