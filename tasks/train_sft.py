"""Task: the sft training stage."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.runner import run_step
from nexus_core.train.sft import SFTConfig, SFTResult, run_sft
from tasks.common import nexus_task, run_context


@nexus_task(run_sft, name="train-sft", gpu=True)
def train_sft(cfg: SFTConfig, model: ArtifactRef, data: ArtifactRef, name: str = "sft") -> SFTResult:
    """Train ``model`` on ``data`` into ``train/<name>_vN`` (resumes from its checkpoints if killed)."""
    return run_step(run_sft, cfg, name=name, inputs={"model": model, "data": data},
                    context=run_context())
