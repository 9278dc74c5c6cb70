"""Parsing, printing and validation of operators written as index expressions."""

import keyword

import pytest
import sympy
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pit_compiler.ir import Access, Operator, UnsupportedPattern, axis_symbol, parse_operator

m, n, k, p, r = (axis_symbol(name) for name in "mnkpr")


@pytest.mark.parametrize(
    "text, reducer, combiner, axes, reduction_axes",
    [
        ("C[m, n] += A[m, k] * B[k, n]", "sum", "mul", ("m", "n", "k"), ("k",)),
        ("C[b, m, n] += A[b, m, k] * B[b, n, k]", "sum", "mul", ("b", "m", "n", "k"), ("k",)),
        ("O[p, f] += I[p + r, c] * W[r, c, f]", "sum", "mul", ("p", "f", "r", "c"), ("r", "c")),
        ("C[m] max= A[m, k]", "max", "identity", ("m", "k"), ("k",)),
        ("C[m] min= A[m, k]", "min", "identity", ("m", "k"), ("k",)),
        ("Y[m, n] = X[m, n]", "assign", "identity", ("m", "n"), ()),
    ],
)
def test_parse_examples(text, reducer, combiner, axes, reduction_axes):
    op = parse_operator(text)
    assert (op.reducer, op.combiner, op.axes, op.reduction_axes) == (reducer, combiner, axes, reduction_axes)
    assert op.output_axes == tuple(a for a in axes if a not in reduction_axes)
    assert str(op) == text
    assert parse_operator(str(op)) == op


def test_index_expressions_are_sympy():
    op = parse_operator("O[p, f] += I[p + r, c] * W[r, c, f]")
    assert op.inputs[0].indices[0] == p + r
    op = parse_operator("Y[m] += X[2*m + 1, m // 2, m % 3]")
    assert op.inputs[0].indices == (2 * m + 1, sympy.floor(m / 2), sympy.Mod(m, 3))
    assert str(op) == "Y[m] += X[2*m + 1, m // 2, m % 3]"


def test_whitespace_is_free():
    assert parse_operator("  C[m,n]+=A[m,k]*B[k,n] ") == parse_operator("C[m, n] += A[m, k] * B[k, n]")


def test_access_axes_and_str():
    access = Access("I", (p + r, axis_symbol("c")))
    assert access.axes == ("p", "r", "c")
    assert str(access) == "I[p + r, c]"
    assert Access("X", [m, 0]).indices == (m, sympy.Integer(0))


@pytest.mark.parametrize(
    "text, problem",
    [
        ("C[m, n] += A * B", "expected an input access"),
        ("C += A[m]", "expected the output access"),
        ("C[m] *= A[m]", "expected one of +=, max=, min=, ="),
        ("C[m] == A[m]", "expected an input access"),
        ("C[m] += A[m] B[m]", "expected '*'"),
        ("C[m] += A[m, ]", "empty index at position 1"),
        ("C[m] += A[]", "empty index at position 0"),
        ("C[m] = A[m, k]", "axes ['k'] do not index the output"),
        ("C[m + 1] += A[m]", "output index 'm + 1' at position 0 is not a bare axis"),
        ("C[2] += A[m]", "output index '2'"),
        ("C[m] += C[m] * A[m]", "tensor 'C' is both the output and an input"),
        ("C[m, m] += A[m]", "axis 'm' appears twice in the output"),
        ("C[m] += A[m] * A[m, m]", "tensor 'A' is used with 1 and 2 indices"),
        ("C[m] += A[m**2]", "power '**'"),
        ("C[m] += A[m / 2]", "unexpected character '/'"),
        ("C[m] += A[1.5]", "unexpected character '.'"),
        ("C[m] += A[m.real]", "unexpected character '.'"),
        ("C[m] += A[floor(m)]", "function call floor(...)"),
        ("C[m] += A[__import__(m)]", "function call __import__(...)"),
        ("C[m] += A[__import__('os')]", "unexpected character"),
        ("C[m] += A[(m + 1]", "unbalanced parentheses"),
        ("C[m] += A[m // 0]", "division by zero"),
        ("C[m] += A[m % 0]", "not valid integer arithmetic"),
        ("C[m] += A[lambda]", "reserved"),
        ("C[m] += A[Integer]", "reserved"),
        ("C[m] += A[m +]", "not valid integer arithmetic"),
    ],
)
def test_bad_text_is_refused_with_the_problem_named(text, problem):
    with pytest.raises(ValueError) as info:
        parse_operator(text)
    assert isinstance(info.value, UnsupportedPattern)
    assert problem in str(info.value)
    assert repr(text) in str(info.value)


def test_parse_rejects_non_strings():
    with pytest.raises(UnsupportedPattern, match="expects a string"):
        parse_operator(42)


def test_operator_validates_direct_construction():
    a = Access("A", (m, k))
    with pytest.raises(UnsupportedPattern, match="reducer 'prod'"):
        Operator(Access("C", (m,)), (a,), "prod", "identity")
    with pytest.raises(UnsupportedPattern, match="expected 'identity'"):
        Operator(Access("C", (m,)), (a,), "sum", "mul")
    with pytest.raises(UnsupportedPattern, match="at least one input"):
        Operator(Access("C", (m,)), (), "sum", "mul")
    with pytest.raises(UnsupportedPattern, match="expected an int or a sympy expression"):
        Access("A", ("m + 1",))


_AXES = ("m", "n", "k")
_leaves = st.one_of(st.sampled_from(_AXES), st.integers(0, 5).map(str))


def _combine(children):
    divisors = st.integers(1, 4).map(str)
    return st.one_of(
        st.tuples(children, st.sampled_from(["+", "-", "*"]), children).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(children, st.sampled_from(["//", "%"]), divisors).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
    )


@settings(max_examples=150, deadline=None)
@given(st.lists(st.recursive(_leaves, _combine, max_leaves=6), min_size=1, max_size=3))
@example(["((m // 2) - ((m + n) * (m + n)))"])  # sympy reads its own (-m - n)*(m + n) back as -(m + n)**2
def test_printing_round_trips_random_indices(indices):
    """Printing and parsing again gives the same operator: the same indices as expressions
    (sympy may write one differently when it reads its own output back)."""
    op = parse_operator(f"Y[m] += X[{', '.join(indices)}]")
    again = parse_operator(str(op))
    assert (again.output, again.reducer, again.combiner) == (op.output, op.reducer, op.combiner)
    (got,), (want,) = again.inputs, op.inputs
    assert got.tensor == want.tensor and len(got.indices) == len(want.indices)
    assert all(sympy.simplify(g - w) == 0 for g, w in zip(got.indices, want.indices))


@settings(max_examples=50, deadline=None)
@given(st.from_regex(r"[a-z_][a-z0-9_]{0,5}", fullmatch=True).filter(lambda s: not keyword.iskeyword(s)))
def test_any_identifier_can_name_an_axis(name):
    op = parse_operator(f"Y[{name}] += X[{name}, 2*{name} + 1]")
    assert op.axes == (name,)
    assert parse_operator(str(op)) == op
