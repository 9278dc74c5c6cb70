"""Permutation invariance derived by sympy, checked against a reference evaluator."""

import itertools
import math
from collections.abc import Mapping
from fractions import Fraction

import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st

from pit_compiler.ir import AxisRule, PITRules, derive_pit_rules, parse_operator

SPATIAL, REDUCTION = "spatial", "reduction"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("C[m, n] += A[m, k] * B[k, n]", {"m": SPATIAL, "n": SPATIAL, "k": REDUCTION}),
        ("C[b, m, n] += A[b, m, k] * B[b, n, k]", {"b": SPATIAL, "m": SPATIAL, "n": SPATIAL, "k": REDUCTION}),
        ("O[p, f] += I[p + r, c] * W[r, c, f]", {"p": None, "f": SPATIAL, "r": None, "c": REDUCTION}),
        ("C[m] max= A[m, k]", {"m": SPATIAL, "k": REDUCTION}),
        ("C[m] min= A[m, k]", {"m": SPATIAL, "k": REDUCTION}),
        ("Y[m, n] = X[m, n]", {"m": SPATIAL, "n": SPATIAL}),
        ("Y[m, n] += X[2*m + 1, n]", {"m": SPATIAL, "n": SPATIAL}),
        ("Y[m] += X[3 - m]", {"m": SPATIAL}),
        ("Y[m] += X[m, m]", {"m": SPATIAL}),
        ("Y[m] += X[m // 2]", {"m": None}),
        ("Y[m] += X[m % 2]", {"m": None}),
        ("Y[m] += X[m*m]", {"m": None}),
        ("Y[m, n] += X[m * n]", {"m": None, "n": None}),
        ("Y[m] += X[m, k // 2]", {"m": SPATIAL, "k": None}),
    ],
)
def test_worked_examples(text, expected):
    rules = derive_pit_rules(text)
    assert dict(rules) == expected
    assert list(rules) == list(parse_operator(text).axes)


def test_rules_are_a_mapping_with_reasons():
    rules = derive_pit_rules(parse_operator("O[p, f] += I[p + r, c] * W[r, c, f]"))
    assert isinstance(rules, Mapping) and isinstance(rules, PITRules)
    assert len(rules) == 4 and "c" in rules and "z" not in rules
    assert rules.get("z", "absent") == "absent"
    assert rules.rule("f") == AxisRule("f", SPATIAL, "permute inputs and output together: "
                                                     "gather, compute, scatter with the same index")
    assert rules.explain("c") == "permute the inputs only: the sum commutes, the output needs no scatter"
    assert rules.explain("p") == ("axis 'p' appears in I[p + r, c] together with 'r': "
                                  "permuting p alone does not permute whole slices of I")
    assert str(rules.operator) == "O[p, f] += I[p + r, c] * W[r, c, f]"
    assert repr(rules) == ("PITRules('O[p, f] += I[p + r, c] * W[r, c, f]': "
                           "p=None, f='spatial', r=None, c='reduction')")
    with pytest.raises(KeyError, match="axis 'z' is not in"):
        rules["z"]


@pytest.mark.parametrize(
    "text, axis, words",
    [
        ("C[m] max= A[m, k]", "k", "the max commutes"),
        ("Y[m] += X[m // 2]", "m", "not affine in m"),
        ("Y[m] += X[m*m]", "m", "degree 2"),
        ("Y[m, n] += X[m * n]", "n", "together with 'm'"),
    ],
)
def test_reasons_name_the_cause(text, axis, words):
    assert words in derive_pit_rules(text).explain(axis)


def test_rejects_other_types():
    with pytest.raises(TypeError, match="expects an operator string or Operator"):
        derive_pit_rules(3)


# Reference evaluator: nested loops over every axis, exact integer arithmetic.

def _value(expr, env):
    if isinstance(expr, sympy.Symbol):
        return env[expr.name]
    if isinstance(expr, sympy.Integer):
        return int(expr)
    if isinstance(expr, sympy.Rational):
        return Fraction(int(expr.p), int(expr.q))
    args = [_value(arg, env) for arg in expr.args]
    if isinstance(expr, sympy.Add):
        return sum(args)
    if isinstance(expr, sympy.Mul):
        return math.prod(args)
    if isinstance(expr, sympy.Pow):
        return args[0] ** args[1]
    if isinstance(expr, sympy.floor):
        return math.floor(args[0])
    if isinstance(expr, sympy.Mod):
        return args[0] % args[1]
    raise AssertionError(f"reference evaluator cannot handle {expr!r}")


def _points(op, sizes):
    for point in itertools.product(*(range(sizes[a]) for a in op.axes)):
        yield dict(zip(op.axes, point))


def _evaluate(op, sizes, data):
    out = {}
    for env in _points(op, sizes):
        value = math.prod(data[a.tensor][tuple(_value(i, env) for i in a.indices)] for a in op.inputs)
        key = tuple(env[i.name] for i in op.output.indices)
        if key not in out:
            out[key] = value
        elif op.reducer == "sum":
            out[key] += value
        else:
            out[key] = max(out[key], value)
    return out


def _random_inputs(op, sizes, rng):
    data = {}
    for access in op.inputs:
        extent = [0] * len(access.indices)
        for env in _points(op, sizes):
            for d, index in enumerate(access.indices):
                extent[d] = max(extent[d], _value(index, env) + 1)
        shape = itertools.product(*(range(e) for e in extent))
        data[access.tensor] = {position: rng.randint(-3, 3) for position in shape}
    return data


def _permute_inputs(op, sizes, data, axis, perm):
    """Permute ``axis`` in every input: X'[e(i)] = X[e(perm[i])] along each dim indexed by e(axis)."""
    permuted = {}
    for access in op.inputs:
        maps = []
        for index in access.indices:
            if axis in {s.name for s in index.free_symbols}:
                maps.append({_value(index, {axis: i}): _value(index, {axis: perm[i]})
                             for i in range(sizes[axis])})
            else:
                maps.append({})
        permuted[access.tensor] = {
            position: data[access.tensor][tuple(mp.get(j, j) for mp, j in zip(maps, position))]
            for position in data[access.tensor]}
    return permuted


_AXES = ("i", "j", "k")


@st.composite
def _small_operators(draw):
    axes = _AXES[:draw(st.integers(1, 3))]
    sizes = {a: draw(st.integers(1, 4)) for a in axes}
    order = draw(st.permutations(axes))
    output = order[:draw(st.integers(1, len(axes)))]
    axis = st.sampled_from(axes)
    index = st.one_of(
        axis,
        axis,
        st.tuples(st.integers(1, 3), axis, st.integers(0, 2)).map(lambda t: f"{t[0]}*{t[1]} + {t[2]}"),
        st.tuples(axis, axis).map(lambda t: f"{t[0]} + {t[1]}"),
        st.tuples(axis, axis).map(lambda t: f"{t[0]} * {t[1]}"),
        axis.map(lambda a: f"{a} // 2"),
        axis.map(lambda a: f"{a} % 2"),
        st.integers(0, 1).map(str),
    )
    inputs = []
    for name in ("A", "B")[:draw(st.integers(1, 2))]:
        indices = draw(st.lists(index, min_size=1, max_size=2))
        inputs.append(f"{name}[{', '.join(indices)}]")
    reducer = draw(st.sampled_from(["+=", "max="]))
    text = f"Y[{', '.join(output)}] {reducer} {' * '.join(inputs)}"
    return parse_operator(text), sizes


@settings(max_examples=200, deadline=None)
@given(_small_operators(), st.randoms(use_true_random=False))
def test_derived_rules_hold_numerically(case, rng):
    op, sizes = case
    data = _random_inputs(op, sizes, rng)
    reference = _evaluate(op, sizes, data)
    for axis, kind in derive_pit_rules(op).items():
        if kind is None:
            continue
        perm = list(range(sizes[axis]))
        rng.shuffle(perm)
        result = _evaluate(op, sizes, _permute_inputs(op, sizes, data, axis, perm))
        if kind == REDUCTION:
            assert result == reference, f"{op}: permuting reduction axis {axis} by {perm} changed the output"
        else:
            position = op.output_axes.index(axis)
            expected = {key: reference[key[:position] + (perm[key[position]],) + key[position + 1:]]
                        for key in reference}
            assert result == expected, f"{op}: permuting spatial axis {axis} by {perm} broke the scatter"
