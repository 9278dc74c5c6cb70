"""The PIT transformation's decision for one operator: which axis to permute, by what micro-tile.

A sparse operand's non-empty micro-tiles are listed per block of one axis (the *blocked* axis);
the listed chunks of the other axis (the *permuted* axis) are gathered into dense tiles. The
permuted axis's derived rule fixes the kernel's form:

- ``"reduce"``: the permuted axis is a reduction axis (k). Each block of output rows sums over
  its own gathered k chunks; the output stays dense and needs no scatter.
- ``"scatter"``: the permuted axis is spatial (m of A, n of B). Gathered rows are computed and
  written back to their own index; when the blocked axis is k and a tile covers only a k slice,
  partial products from several k blocks meet in one output row, so the write is an add.
- ``"output"``: the output is sparse (SDD): only listed output tiles are computed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping

from .contraction import Contraction
from .errors import UnsupportedPattern
from .pit_rules import derive_pit_rules

FORMS = ("reduce", "scatter", "output")
OPERANDS = ("A", "B", "C")

# A gathered tile shorter than this along the blocked spatial axis wastes most of a dense
# tile, so fine row pieces are gathered across rows (scatter form) instead.
MIN_REDUCE_BLOCK = 8

_SPATIAL_ROLE = {"a": "m", "b": "n"}


@dataclass(frozen=True)
class SparsityAttr:
    """SparTA's "tensor with sparsity attribute": which operand is sparse, at what granularity.

    ``micro_tile`` is given over the operand's two non-batch axes in storage order, so
    ``(32, 1)`` on ``A[m, k]`` is a 32-row, 1-column piece.
    """

    operand: str
    micro_tile: tuple[int, int]

    def __post_init__(self):
        if self.operand not in OPERANDS:
            raise ValueError(f"sparse operand must be one of {OPERANDS}, got {self.operand!r}")
        tile = self.micro_tile
        if (
            not isinstance(tile, tuple)
            or len(tile) != 2
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 1 for t in tile)
        ):
            raise ValueError(f"micro_tile must be a pair of positive ints, got {tile!r}")


@dataclass(frozen=True)
class PITPlan:
    """How one contraction with one sparse operand becomes gather -> dense tile -> scatter."""

    contraction: Contraction
    sparse: str  # "a", "b" or "c"
    form: str
    permuted: str  # role gathered through the index: "m", "n" or "k"
    blocked: str  # role whose blocks own the index lists
    tile: Mapping[str, int]  # micro-tile extent per role, for permuted and blocked
    accumulate: bool  # scatter whose tiles cover a k slice: partial sums are added

    @property
    def sparse_roles(self) -> tuple[str, ...]:
        """The sparse operand's roles in storage order (batch included)."""
        return self.contraction.order(self.sparse)

    def signature(self) -> str:
        """A stable text key of everything that changes the generated kernels."""
        return self._signature

    @functools.cached_property
    def _signature(self) -> str:
        # Kept on the plan: plans are reused (``plan_pit`` keeps them) and several lookups of
        # every kernel call key on it.
        c = self.contraction
        blocked_tile = self.tile[self.blocked]
        if self.form == "scatter" and not self.accumulate:
            blocked_tile = "all"  # one block spans all of k, whatever its size
        return (
            f"{c} | sparse={self.sparse} form={self.form} "
            f"permuted={self.permuted}:{self.tile[self.permuted]} "
            f"blocked={self.blocked}:{blocked_tile} accumulate={self.accumulate}"
        )


def _roles_of(contraction: Contraction, operand: str) -> tuple[str, str]:
    roles = tuple(r for r in contraction.order(operand) if r != "batch")
    assert len(roles) == 2, roles
    return roles  # type: ignore[return-value]


def plan_pit(
    contraction: Contraction,
    attr: SparsityAttr,
    sizes: Mapping[str, int],
    form: str | None = None,
) -> PITPlan:
    """Choose the permuted axis and kernel form for ``attr`` on ``contraction``.

    ``sizes`` maps roles ("m", "n", "k") to extents; a micro-tile that spans a whole axis
    (e.g. whole rows of A: ``(1, K)``) needs no accumulation in the scatter form. Only k's
    extent matters, so plans are kept per (contraction, micro-tile, k, form): every kernel
    call plans, and planning costs more than the lookup.
    """
    if form is not None and form not in FORMS:
        raise ValueError(f"form must be one of {FORMS} or None, got {form!r}")
    return _plan(contraction, attr, sizes["k"] if attr.operand.lower() != "c" else None, form)


@functools.lru_cache(maxsize=4096)
def _plan(contraction: Contraction, attr: SparsityAttr, k_size: int | None, form: str | None) -> PITPlan:
    sizes = {"k": k_size}
    operand = attr.operand.lower()
    roles = _roles_of(contraction, operand)
    tile = dict(zip(roles, attr.micro_tile))

    if operand == "c":
        if form not in (None, "output"):
            raise UnsupportedPattern(f"a sparse output C takes form 'output', got {form!r}")
        form, permuted, blocked = "output", "n", "m"
        accumulate = False
    else:
        spatial = _SPATIAL_ROLE[operand]
        if form is None:
            if tile["k"] >= sizes["k"] or tile[spatial] < MIN_REDUCE_BLOCK:
                form = "scatter"
            else:
                form = "reduce"
        if form == "output":
            raise UnsupportedPattern(f"form 'output' needs the sparse operand 'C', got {attr.operand!r}")
        if form == "reduce":
            permuted, blocked, accumulate = "k", spatial, False
        else:
            permuted, blocked = spatial, "k"
            accumulate = tile["k"] < sizes["k"]

    rules = _rules(contraction)
    axis = getattr(contraction, permuted)
    needed = "reduction" if permuted == "k" else "spatial"
    if rules[axis] != needed:
        raise UnsupportedPattern(
            f"form {form!r} permutes axis {axis!r} as a {needed} axis, but the derived rule is "
            f"{rules[axis]!r}: {rules.explain(axis)}"
        )
    return PITPlan(contraction, operand, form, permuted, blocked, tile, accumulate)


@functools.lru_cache(maxsize=256)
def _rules(contraction: Contraction):
    """Derived once per operator: sympy is too slow for every call of a kernel."""
    return derive_pit_rules(f"{contraction.c} += {contraction.a} * {contraction.b}")
