"""Task: teacher inputs (raw sources × prompt templates)."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.distill_lib import template_texts
from nexus_core.runner import run_step
from nexus_core.steps.distill.inputs import TeacherInputsConfig, TeacherInputsResult, run_teacher_inputs
from tasks.common import nexus_task, run_context


def _templates(params: dict) -> list[str]:
    cfg: TeacherInputsConfig = params["cfg"]
    return template_texts(cfg.prompts_dir, cfg.templates)


@nexus_task(run_teacher_inputs, name="distill-inputs", extra_sources=_templates)
def teacher_inputs(cfg: TeacherInputsConfig, sources: dict[str, ArtifactRef],
                   name: str = "teacher_inputs") -> TeacherInputsResult:
    """Render every template on every source record into ``distill/<name>_vN``."""
    return run_step(run_teacher_inputs, cfg, area="distill", name=name, inputs=sources, context=run_context(),
                    extra_sources=tuple(template_texts(cfg.prompts_dir, cfg.templates)))
