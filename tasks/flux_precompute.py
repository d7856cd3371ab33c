"""Task: prepared MDS → latents + text embeddings MDS (flux precompute)."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.flux.precompute import PrecomputeConfig, PrecomputeResult, run_precompute
from nexus_core.runner import run_step
from tasks.common import nexus_task, run_context


@nexus_task(run_precompute, name="flux-precompute", gpu=True)
def flux_precompute(cfg: PrecomputeConfig, prepared: ArtifactRef, pipeline: ArtifactRef | None = None,
                    name: str = "flux_latents") -> PrecomputeResult:
    """Run the VAE and text encoder once over ``prepared`` into ``flux/<name>_vN`` (resumable by group)."""
    return run_step(run_precompute, cfg, name=name, inputs={"prepared": prepared, "pipeline": pipeline},
                    context=run_context())
