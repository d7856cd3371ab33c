"""Task: train the LLM → Flux.2 Klein projector on precomputed latents (DiT and LLM frozen)."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.flux.projector_train import ProjectorTrainConfig, ProjectorTrainResult, run_projector_train
from nexus_core.runner import run_step
from tasks.common import nexus_task, run_context


@nexus_task(run_projector_train, name="image-gen-train", gpu=True)
def image_gen_train(cfg: ProjectorTrainConfig, precomputed: ArtifactRef, llm: ArtifactRef,
                    pipeline: ArtifactRef | None = None, name: str = "image_gen_projector") -> ProjectorTrainResult:
    """Train the projector into ``models/<name>_vN``; a killed run resumes from its work dir."""
    return run_step(run_projector_train, cfg, name=name,
                    inputs={"precomputed": precomputed, "llm": llm, "pipeline": pipeline}, context=run_context())
