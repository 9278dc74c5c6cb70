"""Online detection as TIR: list the non-empty micro-tiles of a tensor, on its own device.

One PrimFunc of two stages, so no index ever travels through the host:

1. ``flag``: one task per micro-tile tests its elements against zero (NaN counts as non-zero,
   so a NaN is never dropped) and writes 1/0 into the index buffer itself;
2. ``compact``: one task per block of the blocked axis turns its row of flags into the list
   of non-empty chunk numbers, in place (a write never overtakes the read), and its count.

The order within a list is ascending, though PIT needs none: permutation invariance is what
makes any order correct.
"""

from __future__ import annotations

from tvm.script import tirx as T


def build_detect(
    order: tuple[str, ...],
    blocked: str,
    permuted: str,
    blocked_tile: int | None,
    permuted_tile: int,
    dtype: str,
):
    """The PrimFunc ``main(s, cnt, idx)`` for a tensor ``s`` stored in ``order`` (roles).

    ``blocked_tile=None`` makes one block span the whole blocked axis (whole-row pieces).
    ``cnt`` is ``(batch, NQ)`` and ``idx`` is ``(batch, NQ, NP)``: blocks of the blocked axis
    by chunks of the permuted axis.
    """
    assert set(order) == {"batch", blocked, permuted}, (order, blocked, permuted)
    whole = blocked_tile is None
    tq = 1 if whole else blocked_tile
    tp = permuted_tile

    def index(b, q, p):
        roles = {"batch": b, blocked: q, permuted: p}
        return [roles[r] for r in order]

    def shape(Bt, Q, P):
        return index(Bt, Q, P)

    def q_steps(Q):
        return Q if whole else tq

    def q_at(vq, qi):
        return qi if whole else vq * tq + qi

    @T.prim_func(s_tir=True)
    def main(s: T.handle, cnt: T.handle, idx: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        Bt, Q, P, NQ, NP = T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
        S = T.match_buffer(s, shape(Bt, Q, P), dtype)
        Cnt = T.match_buffer(cnt, (Bt, NQ), "int32")
        Idx = T.match_buffer(idx, (Bt, NQ, NP), "int32")
        for bb, q, p in T.grid(Bt, NQ, NP):
            with T.sblock("flag"):
                vb, vq, vp = T.axis.remap("SSS", [bb, q, p])
                T.sblock_attr({"pit.parallel_loops": 3})
                flag = T.sblock_alloc_buffer((1,), "int32", scope="local")
                flag[0] = 0
                for qi, pi in T.grid(q_steps(Q), tp):
                    if q_at(vq, qi) < Q and vp * tp + pi < P:
                        flag[0] = T.max(
                            flag[0],
                            T.if_then_else(
                                S[*index(vb, q_at(vq, qi), vp * tp + pi)] == T.Cast(dtype, 0), 0, 1
                            ),
                        )
                Idx[vb, vq, vp] = flag[0]
        for bb, q in T.grid(Bt, NQ):
            with T.sblock("compact"):
                vb, vq = T.axis.remap("SS", [bb, q])
                T.sblock_attr({"pit.parallel_loops": 2})
                # Compaction rewrites this block's own row of Idx in place; declaring that write
                # would overlap the read and forbid parallel loops, so only Cnt is declared.
                T.reads(Idx[vb, vq, 0:NP])
                T.writes(Cnt[vb, vq])
                n = T.sblock_alloc_buffer((1,), "int32", scope="local")
                n[0] = 0
                for p in range(NP):
                    if Idx[vb, vq, p] != 0:
                        Idx[vb, vq, n[0]] = p
                        n[0] = n[0] + 1
                Cnt[vb, vq] = n[0]

    return main
