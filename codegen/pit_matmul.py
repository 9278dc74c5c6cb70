"""The PIT transformation as TIR: gather listed micro-tiles, compute dense, write back.

Every block carries ``pit.parallel_loops``: how many of its leading loops may run in parallel
without a race. Schedule templates read it instead of re-deriving the data flow.

Each form of :class:`~pit_compiler.ir.PITPlan` becomes one schedulable PrimFunc (s_tir blocks)
over symbolic shapes, so one build serves every shape. Every kernel takes
``(a, b, c, cnt, idx)``: the operands in their storage order (with a leading batch axis when
the operator has none) and the index built by detection: ``cnt[batch, q]`` listed chunks of
block ``q``, ``idx[batch, q, :cnt]`` their chunk numbers along the permuted axis.

Tails are predicated (``< M``), never padded, so any shape is correct.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T
from tvm.script.ir_builder import IRBuilder

from pit_compiler.ir import PITPlan

ACC_DTYPE = "float32"
PARALLEL_LOOPS = "pit.parallel_loops"  # read by the schedule templates


def kernel_order(plan: PITPlan, operand: str) -> tuple[str, ...]:
    """Storage order of ``operand`` as the kernel sees it: a batch axis always leads or stays."""
    order = plan.contraction.order(operand)
    return order if "batch" in order else ("batch",) + order


def whole(buffer):
    """The region of all of ``buffer``, for blocks whose access pattern the index decides."""
    return tvm.tirx.BufferRegion(buffer, [tvm.ir.Range.from_min_extent(0, e) for e in buffer.shape])


def _indexer(order: tuple[str, ...]):
    def index(**roles):
        return [roles[r] for r in order]

    return index


def build_pit_matmul(plan: PITPlan, dtype: str, out_dtype: str, atomic: bool):
    """The PrimFunc for ``plan``: inputs of ``dtype``, output of ``out_dtype``.

    ``atomic`` makes the scatter-add of an accumulating plan an atomic add (GPU targets,
    where threads of different k blocks write one output row at once).
    """
    if plan.form == "reduce":
        return _reduce_form(plan, dtype, out_dtype)
    if plan.form == "scatter":
        return _scatter_form(plan, dtype, out_dtype, atomic and plan.accumulate)
    return _output_form(plan, dtype, out_dtype)


def _layouts(plan: PITPlan, dtype: str, out_dtype: str):
    """Index makers per operand, and two builders every form shares (run while parsing)."""
    orders = {x: kernel_order(plan, x) for x in "abc"}
    index = {x: _indexer(orders[x]) for x in "abc"}

    def declare(a, b, c, cnt, idx):
        """Symbolic extents and the five buffers of ``main(a, b, c, cnt, idx)``."""
        Bt, M, N, K, NQ, NP = (IRBuilder.name(n, T.int32()) for n in ("Bt", "M", "N", "K", "NQ", "NP"))
        extent = {"batch": Bt, "m": M, "n": N, "k": K}

        def buffer(name, handle, operand, buffer_dtype):
            shape = [extent[r] for r in orders[operand]]
            return IRBuilder.name(name, T.match_buffer(handle, shape, buffer_dtype))

        A = buffer("A", a, "a", dtype)
        B = buffer("B", b, "b", dtype)
        C = buffer("C", c, "c", out_dtype)
        Cnt = IRBuilder.name("Cnt", T.match_buffer(cnt, (Bt, NQ), "int32"))
        Idx = IRBuilder.name("Idx", T.match_buffer(idx, (Bt, NQ, NP), "int32"))
        return Bt, M, N, K, NQ, NP, A, B, C, Cnt, Idx

    def zero_fill(C, Bt, M, N):
        """A block that zeroes all of C: the forms that write only listed places start here."""
        with T.grid(Bt, M, N) as (bb, i, j):
            with T.sblock("zero"):
                vb, vi, vj = T.axis.remap("SSS", [bb, i, j])
                T.sblock_attr({PARALLEL_LOOPS: 3})
                T.buffer_store(C, T.Cast(out_dtype, 0), index["c"](batch=vb, m=vi, n=vj))

    return index, declare, zero_fill


def _reduce_form(plan: PITPlan, dtype: str, out_dtype: str):
    """Each output row block sums over its own gathered k chunks: dense output, no scatter."""
    index, declare, zero_fill = _layouts(plan, dtype, out_dtype)
    ia, ib, ic = index["a"], index["b"], index["c"]
    blocked_is_m = plan.blocked == "m"
    tq = plan.tile[plan.blocked]
    tk = plan.tile["k"]

    def block_of(vi, vj):
        return (vi if blocked_is_m else vj) // tq

    @T.prim_func(s_tir=True)
    def main(a: T.handle, b: T.handle, c: T.handle, cnt: T.handle, idx: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        Bt, M, N, K, NQ, NP, A, B, C, Cnt, Idx = T.meta_var(declare(a, b, c, cnt, idx))
        for bb, i, j in T.grid(Bt, M, N):
            with T.sblock("compute"):
                vb, vi, vj = T.axis.remap("SSS", [bb, i, j])
                T.sblock_attr({PARALLEL_LOOPS: 3})
                acc = T.sblock_alloc_buffer((1,), ACC_DTYPE, scope="local")
                q = T.meta_var(block_of(vi, vj))
                acc[0] = T.float32(0)
                for e in range(Cnt[vb, q]):
                    for kk in range(tk):
                        if Idx[vb, q, e] * tk + kk < K:
                            acc[0] = acc[0] + T.Cast(
                                ACC_DTYPE, A[*ia(batch=vb, m=vi, k=Idx[vb, q, e] * tk + kk)]
                            ) * T.Cast(ACC_DTYPE, B[*ib(batch=vb, n=vj, k=Idx[vb, q, e] * tk + kk)])
                C[*ic(batch=vb, m=vi, n=vj)] = T.Cast(out_dtype, acc[0])

    return main


def _scatter_form(plan: PITPlan, dtype: str, out_dtype: str, atomic: bool):
    """Gathered rows (or columns) of each k block computed densely, written back by index.

    With ``plan.accumulate`` the write is an add, so the output starts from zero and, with
    ``atomic``, the add is atomic. Unlisted rows are zero either way.
    """
    index, declare, zero_fill = _layouts(plan, dtype, out_dtype)
    ia, ib, ic = index["a"], index["b"], index["c"]
    permuted_is_m = plan.permuted == "m"
    tp = plan.tile[plan.permuted]
    tk = plan.tile["k"]
    accumulate = plan.accumulate
    # A plain add races between k blocks, so only the batch and dense loops run in parallel.
    # With atomics the k blocks run in parallel too, but the listed entries stay a serial loop
    # per thread: all five loops fused would reach batch * N * K/tk * M/tp threads, past the
    # int32 range of a launch at 4096^3 with 1x32 pieces.
    parallel_loops = 2 if accumulate and not atomic else (3 if accumulate else 5)

    def k_at(vq, kk):
        """k of step ``kk`` in block ``vq``; without accumulation one block spans all of k."""
        return vq * tk + kk if accumulate else kk

    def k_steps(K):
        return tk if accumulate else K

    def place(other, gathered):
        """(m, n) of an output element from the dense axis and the gathered axis."""
        return (gathered, other) if permuted_is_m else (other, gathered)

    def extents(M, N):
        """(extent of the dense spatial axis, extent of the gathered axis)."""
        return (N, M) if permuted_is_m else (M, N)

    @T.prim_func(s_tir=True)
    def main(a: T.handle, b: T.handle, c: T.handle, cnt: T.handle, idx: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        Bt, M, N, K, NQ, NP, A, B, C, Cnt, Idx = T.meta_var(declare(a, b, c, cnt, idx))
        zero_fill(C, Bt, M, N)
        dense_extent, gathered_extent = T.meta_var(extents(M, N))
        for bb, other, q, e, p in T.grid(Bt, dense_extent, NQ, NP, tp):
            with T.sblock("compute"):
                vb, vo, vq, ve, vp = T.axis.remap("SSSSS", [bb, other, q, e, p])
                T.sblock_attr({PARALLEL_LOOPS: parallel_loops})
                # The read of C in C += partial is left out: only the race-free loops above run in
                # parallel, and a declared read-write overlap would forbid parallel loops at all.
                T.reads(whole(A), whole(B), whole(Cnt), whole(Idx))
                T.writes(whole(C))
                acc = T.sblock_alloc_buffer((1,), ACC_DTYPE, scope="local")
                mm, nn = T.meta_var(place(vo, Idx[vb, vq, ve] * tp + vp))
                if ve < Cnt[vb, vq] and Idx[vb, vq, ve] * tp + vp < gathered_extent:
                    acc[0] = T.float32(0)
                    for kk in range(k_steps(K)):
                        if k_at(vq, kk) < K:
                            acc[0] = acc[0] + T.Cast(
                                ACC_DTYPE, A[*ia(batch=vb, m=mm, k=k_at(vq, kk))]
                            ) * T.Cast(ACC_DTYPE, B[*ib(batch=vb, n=nn, k=k_at(vq, kk))])
                    out = T.meta_var(ic(batch=vb, m=mm, n=nn))
                    if not accumulate:
                        C[*out] = T.Cast(out_dtype, acc[0])
                    elif atomic:
                        T.evaluate(
                            T.cuda.atomic_add(T.address_of(C[*out]), T.Cast(out_dtype, acc[0]))
                        )
                    else:
                        C[*out] = C[*out] + T.Cast(out_dtype, acc[0])

    return main


def _output_form(plan: PITPlan, dtype: str, out_dtype: str):
    """Output-sparse (SDD): compute only the listed output tiles; the rest are zero."""
    index, declare, zero_fill = _layouts(plan, dtype, out_dtype)
    ia, ib, ic = index["a"], index["b"], index["c"]
    tm = plan.tile["m"]
    tn = plan.tile["n"]

    @T.prim_func(s_tir=True)
    def main(a: T.handle, b: T.handle, c: T.handle, cnt: T.handle, idx: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        Bt, M, N, K, NQ, NP, A, B, C, Cnt, Idx = T.meta_var(declare(a, b, c, cnt, idx))
        zero_fill(C, Bt, M, N)
        for bb, q, e, mi, ni in T.grid(Bt, NQ, NP, tm, tn):
            with T.sblock("compute"):
                vb, vq, ve, vmi, vni = T.axis.remap("SSSSS", [bb, q, e, mi, ni])
                T.sblock_attr({PARALLEL_LOOPS: 5})
                acc = T.sblock_alloc_buffer((1,), ACC_DTYPE, scope="local")
                if ve < Cnt[vb, vq] and vq * tm + vmi < M and Idx[vb, vq, ve] * tn + vni < N:
                    acc[0] = T.float32(0)
                    for k in range(K):
                        acc[0] = acc[0] + T.Cast(
                            ACC_DTYPE, A[*ia(batch=vb, m=vq * tm + vmi, k=k)]
                        ) * T.Cast(ACC_DTYPE, B[*ib(batch=vb, n=Idx[vb, vq, ve] * tn + vni, k=k)])
                    C[*ic(batch=vb, m=vq * tm + vmi, n=Idx[vb, vq, ve] * tn + vni)] = T.Cast(
                        out_dtype, acc[0]
                    )

    return main
