"""Task: images + captions → MDS (flux prepare)."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.flux.prepare import PrepareConfig, PrepareResult, run_prepare
from nexus_core.runner import run_step
from tasks.common import nexus_task, run_context


@nexus_task(run_prepare, name="flux-prepare")
def flux_prepare(cfg: PrepareConfig, source: ArtifactRef, class_dir: ArtifactRef | None = None,
                 pipeline: ArtifactRef | None = None, name: str = "flux_images") -> PrepareResult:
    """Filter and square-crop ``source`` images (and DreamBooth class images) into ``flux/<name>_vN``."""
    inputs = {"source": source, "class_dir": class_dir, "pipeline": pipeline}
    return run_step(run_prepare, cfg, name=name, inputs=inputs, context=run_context())
