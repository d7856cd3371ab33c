"""Task: a multimodal training stage (mm_align: projector alignment; mm_sft: visual instruction tuning)."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.runner import run_step
from nexus_core.train.mm_train import MMAlignConfig, MMResult, MMSFTConfig, run_mm_train
from tasks.common import nexus_task, run_context


@nexus_task(run_mm_train, name="train-mm", gpu=True)
def train_mm(cfg: MMAlignConfig | MMSFTConfig, model: ArtifactRef, data: ArtifactRef, name: str = "mm",
             features: ArtifactRef | None = None, teacher: ArtifactRef | None = None) -> MMResult:
    """Train ``model`` on ``data`` (messages + images) into ``train/<name>_vN`` (resumes from its checkpoints);
    with ``features`` (precomputed tower features) from those shards instead of the media; with ``teacher``
    (mm_sft kd) distilling it."""
    return run_step(run_mm_train, cfg, name=name, inputs={"model": model, "data": data, "features": features,
                                                          "teacher": teacher}, context=run_context())
