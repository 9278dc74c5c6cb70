"""Derive which axes of an operator are permutation invariant (PIT's legality test).

Permuting an axis lets PIT gather scattered non-zeros into dense micro-tiles. That is only
sound when every index that mentions the axis is a bijection of that axis alone, so a
permutation of the axis permutes whole slices of each tensor. sympy decides this from the
index expressions; nothing is inferred from tensor or axis names.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import sympy

from .expr import Access, Operator, format_index, parse_operator

SPATIAL_REASON = "permute inputs and output together: gather, compute, scatter with the same index"
COMMUTATIVE_REDUCERS = ("sum", "max", "min")


@dataclass(frozen=True)
class AxisRule:
    """How one axis may be permuted: ``kind`` is ``"spatial"``, ``"reduction"`` or ``None``."""

    axis: str
    kind: str | None
    reason: str


class PITRules(Mapping):
    """Axis name -> ``"spatial"``, ``"reduction"`` or ``None``, in ``operator.axes`` order."""

    def __init__(self, operator: Operator, rules: Mapping[str, AxisRule]) -> None:
        self._operator = operator
        self._rules = dict(rules)

    @property
    def operator(self) -> Operator:
        return self._operator

    def rule(self, axis: str) -> AxisRule:
        if axis not in self._rules:
            raise KeyError(f"axis {axis!r} is not in {str(self._operator)!r}; "
                           f"expected one of {self._operator.axes}")
        return self._rules[axis]

    def explain(self, axis: str) -> str:
        return self.rule(axis).reason

    def __getitem__(self, axis: str) -> str | None:
        return self.rule(axis).kind

    def __iter__(self) -> Iterator[str]:
        return iter(self._operator.axes)

    def __len__(self) -> int:
        return len(self._operator.axes)

    def __repr__(self) -> str:
        kinds = ", ".join(f"{axis}={kind!r}" for axis, kind in self.items())
        return f"PITRules({str(self._operator)!r}: {kinds})"


def derive_pit_rules(expr: str | Operator) -> PITRules:
    """Classify every axis of ``expr``; strings are parsed with ``parse_operator``."""
    operator = parse_operator(expr) if isinstance(expr, str) else expr
    if not isinstance(operator, Operator):
        raise TypeError(f"derive_pit_rules expects an operator string or Operator; got {expr!r}")
    return PITRules(operator, {axis: _derive_axis(operator, axis) for axis in operator.axes})


def _derive_axis(operator: Operator, axis: str) -> AxisRule:
    for access in (operator.output, *operator.inputs):
        for index in access.indices:
            refusal = _refusal(axis, index, access)
            if refusal is not None:
                return AxisRule(axis, None, refusal)
    if axis in operator.output_axes:
        return AxisRule(axis, "spatial", SPATIAL_REASON)
    assert operator.reducer in COMMUTATIVE_REDUCERS, f"{operator} reduces {axis!r} with '='"
    return AxisRule(axis, "reduction",
                    f"permute the inputs only: the {operator.reducer} commutes, the output needs no scatter")


def _refusal(axis: str, index: sympy.Expr, access: Access) -> str | None:
    """Why ``index`` stops ``axis`` from being permuted, or None if it is affine in ``axis`` alone."""
    symbols = {s.name: s for s in index.free_symbols}
    if axis not in symbols:
        return None
    where = f"axis {axis!r} appears in {access}"
    others = sorted(name for name in symbols if name != axis)
    if others:
        together = ", ".join(repr(name) for name in others)
        return (f"{where} together with {together}: permuting {axis} alone does not permute "
                f"whole slices of {access.tensor}")
    symbol = symbols[axis]
    if not index.is_polynomial(symbol):
        return (f"{where} as {format_index(index)}, which is not affine in {axis} (floor division or "
                f"modulo is not one-to-one): permuting {axis} does not permute slices of {access.tensor}")
    polynomial = sympy.Poly(index, symbol)
    if polynomial.degree() != 1:
        return (f"{where} as {format_index(index)}, of degree {polynomial.degree()} in {axis}: "
                f"only affine indices a*{axis} + b permute slices of {access.tensor}")
    coefficient = polynomial.coeff_monomial(symbol)
    if not (coefficient.is_Integer and coefficient != 0):
        return (f"{where} as {format_index(index)} with coefficient {coefficient}: "
                "expected a non-zero integer")
    return None
