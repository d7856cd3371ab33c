"""Task: teacher collection through litellm (retried by Prefect only for unexpected crashes)."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.distill.collect import CollectConfig, CollectResult, run_teacher_collect
from nexus_core.runner import run_step
from tasks.common import nexus_task, run_context
from tasks.tags import teacher_tags


# Per-request retries live in the client; a task retry re-runs from the response cache, paying nothing twice.
@nexus_task(run_teacher_collect, name="distill-collect", retries=1, retry_delay_seconds=5,
            call_tags=lambda cfg: teacher_tags(cfg.teacher))
def teacher_collect(cfg: CollectConfig, teacher_inputs: ArtifactRef, name: str = "collected") -> CollectResult:
    """Ask the teacher about every teacher-input row into ``distill/<name>_vN``."""
    return run_step(run_teacher_collect, cfg, name=name,
                    inputs={"teacher_inputs": teacher_inputs}, context=run_context())
