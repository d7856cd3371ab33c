"""Task: render prompts to animated GIFs and PNG frames with the LLM + projector driving SVD."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.runner import run_step
from nexus_core.videogen.render import VideoRenderConfig, VideoRenderResult, run_video_render
from tasks.common import nexus_task, run_context


@nexus_task(run_video_render, name="video-gen-render", gpu=True)
def video_gen_render(cfg: VideoRenderConfig, projector: ArtifactRef, llm: ArtifactRef,
                     pipeline: ArtifactRef | None = None, name: str = "video_gen_videos") -> VideoRenderResult:
    """Render ``cfg.prompts`` into ``videogen/<name>_vN`` (videos/*.gif, frames/, data.jsonl)."""
    return run_step(run_video_render, cfg, name=name,
                    inputs={"projector": projector, "llm": llm, "pipeline": pipeline}, context=run_context())
