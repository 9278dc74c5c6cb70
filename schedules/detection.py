"""CUDA schedule for online detection (``build_detect(..., atomic=True)``) at memory bandwidth.

The ``flag`` block's loops come in storage order: batch, outer tile, contiguous tile, outer
step, contiguous step. Consecutive threads always take consecutive words of the contiguous
axis, so every warp load is coalesced whatever the micro-tile's shape:

- *wide* micro-tiles (two or more words along the contiguous axis: whole rows, ``1x32``,
  ``32x32`` ...): ``lanes`` threads (threadIdx.x) split each micro-tile's contiguous run and
  combine their flags by a cross-thread reduction (warp shuffles); threadIdx.y takes further
  micro-tiles;
- *narrow* ones (one word wide, e.g. ``32x1`` pieces): one thread per micro-tile, neighbouring
  threads on neighbouring columns;
- *tall* ones (spanning the whole outer axis, e.g. whole rows stored transposed): the outer
  steps are split over threadIdx.y as well, so no column of the tensor is left to one thread.

``list`` runs right after its micro-tile's reduction, in one thread of those that reduced it.

The grid is two-dimensional so that no thread divides by a symbolic extent inside its loop:
blockIdx.y with the threads takes one tile axis (at most 65535 thread blocks of it: 16.7M
columns of 32x1 pieces, 2M rows of 1x32 ones), blockIdx.x the batch and the other tile axis.
The splits add no predicate (codegen clamps every load and masks what lies
past the end of the tensor or of the micro-tile), so a thread's loads carry no branch and are
all in flight at once; TVM's cross-thread reduction still sees affine bindings, as it must.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from tvm import s_tir, tirx
from tvm.target import Target

from .common import ScheduleTemplate, check

DETECT_BLOCKS = {"zero", "flag", "list"}
WARP = 32
TALL_STEPS = 256  # outer steps per micro-tile from which they are split over threads


def _constant(extent) -> int | None:
    return int(extent.value) if isinstance(extent, tirx.IntImm) else None


def contiguous_lanes(steps: int | None, threads: int) -> int:
    """Threads sharing one micro-tile's contiguous run of ``steps`` words (None: symbolic)."""
    if steps is None:
        return threads
    lanes = 1
    while lanes * 2 <= min(steps, threads):
        lanes *= 2
    return lanes


def _blocked_is_contiguous(flag: s_tir.SBlock) -> bool:
    """Whether the flag block's blocked-tile index (``Flag[b, q, p]``'s q) is its contiguous tile."""
    q = flag.writes[0].region[1].min
    return q.same_as(flag.iter_vars[2].var)


@dataclass(frozen=True)
class Launch:
    """How one detection kernel lays its threads (see the module docstring)."""

    lanes: int  # threadIdx.x threads per micro-tile (1: a micro-tile per thread)
    per_block: int  # micro-tiles per thread block
    rows: int  # threadIdx.y threads splitting a tall micro-tile's outer steps (1: none)
    along_outer: bool  # a block's micro-tiles step along the outer axis, not the contiguous one

    @property
    def threads(self) -> int:
        return self.lanes * self.per_block * self.rows


def plan_launch(flag: s_tir.SBlock, outer_steps, inner_steps, knobs) -> Launch:
    """The thread layout for a flag block whose micro-tiles have these (constant or None) steps."""
    tall = outer_steps is None or outer_steps >= TALL_STEPS
    lanes = contiguous_lanes(inner_steps, knobs.tall_threads if tall else knobs.threads)
    if tall:
        per_block = 1 if lanes > 1 else WARP
        rows = knobs.tall_threads // (lanes * per_block)
    else:
        per_block, rows = knobs.threads // lanes, 1
    # Micro-tiles of one block row listed by the lanes of a warp take one atomic, not several.
    along_outer = lanes > 1 and per_block > 1 and _blocked_is_contiguous(flag)
    return Launch(lanes, per_block, rows, along_outer)


class DetectionThreads(ScheduleTemplate):
    """Micro-tile reductions laid along the contiguous axis, listing by atomic append."""

    name = "detection_threads"

    @dataclass(frozen=True)
    class Knobs:
        threads: int = 256  # threads per block
        tall_threads: int = 1024  # threads per block for tall micro-tiles
        unroll: int = 64  # serial steps per thread unrolled, for loads in flight

        def __post_init__(self):
            for name in ("threads", "tall_threads"):
                value = getattr(self, name)
                check(
                    WARP <= value <= 1024 and value & (value - 1) == 0,
                    f"{name} must be a power of two in [32, 1024], got {value!r}",
                )
            check(self.unroll >= 1, f"unroll must be at least 1, got {self.unroll!r}")

    def is_target_available(self, target: Target) -> bool:
        return target.kind.name == "cuda"

    def space(self, target: Target) -> Iterator[Knobs]:
        yield self.Knobs()
        for threads in (128, 512):
            yield self.Knobs(threads=threads)
        yield self.Knobs(tall_threads=512)

    def apply(self, func, target: Target, knobs: Knobs) -> s_tir.Schedule | None:
        if not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        names = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
        if names != DETECT_BLOCKS:
            return None
        self._zero(sch, knobs)
        flag, listing = sch.get_sblock("flag"), sch.get_sblock("list")
        bb, to, ti, io, ii = sch.get_loops(flag)
        launch = plan_launch(sch.get(flag), _constant(sch.get(io).extent), _constant(sch.get(ii).extent), knobs)

        # Grid: blockIdx.y and the block's micro-tiles on one tile axis, blockIdx.x on the rest.
        stepped, other = (to, ti) if launch.along_outer else (ti, to)
        sch.reorder(bb, other, stepped)
        sch.bind(sch.fuse(bb, other), "blockIdx.x")
        block_y, tile = sch.split(stepped, [None, launch.per_block], disable_predication=True)
        sch.bind(block_y, "blockIdx.y")
        inner = [tile]
        reduced = []  # (thread tag, extent) of the threads that share one micro-tile
        if launch.per_block > 1:
            sch.bind(tile, "threadIdx.x" if launch.lanes == 1 else "threadIdx.y")
        if launch.lanes > 1:
            ii, lane = sch.split(ii, [None, launch.lanes], disable_predication=True)
            sch.bind(lane, "threadIdx.x")
            inner.append(lane)
            reduced.append(("threadIdx.x", launch.lanes))
        if launch.rows > 1:
            io, row = sch.split(io, [None, launch.rows], disable_predication=True)
            sch.bind(row, "threadIdx.y")
            inner.append(row)
            reduced.append(("threadIdx.y", launch.rows))
        sch.reorder(block_y, *inner, io, ii)
        for serial in (io, ii):
            sch.annotate(serial, "pragma_auto_unroll_max_step", knobs.unroll)
            sch.annotate(serial, "pragma_unroll_explicit", 0)

        sch.reverse_compute_at(listing, tile)
        # One thread lists each micro-tile: the first of those that reduced it (the reduction
        # hands its result to all of them).
        for tag, extent in reduced:
            _, first = sch.split(sch.add_unit_loop(listing), [None, extent])
            sch.bind(first, tag)
        if not reduced:
            sch.decompose_reduction(flag, io)  # the flag's initial value before its loops
        sch.set_scope(flag, 0, "local")
        return sch

    @staticmethod
    def _zero(sch: s_tir.Schedule, knobs: Knobs) -> None:
        zero = sch.get_sblock("zero")
        block, thread = sch.split(sch.fuse(*sch.get_loops(zero)), [None, knobs.threads])
        sch.bind(block, "blockIdx.x")
        sch.bind(thread, "threadIdx.x")
