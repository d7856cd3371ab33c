"""Task: build or pin the base model."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.runner import run_step
from nexus_core.train.base_model import BaseModelConfig, BaseModelResult, run_base_model
from tasks.common import nexus_task, run_context


@nexus_task(run_base_model, name="base-model")
def base_model(cfg: BaseModelConfig, corpus: ArtifactRef | None = None, name: str = "base",
               pretrained: ArtifactRef | None = None) -> BaseModelResult:
    """Build the tiny preset model on ``corpus``, or pin ``pretrained`` (``pretrained_ref(cfg)``), into
    ``models/<name>_vN``."""
    return run_step(run_base_model, cfg, name=name, inputs={"corpus": corpus, "pretrained": pretrained},
                    context=run_context())
