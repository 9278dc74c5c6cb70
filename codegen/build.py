"""Schedule and compile a PIT PrimFunc for a target, and name the result for the kernel cache."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import asdict

import tvm
from tvm.target import Target

from pit_compiler.ir import CompilationError
from pit_compiler.runtime.kept import kept
from pit_compiler.schedules import template_for

log = logging.getLogger(__name__)

# Bump whenever generated TIR or schedules change meaning, so stale cached kernels never match.
CODEGEN_VERSION = 4


def kept_per_plan(question):
    """``question(plan, *facts)``, its answers kept per ``(plan.signature(), *facts)``: the
    tensor-core tiles are asked on every kernel call whether and with what knobs they serve it,
    and plans do not hash (their tile is a dict). Targets among the facts compare by identity
    (run time reuses one per device)."""
    answers: dict = {}

    @functools.wraps(question)
    def answer(plan, *facts):
        return kept(answers, (plan.signature(), *facts), lambda: question(plan, *facts))

    return answer


def kernel_key(kind: str, signature: str, dtypes: dict, target: Target, knobs) -> str:
    """A stable hash of everything a compiled kernel depends on."""
    return _hashed_key(kind, signature, tuple(sorted(dtypes.items())), _target_text(target), knobs)


@functools.lru_cache(maxsize=64)  # Targets compare by identity; run time reuses one per device
def _target_text(target: Target) -> str:
    return str(target)


@functools.lru_cache(maxsize=4096)  # every kernel call looks its key up: hash once per kernel
def _hashed_key(kind: str, signature: str, dtypes: tuple, target: str, knobs) -> str:
    config = {
        "kind": kind,
        "signature": signature,
        "dtypes": dict(dtypes),
        "target": target,
        "knobs": {"template": type(knobs).__qualname__, **asdict(knobs)},
        "tvm": tvm.__version__,
        "codegen": CODEGEN_VERSION,
    }
    text = json.dumps(config, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# Copies a schedule marks asynchronous (software-pipelined shared-memory stages) become
# cp.async on CUDA; nothing else changes.
BUILD_CONFIG = {"tirx.use_async_copy": True}


def default_knobs(target: Target):
    return template_for(target).Knobs()


def compile_primfunc(func, target: Target, knobs=None, *, what: str = "kernel", template=None):
    """Apply ``template`` (default: the target's first) with ``knobs`` and build with TVM."""
    template = template if template is not None else template_for(target)
    knobs = knobs if knobs is not None else template.Knobs()
    try:
        sch = template.apply(func, target, knobs)
        assert sch is not None, f"{template.name} accepted {target} but returned no schedule"
        with tvm.transform.PassContext(config=BUILD_CONFIG):
            executable = tvm.compile(sch.mod, target=target)
    except Exception as error:  # TVM raises many types; the user gets one, with the cause
        raise CompilationError(
            f"TVM could not build the PIT {what} for target {str(target)!r} "
            f"with {template.name} knobs {knobs!r}: {type(error).__name__}: {error}"
        ) from error
    log.debug("built %s for %s with %s", what, target, knobs)
    return executable
