"""Task: teacher inputs (raw sources × prompt templates)."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.distill.inputs import TeacherInputsConfig, TeacherInputsResult, run_teacher_inputs
from nexus_core.runner import run_step
from tasks.common import nexus_task, run_context


@nexus_task(run_teacher_inputs, name="distill-inputs")
def teacher_inputs(cfg: TeacherInputsConfig, sources: dict[str, ArtifactRef],
                   name: str = "teacher_inputs") -> TeacherInputsResult:
    """Render every template on every source record into ``distill/<name>_vN``."""
    return run_step(run_teacher_inputs, cfg, name=name, inputs=sources, context=run_context())
