"""Task: build the tiny Flux.2 Klein pipeline (tiny preset)."""

from __future__ import annotations

from nexus_core.flux.tiny_pipeline import TinyPipelineConfig, TinyPipelineResult, run_tiny_pipeline
from nexus_core.runner import run_step
from tasks.common import nexus_task, run_context


@nexus_task(run_tiny_pipeline, name="flux-tiny-pipeline")
def flux_tiny_pipeline(cfg: TinyPipelineConfig, name: str = "flux_tiny") -> TinyPipelineResult:
    """Build a small Klein-compatible pipeline into ``models/<name>_vN``."""
    return run_step(run_tiny_pipeline, cfg, name=name, context=run_context())
