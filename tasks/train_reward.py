"""Task: the reward training stage."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.runner import run_step
from nexus_core.train.reward import RewardConfig, RewardResult, run_reward
from tasks.common import nexus_task, run_context


@nexus_task(run_reward, name="train-reward", gpu=True)
def train_reward(cfg: RewardConfig, model: ArtifactRef, data: ArtifactRef, name: str = "reward",
                 more_data: dict[str, ArtifactRef] | None = None,
                 eval_data: ArtifactRef | None = None) -> RewardResult:
    """Train ``model`` on ``data`` into ``train/<name>_vN`` (resumes from its checkpoints if killed)."""
    inputs = {"model": model, "data": data, **(more_data or {}), "eval_data": eval_data}  # data_1, ...: mixed in
    return run_step(run_reward, cfg, name=name, inputs=inputs, context=run_context())
