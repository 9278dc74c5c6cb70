"""The contraction family PIT's kernels cover: ``C[b, m, n] += A[b, m, k] * B[b, k, n]``.

Roles come from where each axis appears, not from its name or position, so any storage order
of A, B and C maps onto one kernel template; ``Contraction.order`` tells codegen that order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import sympy

from .errors import UnsupportedPattern
from .expr import Access, Operator, parse_operator
from .pit_rules import derive_pit_rules

ROLES = ("batch", "m", "n", "k")
FAMILY = "C[m, n] += A[m, k] * B[k, n] contractions with at most one batch axis"
# Which of (A, B, C) an axis indexes decides its role.
_ROLE_BY_PRESENCE = {
    (True, True, True): "batch",
    (True, False, True): "m",
    (False, True, True): "n",
    (True, True, False): "k",
}


@dataclass(frozen=True)
class Contraction:
    """A batched matmul with axis roles resolved; ``a``, ``b``, ``c`` keep the accesses as written."""

    batch: tuple[str, ...]
    m: str
    n: str
    k: str
    a: Access
    b: Access
    c: Access

    @property
    def roles(self) -> dict[str, str]:
        """Axis name -> role (``"batch"``, ``"m"``, ``"n"`` or ``"k"``)."""
        return {**dict.fromkeys(self.batch, "batch"), self.m: "m", self.n: "n", self.k: "k"}

    def order(self, tensor_letter: str) -> tuple[str, ...]:
        """Storage order of tensor ``"a"``, ``"b"`` or ``"c"`` in roles, e.g. ``("batch", "n", "k")``."""
        letter = tensor_letter.lower() if isinstance(tensor_letter, str) else tensor_letter
        if letter not in self._orders:
            raise ValueError(f"order() takes a tensor letter 'a', 'b' or 'c'; got {tensor_letter!r}")
        return self._orders[letter]

    @functools.cached_property
    def _orders(self) -> dict[str, tuple[str, ...]]:
        roles = self.roles
        return {letter: tuple(roles[axis] for axis in access.axes)
                for letter, access in (("a", self.a), ("b", self.b), ("c", self.c))}

    def __str__(self) -> str:
        return self._text

    @functools.cached_property
    def _text(self) -> str:  # printed on every kernel lookup (plan signatures); sympy printing is slow
        return f"{self.c} += {self.a} * {self.b}"


def as_contraction(op: str | Operator) -> Contraction:
    """Resolve ``op`` into a Contraction, or raise UnsupportedPattern naming the rule it breaks."""
    operator = parse_operator(op) if isinstance(op, str) else op
    shown = str(operator)

    def fail(problem: str) -> None:
        raise UnsupportedPattern(f"PIT kernels cover {FAMILY}; got {shown!r} {problem}")

    # Step 1. The shape of the expression: a sum of a product of two inputs at bare axes.
    if operator.reducer != "sum":
        fail(f"which reduces with {operator.reducer!r}; expected '+='")
    if len(operator.inputs) != 2:
        fail(f"which has {len(operator.inputs)} input(s); expected exactly two (A * B)")
    a, b = operator.inputs
    c = operator.output
    for access in (a, b, c):
        for index in access.indices:
            if not isinstance(index, sympy.Symbol):
                fail(f"whose index {index} in {access} is not a bare axis; reshape or copy the tensor first")
        if len(set(access.axes)) != len(access.indices):
            fail(f"which repeats an axis in {access}; expected distinct axes per tensor")

    # Step 2. Roles from presence in A, B and C.
    by_role: dict[str, list[str]] = {role: [] for role in ROLES}
    for axis in operator.axes:
        presence = (axis in a.axes, axis in b.axes, axis in c.axes)
        role = _ROLE_BY_PRESENCE.get(presence)
        if role is None:
            where = [name for name, inside in zip((a.tensor, b.tensor, c.tensor), presence) if inside]
            fail(f"where axis {axis!r} appears only in {' and '.join(where)}; every axis must be "
                 "shared by two or three of A, B and C")
        by_role[role].append(axis)
    if len(by_role["batch"]) > 1:
        fail(f"with {len(by_role['batch'])} batch axes {tuple(by_role['batch'])}; fold them into one")
    for role, where in (("m", "A and C"), ("n", "B and C"), ("k", "A and B")):
        if len(by_role[role]) != 1:
            found = f" {tuple(by_role[role])}" if by_role[role] else ""
            fail(f"with {len(by_role[role])} {role} axes{found} (axes in {where} only); "
                 "expected exactly one: reshape to merge or add the missing axis")

    # Step 3. PIT must be able to permute every axis, or micro-tiles cannot be gathered.
    rules = derive_pit_rules(operator)
    for axis, kind in rules.items():
        if kind is None:
            fail(f"where axis {axis!r} is not permutation invariant: {rules.explain(axis)}")

    return Contraction(
        batch=tuple(by_role["batch"]), m=by_role["m"][0], n=by_role["n"][0], k=by_role["k"][0],
        a=a, b=b, c=c)
