"""Task: train the Flux.2 transformer (LoRA or full) from precomputed shards."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.flux.train import TrainConfig, TrainResult, run_train
from nexus_core.runner import run_step
from tasks.common import nexus_task, run_context


@nexus_task(run_train, name="flux-train", gpu=True)
def flux_train(cfg: TrainConfig, precomputed: ArtifactRef, pipeline: ArtifactRef | None = None,
               name: str = "flux_transformer") -> TrainResult:
    """Train on ``precomputed`` into ``models/<name>_vN``; a killed run resumes from its work dir."""
    return run_step(run_train, cfg, name=name, inputs={"precomputed": precomputed, "pipeline": pipeline},
                    context=run_context())
