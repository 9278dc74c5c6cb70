"""Schedule templates for PIT's kernels and their tunable knobs."""

from .common import ScheduleTemplate, check
from .cpu_parallel import CpuParallel
from .simt import SimtThreads

# Ordered: the first template whose target matches schedules the function.
TEMPLATES: tuple[ScheduleTemplate, ...] = (SimtThreads(), CpuParallel())


def template_for(target) -> ScheduleTemplate:
    """The first template that serves ``target``."""
    for template in TEMPLATES:
        if template.is_target_available(target):
            return template
    from pit_compiler.ir import BackendUnavailable

    names = [t.name for t in TEMPLATES]
    raise BackendUnavailable(
        f"no schedule template serves target {str(target)!r}; templates {names} cover 'llvm' and 'cuda'"
    )


__all__ = ["ScheduleTemplate", "check", "CpuParallel", "SimtThreads", "TEMPLATES", "template_for"]
