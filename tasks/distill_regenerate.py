"""Task: regenerate rejected rows with a stricter prompt."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.distill.regenerate import RegenerateConfig, RegenerateResult, run_regenerate
from nexus_core.runner import run_step
from tasks.common import nexus_task, run_context
from tasks.tags import teacher_tags


@nexus_task(run_regenerate, name="distill-regenerate", retries=1, retry_delay_seconds=5,
            call_tags=lambda cfg: teacher_tags(cfg.teacher))
def regenerate(cfg: RegenerateConfig, reviewed: ArtifactRef, name: str = "regenerated") -> RegenerateResult:
    """Regenerate and re-filter rejected rows into ``distill/<name>_vN``."""
    return run_step(run_regenerate, cfg, name=name, inputs={"reviewed": reviewed},
                    context=run_context())
