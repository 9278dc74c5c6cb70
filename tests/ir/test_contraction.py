"""Resolving batched matmuls into axis roles and storage orders."""

import keyword

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pit_compiler.ir import Contraction, UnsupportedPattern, as_contraction, derive_pit_rules, parse_operator


def test_plain_matmul():
    c = as_contraction("C[m, n] += A[m, k] * B[k, n]")
    assert isinstance(c, Contraction)
    assert (c.batch, c.m, c.n, c.k) == ((), "m", "n", "k")
    assert (c.order("a"), c.order("b"), c.order("c")) == (("m", "k"), ("k", "n"), ("m", "n"))
    assert str(c) == "C[m, n] += A[m, k] * B[k, n]"


def test_batched_matmul_with_transposed_b():
    c = as_contraction(parse_operator("C[b, m, n] += A[b, m, k] * B[b, n, k]"))
    assert (c.batch, c.m, c.n, c.k) == (("b",), "m", "n", "k")
    assert c.order("b") == ("batch", "n", "k")
    assert c.order("A") == ("batch", "m", "k")
    assert c.roles == {"b": "batch", "m": "m", "n": "n", "k": "k"}
    assert (c.a.tensor, c.b.tensor, c.c.tensor) == ("A", "B", "C")


def test_roles_come_from_placement_not_names():
    c = as_contraction("Out[j, h, i] += X[h, r, i] * Y[j, h, r]")
    assert (c.batch, c.m, c.n, c.k) == (("h",), "i", "j", "r")
    assert c.order("c") == ("n", "batch", "m")
    assert c.order("a") == ("batch", "k", "m")


def test_order_rejects_unknown_letters():
    with pytest.raises(ValueError, match="'a', 'b' or 'c'; got 'd'"):
        as_contraction("C[m, n] += A[m, k] * B[k, n]").order("d")


@pytest.mark.parametrize(
    "text, problem",
    [
        ("C[b, h, m, n] += A[b, h, m, k] * B[b, h, n, k]", "with 2 batch axes ('b', 'h')"),
        ("C[m, n] max= A[m, k] * B[k, n]", "reduces with 'max'"),
        ("C[m, n] += A[m, n]", "has 1 input(s)"),
        ("C[m, n] += A[m, k] * B[k, n] * D[n]", "has 3 input(s)"),
        ("C[m, n] += A[m, k + 1] * B[k, n]", "index k + 1 in A[m, k + 1] is not a bare axis"),
        ("C[m, n] += A[m, m, k] * B[k, n]", "repeats an axis in A[m, m, k]"),
        ("C[m] += A[m, k] * B[k]", "with 0 n axes"),
        ("C[m, i, n] += A[m, i, k] * B[k, n]", "with 2 m axes ('m', 'i')"),
        ("C[m, n] += A[m, k, j] * B[k, n]", "axis 'j' appears only in A"),
        ("C[m, n, z] += A[m, k] * B[k, n]", "axis 'z' appears only in C"),
        ("C[m, n] += A[m, k] * B[k, n, l] ", "axis 'l' appears only in B"),
    ],
)
def test_refusals_name_the_rule(text, problem):
    with pytest.raises(UnsupportedPattern) as info:
        as_contraction(text)
    message = str(info.value)
    assert message.startswith("PIT kernels cover C[m, n] += A[m, k] * B[k, n] contractions")
    assert problem in message


_names = st.from_regex(r"[a-z_][a-z0-9_]{0,3}", fullmatch=True).filter(lambda s: not keyword.iskeyword(s))
_tensors = st.from_regex(r"[A-Z][A-Za-z0-9]{0,2}", fullmatch=True)


@settings(max_examples=100, deadline=None)
@given(st.lists(_names, min_size=4, max_size=4, unique=True), st.booleans(),
       st.lists(_tensors, min_size=3, max_size=3, unique=True), st.data())
def test_random_contractions_classify(names, batched, tensors, data):
    b, m, n, k = names
    batch = (b,) if batched else ()
    a_axes = data.draw(st.permutations(batch + (m, k)))
    b_axes = data.draw(st.permutations(batch + (k, n)))
    c_axes = data.draw(st.permutations(batch + (m, n)))
    ta, tb, tc = tensors
    text = f"{tc}[{', '.join(c_axes)}] += {ta}[{', '.join(a_axes)}] * {tb}[{', '.join(b_axes)}]"

    expected_kinds = {**dict.fromkeys(batch, "spatial"), m: "spatial", n: "spatial", k: "reduction"}
    assert dict(derive_pit_rules(text)) == expected_kinds

    c = as_contraction(text)
    assert (c.batch, c.m, c.n, c.k) == (batch, m, n, k)
    roles = {**dict.fromkeys(batch, "batch"), m: "m", n: "n", k: "k"}
    for letter, axes in (("a", a_axes), ("b", b_axes), ("c", c_axes)):
        assert c.order(letter) == tuple(roles[axis] for axis in axes)
    assert str(c) == text


@settings(max_examples=30, deadline=None)
@given(st.lists(_names, min_size=5, max_size=5, unique=True))
def test_two_batch_axes_are_always_refused(names):
    b, h, m, n, k = names
    with pytest.raises(UnsupportedPattern, match="with 2 batch axes"):
        as_contraction(f"C[{b}, {h}, {m}, {n}] += A[{b}, {h}, {m}, {k}] * B[{h}, {b}, {k}, {n}]")
