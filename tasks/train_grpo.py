"""Task: the GRPO training stage (rule rewards, optionally a reward model)."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.runner import run_step
from nexus_core.train.grpo import GRPOConfig, GRPOResult, run_grpo
from tasks.common import nexus_task, run_context


@nexus_task(run_grpo, name="train-grpo", gpu=True)
def train_grpo(cfg: GRPOConfig, model: ArtifactRef, data: ArtifactRef, name: str = "grpo",
               reward_model: ArtifactRef | None = None) -> GRPOResult:
    """GRPO on ``data``'s prompts into ``train/<name>_vN`` (RL against ``reward_model`` when given)."""
    return run_step(run_grpo, cfg, name=name, inputs={"model": model, "data": data, "reward_model": reward_model},
                    context=run_context())
