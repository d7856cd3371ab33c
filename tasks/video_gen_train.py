"""Task: train the LLM → Stable Video Diffusion projector on precomputed video latents (UNet and LLM frozen)."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.runner import run_step
from nexus_core.videogen.train import (
    VideoProjectorTrainConfig,
    VideoProjectorTrainResult,
    run_video_projector_train,
)
from tasks.common import nexus_task, run_context


@nexus_task(run_video_projector_train, name="video-gen-train", gpu=True)
def video_gen_train(cfg: VideoProjectorTrainConfig, precomputed: ArtifactRef, llm: ArtifactRef,
                    pipeline: ArtifactRef | None = None, name: str = "video_gen_projector") -> VideoProjectorTrainResult:
    """Train the projector into ``models/<name>_vN``; a killed run resumes from its work dir."""
    return run_step(run_video_projector_train, cfg, name=name,
                    inputs={"precomputed": precomputed, "llm": llm, "pipeline": pipeline}, context=run_context())
