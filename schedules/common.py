"""What every schedule template shares: the interface, knob checks, target gating."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterator

from tvm import s_tir
from tvm.target import Target

from pit_compiler.ir import InvalidKnobs

PARALLEL_LOOPS = "pit.parallel_loops"


def check(condition: bool, message: str) -> None:
    """Reject a knob setting; the tuner catches :class:`InvalidKnobs` to prune its search."""
    if not condition:
        raise InvalidKnobs(message)


class ScheduleTemplate(ABC):
    """A schedule for the PIT kernels' blocks on one family of targets.

    ``apply`` returns ``None`` for a function or target that is not this template's, so
    templates compose as an ordered tuple where the first match wins.
    """

    name: str
    Knobs: type

    @abstractmethod
    def is_target_available(self, target: Target) -> bool: ...

    @abstractmethod
    def space(self, target: Target) -> Iterator[Any]:
        """Every valid knob setting, the default first."""

    @abstractmethod
    def apply(self, func, target: Target, knobs: Any) -> s_tir.Schedule | None: ...


def annotated_blocks(sch: s_tir.Schedule) -> list[tuple[s_tir.SBlockRV, int]]:
    """The blocks PIT's codegen marked with how many leading loops may run in parallel."""
    found = []
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        annotations = sch.get(block).annotations
        if PARALLEL_LOOPS in annotations:
            found.append((block, int(annotations[PARALLEL_LOOPS])))
    return found


def fuse_parallel_loops(sch: s_tir.Schedule, block: s_tir.SBlockRV, count: int):
    """Fuse the first ``count`` loops of ``block`` into one loop and return it."""
    loops = sch.get_loops(block)[:count]
    return loops[0] if len(loops) == 1 else sch.fuse(*loops)
