"""Task: the dpo training stage."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.runner import run_step
from nexus_core.train.dpo import DPOConfig, DPOResult, run_dpo
from tasks.common import nexus_task, run_context


@nexus_task(run_dpo, name="train-dpo", gpu=True)
def train_dpo(cfg: DPOConfig, model: ArtifactRef, data: ArtifactRef, name: str = "dpo",
              more_data: dict[str, ArtifactRef] | None = None,
              eval_data: ArtifactRef | None = None) -> DPOResult:
    """Train ``model`` on ``data`` into ``train/<name>_vN`` (resumes from its checkpoints if killed)."""
    inputs = {"model": model, "data": data, **(more_data or {}), "eval_data": eval_data}  # data_1, ...: mixed in
    return run_step(run_dpo, cfg, name=name, inputs=inputs, context=run_context())
