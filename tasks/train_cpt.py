"""Task: the cpt training stage."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.runner import run_step
from nexus_core.train.cpt import CPTConfig, CPTResult, run_cpt
from tasks.common import nexus_task, run_context


@nexus_task(run_cpt, name="train-cpt", gpu=True)
def train_cpt(cfg: CPTConfig, model: ArtifactRef, data: ArtifactRef, name: str = "cpt") -> CPTResult:
    """Train ``model`` on ``data`` into ``train/<name>_vN`` (resumes from its checkpoints if killed)."""
    return run_step(run_cpt, cfg, name=name, inputs={"model": model, "data": data},
                    context=run_context())
