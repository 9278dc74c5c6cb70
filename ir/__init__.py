"""PIT's intermediate representation: operators as index expressions with sparsity attributes."""

from .contraction import Contraction, as_contraction
from .errors import BackendUnavailable, CompilationError, InvalidKnobs, PITError, UnsupportedPattern
from .expr import Access, Operator, axis_symbol, format_index, parse_operator
from .pit_plan import FORMS, PITPlan, SparsityAttr, plan_pit
from .pit_rules import AxisRule, PITRules, derive_pit_rules

__all__ = [
    "Access",
    "AxisRule",
    "BackendUnavailable",
    "CompilationError",
    "Contraction",
    "FORMS",
    "InvalidKnobs",
    "Operator",
    "PITError",
    "PITPlan",
    "PITRules",
    "SparsityAttr",
    "UnsupportedPattern",
    "as_contraction",
    "axis_symbol",
    "derive_pit_rules",
    "format_index",
    "parse_operator",
    "plan_pit",
]
