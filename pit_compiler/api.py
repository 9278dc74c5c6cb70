"""Public operators: sparse matmul and micro-tile detection on torch tensors."""

from __future__ import annotations

import torch

from pit_compiler.autograd import grid_shape_of, sparse_matmul_forward_op, sparse_matmul_op
from pit_compiler.ops import detect_grid_pieces, pit_matmul, traced
from pit_compiler.runtime import MicroTileIndex
from pit_compiler.validation import (
    check_auto,
    check_mask,
    check_matmul_operands,
    check_out,
    check_out_without_grad,
    check_sparse,
    needs_grad,
    normalize_micro_tile,
    require_tensor,
)


def detect_micro_tiles(x: torch.Tensor, micro_tile=(32, 1), *, blocked: str = "rows") -> MicroTileIndex:
    """List the non-empty ``micro_tile`` pieces of ``x`` (2-D, or 3-D with a leading batch).

    ``blocked="rows"`` lists, per block of ``micro_tile[0]`` rows, the non-empty chunks of
    ``micro_tile[1]`` columns; ``blocked="cols"`` the transpose. Runs on ``x``'s device.
    """
    require_tensor("x", x)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be 2-D or batched 3-D, got shape {tuple(x.shape)}")
    if blocked not in ("rows", "cols"):
        raise ValueError(f"blocked must be 'rows' or 'cols', got {blocked!r}")
    tile = normalize_micro_tile(micro_tile, x.shape[-2:])
    if traced(x):  # torch.compile and fake tensors see one opaque operator
        return MicroTileIndex(*detect_op(x, list(tile), blocked))
    return detect_grid_pieces(x, tile, blocked)  # eager: without the operator's dispatch


@torch.library.custom_op("pit::detect_micro_tiles", mutates_args=())
def detect_op(x: torch.Tensor, tile: list[int], blocked: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(counts, indices)`` of :class:`MicroTileIndex`; an opaque operator to torch.compile."""
    index = detect_grid_pieces(x, tuple(tile), blocked)
    return index.counts, index.indices


@detect_op.register_fake
def _(x, tile, blocked):
    batch = x.shape[0] if x.dim() == 3 else 1
    grid = [-(-size // t) for size, t in zip(x.shape[-2:], tile)]
    blocks, chunks = grid if blocked == "rows" else grid[::-1]
    return x.new_empty((batch, blocks), dtype=torch.int32), x.new_empty((batch, blocks, chunks), dtype=torch.int32)


def sparse_matmul(
    A: torch.Tensor,
    B: torch.Tensor,
    *,
    sparse: str = "A",
    micro_tile=(32, 1),
    mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    form: str | None = None,
    dense_fallback: bool = True,
) -> torch.Tensor:
    """``A @ B`` computed by PIT, skipping the empty micro-tiles of one operand.

    Args:
        A, B: ``(M, K)`` and ``(K, N)``, or batched ``(b, M, K)`` and ``(b, K, N)``; float32,
            float16 or bfloat16, on one CPU or CUDA device.
        sparse: the sparse operand: ``"A"``, ``"B"`` (e.g. pruned weights) or ``"C"`` (a sparse
            output: only tiles listed by ``mask`` are computed, the rest are zero).
        micro_tile: ``(rows, cols)`` of the sparse operand's smallest sparse unit, e.g.
            ``(32, 1)`` column pieces or ``(1, 64)`` row pieces; ``None`` spans a whole axis
            (``(1, None)``: whole rows). ``"auto"`` (sparse A or B, eager) lets
            :func:`select_micro_tile` pick from the tile database (``pit-tune``) the micro-tile
            predicted to finish first, or dense ``torch.matmul`` when that is predicted fastest
            (then the sparse operand's gradient is dense too); with nothing tuned for the
            shape it uses ``(32, 1)``.
        mask: which micro-tiles are non-empty, shaped like the sparse operand or like its
            micro-tile grid; non-zero marks kept. Without it the non-empty micro-tiles of the
            operand are detected on its device. Micro-tiles outside the mask are taken as zero.
        out: optional contiguous output to write into (eager only: not with inputs that
            require grad, and not inside ``torch.compile``).
        form: force the kernel form (``"reduce"``, ``"scatter"``, ``"output"``); chosen from the
            micro-tile otherwise.
        dense_fallback: on a GPU, where detection finds more of the operand's micro-tiles
            non-empty than the kernel that would run wins at (``ops.dense_crossover``), compute
            ``torch.matmul`` instead (exact: the rest are zero). Judged without waiting for the
            GPU, by the newest count of an earlier call of the same shapes that has reached
            the host; the first such call reads its own (one sync). Off while a CUDA graph is
            captured; False skips it. Not with ``mask``. A product that cuBLAS finishes within
            PIT's per-call floor (``ops.below_call_floor``) runs as ``torch.matmul`` at once,
            without detection, with ``mask`` too (the micro-tiles it leaves out as zero).
            Calls that need a gradient or run inside ``torch.compile`` always weigh it.

    Differentiable in A and B: the sparse operand's gradient keeps its micro-tiles, and each
    gradient is itself a PIT matmul. Inside ``torch.compile`` it is one opaque operator,
    ``torch.ops.pit.sparse_matmul`` (:mod:`pit_compiler.autograd`), or where no gradient is
    needed ``torch.ops.pit.sparse_matmul_forward``, which builds no grid for a backward.
    """
    check_matmul_operands(A, B)
    sparse = check_sparse(sparse)
    if not isinstance(dense_fallback, bool):
        raise TypeError(f"dense_fallback must be True or False, got {dense_fallback!r}")
    if check_auto(micro_tile):
        return _sparse_matmul_auto(A, B, sparse, mask, out, form, dense_fallback)
    return _sparse_matmul(A, B, sparse, micro_tile, mask, out, form, dense_fallback)


def _sparse_matmul(A, B, sparse, micro_tile, mask, out, form, dense_fallback, detected=None):
    """:func:`sparse_matmul` after its first checks. ``detected``: ``micro_tile="auto"``'s
    detection of the micro-tile it chose, run on directly where the kernel reads it."""
    M, K, N = A.shape[-2], A.shape[-1], B.shape[-1]
    out_shape = (*A.shape[:-2], M, N)
    operand_shape = {"A": (M, K), "B": (K, N), "C": (M, N)}[sparse]
    tile = normalize_micro_tile(micro_tile, operand_shape)
    grid_shape = grid_shape_of(operand_shape, tile)
    batch = tuple(A.shape[:-2])
    if mask is not None:
        mask = check_mask(mask, batch + operand_shape, batch + grid_shape, A.device)
    elif sparse == "C":
        raise ValueError("sparse='C' needs mask=: the output's non-empty micro-tiles are not known before it exists")

    if out is None:
        if needs_grad(A, B):
            return sparse_matmul_op(A, B, sparse, list(tile), list(grid_shape), mask, form)[0]
        if traced(A, B):
            return sparse_matmul_forward_op(A, B, sparse, list(tile), list(grid_shape), mask, form)
        out = torch.empty(out_shape, dtype=A.dtype, device=A.device)
    else:
        check_out_without_grad(out, A, B)
        out = check_out(out, out_shape, A.dtype, A.device)
    pit_matmul(
        A, B, out, sparse, tile, grid_shape, mask, form,
        cover=detected is None, dense_fallback=dense_fallback, detected=detected,
    )  # fmt: skip
    return out


def _needs_operator(A: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether the call must go through an operator: ``torch.ops.pit.sparse_matmul`` for
    autograd (it keeps the micro-tile grid for the backward), ``pit.sparse_matmul_forward`` for
    tracing without gradients (``torch.compile``, fake tensors). Other eager calls run the
    kernels directly, without an operator's dispatch."""
    return needs_grad(A, B) or traced(A, B)


def select_micro_tile(
    A: torch.Tensor, B: torch.Tensor, sparse: str = "A", candidates=None, *, dense: bool = True, prune: bool = False
):
    """The micro-tile of ``sparse`` predicted to finish first, from the tile database.

    Returns a :class:`~pit_compiler.tuning.Selection`: ``micro_tile`` (``None`` for dense
    ``torch.matmul``), ``predicted_ms`` per candidate, ``listed`` micro-tiles per candidate,
    and ``source`` (``"default"`` when nothing was tuned for this shape). ``candidates``
    defaults to every micro-tile tuned for the shape bucket, dtype and target. ``prune``
    skips detecting candidates that cannot beat the best so far; by default every candidate
    is detected and predicted, to inspect them all. Counts are read back at once (one wait
    for the GPU); ``micro_tile="auto"`` instead decides by earlier calls' counts
    (:func:`~pit_compiler.tuning.cost_model.select_without_waiting`).
    """
    from pit_compiler.tuning import select_micro_tile as select

    return select(A, B, check_sparse(sparse), candidates, dense=dense, prune=prune)


def _sparse_matmul_auto(A, B, sparse, mask, out, form, dense_fallback):
    """``micro_tile="auto"``: ask the selector, then run its micro-tile or dense torch."""
    from pit_compiler.tuning.cost_model import select_without_waiting

    if sparse == "C":
        raise ValueError("micro_tile='auto' picks micro-tiles of A or B; for sparse='C' pass the output's micro_tile")
    if form is not None:
        raise ValueError(f"form={form!r} needs an explicit micro_tile; 'auto' picks the form with the micro-tile")
    check_out_without_grad(out, A, B)
    if mask is not None:
        # Unlisted micro-tiles are zero: the mask applied first gives every candidate the same operand.
        operand = A if sparse == "A" else B
        if tuple(require_tensor("mask", mask).shape) != tuple(operand.shape):
            raise ValueError(
                f"with micro_tile='auto', mask must have the sparse operand's shape {tuple(operand.shape)} "
                f"(a micro-tile grid mask needs its micro_tile), got {tuple(mask.shape)}"
            )
        mask = check_mask(mask, tuple(operand.shape), tuple(operand.shape), A.device)
        operand = torch.where(mask != 0, operand, torch.zeros((), dtype=operand.dtype, device=operand.device))
        A, B = (operand, B) if sparse == "A" else (A, operand)
    choice = select_without_waiting(A, B, sparse)
    if choice.dense:
        if out is None:
            return torch.matmul(A, B)
        return torch.matmul(A, B, out=check_out(out, (*A.shape[:-1], B.shape[-1]), A.dtype, A.device))
    if choice.count is None:  # nothing tuned: the default micro-tile, detected as usual
        return _sparse_matmul(A, B, sparse, choice.micro_tile, None, out, None, dense_fallback)
    if _needs_operator(A, B):  # the operator takes the choice as a mask (and keeps it for the backward)
        return _sparse_matmul(A, B, sparse, choice.micro_tile, choice.grid, out, None, dense_fallback)
    # Dense was weighed already, against measured times.
    return _sparse_matmul(A, B, sparse, choice.micro_tile, None, out, None, False, detected=choice.count.index)
