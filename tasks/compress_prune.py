"""Task: prune a model (magnitude, structured, or layer dropping)."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.compress.prune import PruneConfig, PruneResult, run_prune
from nexus_core.runner import run_step
from tasks.common import nexus_task, run_context


@nexus_task(run_prune, name="compress-prune")
def prune(cfg: PruneConfig, model: ArtifactRef, calibration: ArtifactRef | None = None,
          name: str = "pruned") -> PruneResult:
    """Prune ``model`` into ``compress/<name>_vN`` (calibration drives layer importance and recovery)."""
    return run_step(run_prune, cfg, name=name, inputs={"model": model, "calibration": calibration},
                    context=run_context())
