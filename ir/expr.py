"""Operators as index expressions, e.g. ``C[m, n] += A[m, k] * B[k, n]``.

Indices are sympy expressions over integer, non-negative axis symbols, so later stages can
decide questions such as "is this index a bijection in ``m``?" with algebra instead of guessing.
"""

from __future__ import annotations

import functools

import keyword
import re
from dataclasses import dataclass
from tokenize import TokenError

import sympy
from sympy.parsing.sympy_parser import auto_number, parse_expr

from .errors import UnsupportedPattern

REDUCERS = ("sum", "max", "min", "assign")
COMBINERS = ("mul", "identity")
GRAMMAR = "OUT[axis, ...] (+= | max= | min= | =) IN[index, ...] (* IN[index, ...])*"

_REDUCER_TOKENS = {"sum": "+=", "max": "max=", "min": "min=", "assign": "="}
_TOKEN_REDUCERS = {token: reducer for reducer, token in _REDUCER_TOKENS.items()}
_ACCESS = re.compile(r"\s*([A-Za-z_]\w*)\s*\[([^\[\]]*)\]\s*")
_REDUCER = re.compile(r"(\+=|max=|min=|=)\s*")
_PRODUCT = re.compile(r"\*\s*")
_INDEX_TOKEN = re.compile(r"\s*(?:(?P<int>\d+)|(?P<name>[A-Za-z_]\w*)|(?P<op>//|[-+*%()]))")
_INDEX_HELP = "indices use axis names, integer constants, + - * // % and parentheses"
# Everything the sympy parser may resolve by name besides the axes themselves; auto_number
# emits Integer(...), and the empty __builtins__ keeps eval from reaching Python's builtins.
_SYMPY_NAMES = {"Integer": sympy.Integer, "floor": sympy.floor, "Mod": sympy.Mod, "Symbol": sympy.Symbol}


def axis_symbol(name: str) -> sympy.Symbol:
    """The sympy symbol PIT uses for axis ``name``; the assumptions let sympy simplify floor/Mod."""
    return sympy.Symbol(name, integer=True, nonnegative=True)


@dataclass(frozen=True)
class Access:
    """One tensor read or written at a tuple of index expressions, e.g. ``I[p + r, c]``."""

    tensor: str
    indices: tuple[sympy.Expr, ...]

    def __post_init__(self) -> None:
        indices = tuple(sympy.Integer(i) if isinstance(i, int) else i for i in self.indices)
        for index in indices:
            if not isinstance(index, sympy.Expr):
                raise UnsupportedPattern(
                    f"index {index!r} of {self.tensor!r} is a {type(index).__name__}; expected an int "
                    "or a sympy expression over axis_symbol(...) (or use parse_operator)")
        object.__setattr__(self, "indices", indices)

    @functools.cached_property
    def axes(self) -> tuple[str, ...]:
        """Axis names in order of appearance (sympy's canonical order inside one index).

        Cached: kernels ask for storage orders on every call, and sympy traversal is slow."""
        names: dict[str, None] = {}
        for index in self.indices:
            for node in sympy.preorder_traversal(index):
                if isinstance(node, sympy.Symbol):
                    names.setdefault(node.name, None)
        return tuple(names)

    def __str__(self) -> str:
        return f"{self.tensor}[{', '.join(format_index(i) for i in self.indices)}]"


@dataclass(frozen=True)
class Operator:
    """``output reducer= combiner(inputs)``: one loop nest over all axes, reduced into output."""

    output: Access
    inputs: tuple[Access, ...]
    reducer: str
    combiner: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        _check_operator(self.output, self.inputs, self.reducer, self.combiner, source=None)

    @property
    def axes(self) -> tuple[str, ...]:
        """Every axis: the output's first, then the inputs' in order of first appearance."""
        names: dict[str, None] = {}
        for access in (self.output, *self.inputs):
            names.update(dict.fromkeys(access.axes))
        return tuple(names)

    @property
    def output_axes(self) -> tuple[str, ...]:
        return self.output.axes

    @property
    def reduction_axes(self) -> tuple[str, ...]:
        """Axes the reducer folds away: those that do not index the output."""
        kept = set(self.output.axes)
        return tuple(a for a in self.axes if a not in kept)

    def __str__(self) -> str:
        product = " * ".join(str(access) for access in self.inputs)
        return f"{self.output} {_REDUCER_TOKENS[self.reducer]} {product}"


def parse_operator(text: str) -> Operator:
    """Parse ``OUT[m, n] += A[m, k] * B[k, n]`` without evaluating arbitrary Python."""
    if not isinstance(text, str):
        raise UnsupportedPattern(f"parse_operator expects a string such as {GRAMMAR!r}; got {text!r}")
    output_match = _ACCESS.match(text)
    if output_match is None:
        _fail(text, "expected the output access NAME[axis, ...] at the start")
    output = _parse_access(output_match, text)
    reducer_match = _REDUCER.match(text, output_match.end())
    if reducer_match is None:
        rest = text[output_match.end():].strip()
        _fail(text, f"expected one of +=, max=, min=, = after {output}; got {rest[:12]!r}")
    inputs = []
    pos = reducer_match.end()
    while True:
        term = _ACCESS.match(text, pos)
        if term is None:
            _fail(text, f"expected an input access NAME[index, ...] at {text[pos:pos + 12]!r}")
        inputs.append(_parse_access(term, text))
        pos = term.end()
        if pos == len(text):
            break
        product = _PRODUCT.match(text, pos)
        if product is None:
            _fail(text, f"expected '*' or the end of the operator at {text[pos:pos + 12]!r}")
        pos = product.end()
    reducer = _TOKEN_REDUCERS[reducer_match.group(1)]
    combiner = "identity" if len(inputs) == 1 else "mul"
    _check_operator(output, tuple(inputs), reducer, combiner, source=text)
    return Operator(output, tuple(inputs), reducer, combiner)


def format_index(expr: sympy.Expr) -> str:
    """Print an index so that ``parse_operator`` reads it back: ``m // 2``, not ``floor(m/2)``."""
    if isinstance(expr, sympy.Add):
        first, *rest = expr.as_ordered_terms()
        text = _format_term(first)
        for term in rest:
            if term.could_extract_minus_sign():
                text += " - " + _format_term(-term)
            else:
                text += " + " + _format_term(term)
        return text
    return _format_term(expr)


def _format_term(expr: sympy.Expr) -> str:
    if isinstance(expr, sympy.Symbol):
        return expr.name
    if isinstance(expr, sympy.Integer):
        return str(expr)
    if isinstance(expr, sympy.floor):
        numerator, denominator = expr.args[0].as_numer_denom()
        return f"{_format_left(numerator)} // {_format_factor(denominator)}"
    if isinstance(expr, sympy.Mod):
        dividend, divisor = expr.args
        return f"{_format_left(dividend)} % {_format_factor(divisor)}"
    if isinstance(expr, sympy.Pow) and expr.exp.is_Integer and expr.exp > 0:
        return "*".join([_format_factor(expr.base)] * int(expr.exp))
    if isinstance(expr, sympy.Mul):
        coeff, rest = expr.as_coeff_Mul()
        if coeff.is_Integer:
            body = "*".join(_format_term(f) if isinstance(f, sympy.Pow) else _format_factor(f)
                            for f in rest.as_ordered_factors())
            if coeff == 1:
                return body
            if any(isinstance(f, sympy.Add) for f in rest.as_ordered_factors()):
                # 2*(m + n) would re-parse distributed; a trailing coefficient keeps the product.
                return f"{body}*{_format_factor(coeff)}"
            return "-" + body if coeff == -1 else f"{coeff}*{body}"
    raise UnsupportedPattern(
        f"cannot print index {expr!r}: expected integer arithmetic of axes with + - * // %; "
        "build indices with parse_operator or axis_symbol")


def _format_left(expr: sympy.Expr) -> str:
    text = format_index(expr)
    return f"({text})" if isinstance(expr, sympy.Add) else text


def _format_factor(expr: sympy.Expr) -> str:
    if isinstance(expr, sympy.Symbol) or (isinstance(expr, sympy.Integer) and expr >= 0):
        return format_index(expr)
    return f"({format_index(expr)})"


def _fail(text: str, problem: str) -> None:
    raise UnsupportedPattern(f"cannot parse {text!r}: {problem}; expected {GRAMMAR}")


def _parse_access(match: re.Match, text: str) -> Access:
    tensor, body = match.group(1), match.group(2)
    indices = [part.strip() for part in body.split(",")]
    for position, index in enumerate(indices):
        if not index:
            _fail(text, f"empty index at position {position} of {tensor}[{body}]")
    return Access(tensor, tuple(_parse_index(index, tensor, text) for index in indices))


def _parse_index(index: str, tensor: str, text: str) -> sympy.Expr:
    tokens = _tokenize_index(index, tensor, text)
    names = {value for kind, value in tokens if kind == "name"}
    local_dict = {name: axis_symbol(name) for name in names}
    global_dict = dict(_SYMPY_NAMES, __builtins__={})
    try:
        expr = parse_expr(index, local_dict=local_dict, global_dict=global_dict,
                          transformations=(auto_number,))
    except (SyntaxError, TokenError, TypeError, ValueError, ZeroDivisionError) as e:
        detail = "unbalanced parentheses" if isinstance(e, TokenError) else str(e)
        _fail(text, f"index {index!r} of {tensor} is not valid integer arithmetic ({detail}); {_INDEX_HELP}")
    if not isinstance(expr, sympy.Expr) or expr.has(sympy.zoo, sympy.nan, sympy.oo, sympy.Float):
        _fail(text, f"index {index!r} of {tensor} is not a finite integer expression (division by zero?)")
    return expr


def _tokenize_index(index: str, tensor: str, text: str) -> list[tuple[str, str]]:
    """Whitelist tokens so that only names, integers and + - * // % ( ) ever reach sympy's eval."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(index):
        match = _INDEX_TOKEN.match(index, pos)
        if match is None or match.end() == pos:
            bad = index[pos:].lstrip()[:1]
            _fail(text, f"unexpected character {bad!r} in index {index!r} of {tensor}; {_INDEX_HELP}")
        kind = match.lastgroup
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    for (kind, value), (next_kind, next_value) in zip(tokens, tokens[1:]):
        if (kind, value) == ("op", "*") and (next_kind, next_value) == ("op", "*"):
            _fail(text, f"power '**' in index {index!r} of {tensor} is not supported; write m*m")
        if kind == "name" and (next_kind, next_value) == ("op", "("):
            _fail(text, f"function call {value}(...) in index {index!r} of {tensor} is not allowed; "
                        "use // and % instead")
    for kind, value in tokens:
        if kind == "name" and (keyword.iskeyword(value) or value in _SYMPY_NAMES):
            _fail(text, f"axis name {value!r} in index {index!r} of {tensor} is reserved; rename the axis")
    return tokens


def _check_operator(output: Access, inputs: tuple[Access, ...], reducer: str, combiner: str,
                    source: str | None) -> None:
    shown = source if source is not None else _safe_str(output, inputs, reducer)

    def fail(problem: str) -> None:
        raise UnsupportedPattern(f"invalid operator {shown!r}: {problem}")

    if reducer not in REDUCERS:
        fail(f"reducer {reducer!r} is not one of {REDUCERS}")
    if combiner not in COMBINERS:
        fail(f"combiner {combiner!r} is not one of {COMBINERS}")
    if not inputs:
        fail("expected at least one input access")
    expected_combiner = "identity" if len(inputs) == 1 else "mul"
    if combiner != expected_combiner:
        fail(f"combiner {combiner!r} does not fit {len(inputs)} input(s); expected {expected_combiner!r}")
    for position, index in enumerate(output.indices):
        if not isinstance(index, sympy.Symbol):
            fail(f"output index {format_index(index)!r} at position {position} is not a bare axis name; "
                 "PIT writes outputs at plain axes such as OUT[m, n]")
    seen: set[str] = set()
    for index in output.indices:
        if index.name in seen:
            fail(f"axis {index.name!r} appears twice in the output {output}; each output axis must be distinct")
        seen.add(index.name)
    ranks = {output.tensor: len(output.indices)}
    for access in inputs:
        if access.tensor == output.tensor:
            fail(f"tensor {access.tensor!r} is both the output and an input; write to a new tensor")
        if ranks.setdefault(access.tensor, len(access.indices)) != len(access.indices):
            fail(f"tensor {access.tensor!r} is used with {ranks[access.tensor]} and "
                 f"{len(access.indices)} indices; each tensor has one rank")
    if reducer == "assign":
        reduced = [a for access in inputs for a in access.axes if a not in seen]
        if reduced:
            fail(f"'=' assigns each output element once, but axes {sorted(set(reduced))} do not index "
                 "the output; write +=, max= or min= to reduce over them")


def _safe_str(output: Access, inputs: tuple[Access, ...], reducer: str) -> str:
    token = _REDUCER_TOKENS.get(reducer, f"{reducer}=")
    try:
        return f"{output} {token} {' * '.join(str(a) for a in inputs)}"
    except UnsupportedPattern:
        return f"{output.tensor}{list(output.indices)} {token} ..."
