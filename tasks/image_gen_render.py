"""Task: render prompts to PNG with the LLM + projector driving the Flux.2 Klein pipeline."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.flux.projector_render import RenderConfig, RenderResult, run_projector_render
from nexus_core.runner import run_step
from tasks.common import nexus_task, run_context


@nexus_task(run_projector_render, name="image-gen-render", gpu=True)
def image_gen_render(cfg: RenderConfig, projector: ArtifactRef, llm: ArtifactRef, pipeline: ArtifactRef | None = None,
                     name: str = "image_gen_images") -> RenderResult:
    """Render ``cfg.prompts`` into ``flux/<name>_vN`` (images/ + data.jsonl)."""
    return run_step(run_projector_render, cfg, name=name,
                    inputs={"projector": projector, "llm": llm, "pipeline": pipeline}, context=run_context())
