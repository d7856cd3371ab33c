"""Task: build the tiny Stable Video Diffusion pipeline (tiny video_gen recipe)."""

from __future__ import annotations

from nexus_core.runner import run_step
from nexus_core.videogen.tiny_svd import TinySVDResult, TinySVDStepConfig, run_tiny_svd
from tasks.common import nexus_task, run_context


@nexus_task(run_tiny_svd, name="video-gen-tiny-svd")
def video_gen_tiny_svd(cfg: TinySVDStepConfig, name: str = "svd_tiny") -> TinySVDResult:
    """Build a tiny SVD pipeline into ``models/<name>_vN``."""
    return run_step(run_tiny_svd, cfg, name=name, context=run_context())
