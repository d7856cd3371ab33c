"""Task: encode caption + video rows into SVD latents, first-frame latents and CLIP embeddings."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.runner import run_step
from nexus_core.videogen.precompute import VideoPrecomputeConfig, VideoPrecomputeResult, run_video_precompute
from tasks.common import nexus_task, run_context


@nexus_task(run_video_precompute, name="video-gen-precompute", gpu=True)
def video_gen_precompute(cfg: VideoPrecomputeConfig, source: ArtifactRef, pipeline: ArtifactRef | None = None,
                         name: str = "video_gen_latents") -> VideoPrecomputeResult:
    """Encode the caption file's videos into ``videogen/<name>_vN``."""
    return run_step(run_video_precompute, cfg, name=name, inputs={"source": source, "pipeline": pipeline},
                    context=run_context())
