"""Online detection as TIR: list the non-empty micro-tiles of a tensor, on its own device.

Detection reads the tensor's bits, not its values: an element is non-empty when any bit other
than a float's sign bit is set, so NaN counts as non-empty (it is never dropped) and ``-0.0``
as empty. Reading bits lets the caller pack ``pack`` neighbouring elements of the contiguous
axis into one wider integer word (a free ``view``), so one load tests several elements.

One PrimFunc, so no index ever travels through the host. Its first stage is shared:

``flag``
    a reduction over each micro-tile's elements (max of 0/1), with its loops in storage order
    (batch, outer tile, contiguous tile, outer step, contiguous step) so a schedule can lay
    threads along the contiguous axis.

Then one of two listings:

``atomic=False`` (the CPU form): ``flag`` writes the index buffer itself, then ``compact``: one
task per block of the blocked axis turns its row of flags into the ascending list of non-empty
chunk numbers, in place (a write never overtakes the read), and its count.

``atomic=True`` (CUDA): ``zero`` clears the counts, then ``list`` appends each non-empty chunk
with ``slot = atomicAdd(cnt[b, q], 1); idx[b, q, slot] = p`` (one atomic per warp and count, see
:data:`APPEND_SOURCE`). A schedule computes ``list`` right after its micro-tile's reduction, so
flags never reach memory. The order within a list is then arbitrary, which permutation
invariance allows (sums over listed chunks may then round differently from run to run).
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T
from tvm.script.ir_builder import IRBuilder

PARALLEL_LOOPS = "pit.parallel_loops"  # read by the schedule templates
WORD_BITS = (8, 16, 32, 64)


def element_bits(dtype: str) -> int:
    return tvm.DataType(dtype).bits


def word_dtype(dtype: str, pack: int) -> str:
    """The signed integer type that holds ``pack`` elements of ``dtype``."""
    bits = element_bits(dtype) * pack
    assert bits in WORD_BITS, (dtype, pack)
    return f"int{bits}"


def value_mask(dtype: str, pack: int) -> int | None:
    """The bits of a word that make it non-empty: all but the sign bits of floats (None: all)."""
    if not tvm.DataType(dtype).is_float:
        return None
    bits = element_bits(dtype)
    one = (1 << (bits - 1)) - 1
    return sum(one << (bits * i) for i in range(pack))


# Append to a list shared by many threads: lanes of a warp that append to one list take
# consecutive slots with a single atomicAdd (contended counters serialize in L2), and get the
# old count back. Any lane pattern is correct; it pays where neighbours share a block row.
APPEND = "pit_append"
APPEND_SOURCE = r"""
__forceinline__ __device__ int pit_append(int* count) {
#if __CUDA_ARCH__ >= 700
    unsigned lane;
    asm volatile("mov.u32 %0, %%laneid;" : "=r"(lane));
    unsigned peers = __match_any_sync(__activemask(), (unsigned long long)count);
    int leader = __ffs(peers) - 1;
    int base = 0;
    if (lane == leader) base = atomicAdd(count, __popc(peers));
    base = __shfl_sync(peers, base, leader);
    return base + __popc(peers & ((1u << lane) - 1));
#else
    return atomicAdd(count, 1);
#endif
}
"""


class _Layout:
    """Index arithmetic of one detection: storage order, micro-tile, packing."""

    def __init__(self, order, blocked, permuted, blocked_tile, permuted_tile, dtype, pack):
        assert set(order) == {"batch", blocked, permuted}, (order, blocked, permuted)
        self.order, self.blocked, self.permuted = order, blocked, permuted
        self.tile = {blocked: blocked_tile, permuted: permuted_tile}  # None: the whole axis
        self.outer, self.inner = (r for r in order if r != "batch")  # inner is contiguous
        self.word = word_dtype(dtype, pack)
        self.mask = value_mask(dtype, pack)

    def declare(self, s, cnt, idx):
        """Symbolic extents and the buffers of ``main(s, cnt, idx)``."""
        Bt, Q, P, NQ, NP = (IRBuilder.name(n, T.int32()) for n in ("Bt", "Q", "P", "NQ", "NP"))
        extent = {"batch": Bt, self.blocked: Q, self.permuted: P}
        S = IRBuilder.name("S", T.match_buffer(s, [extent[r] for r in self.order], self.word))
        Cnt = IRBuilder.name("Cnt", T.match_buffer(cnt, (Bt, NQ), "int32"))
        Idx = IRBuilder.name("Idx", T.match_buffer(idx, (Bt, NQ, NP), "int32"))
        return extent, {self.blocked: NQ, self.permuted: NP}, S, Cnt, Idx

    def steps(self, role, extent):
        return extent[role] if self.tile[role] is None else self.tile[role]

    def at(self, role, t, i):
        return i if self.tile[role] is None else t * self.tile[role] + i

    def flag_stage(self, S, Flag, extent, chunks):
        """``Flag[b, q, p] = max over the micro-tile of (element non-empty)``, as a reduction."""
        outer, inner = self.outer, self.inner
        loops = (extent["batch"], chunks[outer], chunks[inner], self.steps(outer, extent), self.steps(inner, extent))
        with T.grid(*loops) as loop_vars:
            bb, to, ti, io, ii = IRBuilder.name_many(["bb", "to", "ti", "io", "ii"], loop_vars)
            with T.sblock("flag"):
                axes = T.axis.remap("SSSRR", [bb, to, ti, io, ii])
                vb, vto, vti, vio, vii = IRBuilder.name_many(["vb", "vto", "vti", "vio", "vii"], axes)
                where = {"batch": vb, outer: self.at(outer, vto, vio), inner: self.at(inner, vti, vii)}
                # An element past the end of the tensor or of its micro-tile (a schedule may split
                # the loops without predicates, rounding them up) is empty. Its load is clamped into
                # the tensor rather than guarded by a branch, so every load is unconditional and a
                # thread can have all of its loads in flight.
                steps = {outer: vio, inner: vii}
                inside = [where[r] < extent[r] for r in self.order]
                inside += [steps[r] < self.tile[r] for r in (outer, inner) if self.tile[r] is not None]
                inside = tvm.tirx.all(*inside)
                word = S[tuple(T.min(where[r], extent[r] - 1) for r in self.order)]
                if self.mask is not None:
                    word = tvm.tirx.bitwise_and(word, tvm.tirx.const(self.mask, self.word))
                nonzero = tvm.tirx.NE(word, tvm.tirx.const(0, self.word))
                # bitwise, not logical: C's && would put the load behind a branch again
                nonzero = tvm.tirx.bitwise_and(T.Cast("int32", inside), T.Cast("int32", nonzero))
                T.sblock_attr({PARALLEL_LOOPS: 3})
                chunk = {"batch": vb, outer: vto, inner: vti}
                flag = (vb, chunk[self.blocked], chunk[self.permuted])
                with T.init():  # max's identity, which cross-thread reductions require
                    T.buffer_store(Flag, T.min_value("int32"), flag)
                T.buffer_store(Flag, T.max(Flag[flag], nonzero), flag)

    def list_stage(self, Flag, Cnt, Idx, chunks):
        """Append each flagged chunk to its block's list at a slot taken by an atomic add."""
        with T.grid(Flag.shape[0], chunks[self.outer], chunks[self.inner]) as loop_vars:
            bb, to, ti = IRBuilder.name_many(["bb", "to", "ti"], loop_vars)
            with T.sblock("list"):
                vb, vto, vti = IRBuilder.name_many(["vb", "vto", "vti"], T.axis.remap("SSS", [bb, to, ti]))
                T.sblock_attr({PARALLEL_LOOPS: 3})
                chunk = {self.outer: vto, self.inner: vti}
                q, p = chunk[self.blocked], chunk[self.permuted]
                # The atomic add on Cnt is left undeclared: ``zero`` runs as an earlier kernel, and a
                # declared read or write of Cnt would make ``list`` depend on it and forbid computing
                # it inside the ``flag`` loops.
                T.reads(Flag[vb, q, p])
                T.writes(Idx[vb, q, 0 : Idx.shape[2]])
                slot = IRBuilder.name("slot", T.sblock_alloc_buffer((1,), "int32", scope="local"))
                with T.If(Flag[vb, q, p] > 0):
                    with T.Then():
                        append = T.cuda.func_call(
                            APPEND, T.address_of(Cnt[vb, q]), source_code=APPEND_SOURCE, return_type="int32"
                        )
                        T.buffer_store(slot, append, [0])
                        T.buffer_store(Idx, p, [vb, q, slot[0]])


def build_detect(
    order: tuple[str, ...],
    blocked: str,
    permuted: str,
    blocked_tile: int | None,
    permuted_tile: int,
    dtype: str,
    *,
    atomic: bool = False,
    pack: int = 1,
):
    """The PrimFunc ``main(s, cnt, idx)`` for a tensor ``s`` stored in ``order`` (roles).

    ``s`` holds the bits of a ``dtype`` tensor as signed integer words of ``pack`` elements
    each, packed along the contiguous (last) axis; ``blocked_tile`` and ``permuted_tile`` are
    in those words. ``blocked_tile=None`` makes one block span the whole blocked axis
    (whole-row pieces). ``cnt`` is ``(batch, NQ)`` and ``idx`` is ``(batch, NQ, NP)``: blocks of
    the blocked axis by chunks of the permuted axis. ``atomic`` selects the CUDA listing.
    """
    layout = _Layout(order, blocked, permuted, blocked_tile, permuted_tile, dtype, pack)
    return _atomic_detect(layout) if atomic else _ascending_detect(layout)


def _ascending_detect(layout: _Layout):
    @T.prim_func(s_tir=True)
    def main(s: T.handle, cnt: T.handle, idx: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        extent, chunks, S, Cnt, Idx = T.meta_var(layout.declare(s, cnt, idx))
        Bt, NQ, NP = T.meta_var((extent["batch"], chunks[layout.blocked], chunks[layout.permuted]))
        layout.flag_stage(S, Idx, extent, chunks)
        for bb, q in T.grid(Bt, NQ):
            with T.sblock("compact"):
                vb, vq = T.axis.remap("SS", [bb, q])
                T.sblock_attr({PARALLEL_LOOPS: 2})
                # Compaction rewrites this block's own row of Idx in place; declaring that write
                # would overlap the read and forbid parallel loops, so only Cnt is declared.
                T.reads(Idx[vb, vq, 0:NP])
                T.writes(Cnt[vb, vq])
                n = T.sblock_alloc_buffer((1,), "int32", scope="local")
                n[0] = 0
                for p in range(NP):
                    if Idx[vb, vq, p] > 0:
                        Idx[vb, vq, n[0]] = p
                        n[0] = n[0] + 1
                Cnt[vb, vq] = n[0]

    return main


def _atomic_detect(layout: _Layout):
    @T.prim_func(s_tir=True)
    def main(s: T.handle, cnt: T.handle, idx: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        extent, chunks, S, Cnt, Idx = T.meta_var(layout.declare(s, cnt, idx))
        Bt, NQ, NP = T.meta_var((extent["batch"], chunks[layout.blocked], chunks[layout.permuted]))
        Flag = T.sblock_alloc_buffer((Bt, NQ, NP), "int32")
        for bb, q in T.grid(Bt, NQ):
            with T.sblock("zero"):
                vb, vq = T.axis.remap("SS", [bb, q])
                T.sblock_attr({PARALLEL_LOOPS: 2})
                Cnt[vb, vq] = 0
        layout.flag_stage(S, Flag, extent, chunks)
        layout.list_stage(Flag, Cnt, Idx, chunks)

    return main
