"""Task: the reward training stage."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.runner import run_step
from nexus_core.train.reward import RewardConfig, RewardResult, run_reward
from tasks.common import nexus_task, run_context


@nexus_task(run_reward, name="train-reward", gpu=True)
def train_reward(cfg: RewardConfig, model: ArtifactRef, data: ArtifactRef, name: str = "reward") -> RewardResult:
    """Train ``model`` on ``data`` into ``train/<name>_vN`` (resumes from its checkpoints if killed)."""
    return run_step(run_reward, cfg, name=name, inputs={"model": model, "data": data},
                    context=run_context())
