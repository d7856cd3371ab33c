"""Task: the knowledge-distillation training stage."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.runner import run_step
from nexus_core.train.kd import KDConfig, KDResult, run_kd
from tasks.common import nexus_task, run_context


@nexus_task(run_kd, name="train-kd", gpu=True)
def train_kd(cfg: KDConfig, model: ArtifactRef, data: ArtifactRef, name: str = "kd",
             teacher: ArtifactRef | None = None) -> KDResult:
    """Distil ``teacher`` (or the teacher logprobs stored in ``data``) into ``model`` → ``train/<name>_vN``."""
    return run_step(run_kd, cfg, name=name, inputs={"model": model, "data": data, "teacher": teacher},
                    context=run_context())
