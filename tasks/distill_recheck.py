"""Task: the queue of regenerated rows for a second human review."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.distill.recheck import RecheckConfig, run_recheck_queue
from nexus_core.runner import StepResult, run_step
from tasks.common import nexus_task, run_context


@nexus_task(run_recheck_queue, name="distill-recheck")
def recheck_queue(cfg: RecheckConfig, regenerated: ArtifactRef, name: str = "recheck") -> StepResult:
    """Write the rows regeneration rescued, shaped for review, into ``distill/<name>_vN``."""
    return run_step(run_recheck_queue, cfg, name=name, inputs={"regenerated": regenerated},
                    context=run_context())
