"""Task: lm-evaluation-harness tasks on the model under evaluation."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.evaluate.harness import HarnessConfig, HarnessResult, run_harness
from nexus_core.runner import run_step
from tasks.common import nexus_task, run_context


@nexus_task(run_harness, name="evaluate-harness", gpu=True, tags=["evaluate"])
def evaluate_harness(cfg: HarnessConfig, model: ArtifactRef, name: str = "eval") -> HarnessResult:
    """lm-eval tasks from local task files → ``evaluate/<name>_harness_vN`` (harness.json, samples.jsonl)."""
    return run_step(run_harness, cfg, name=f"{name}_harness", inputs={"model": model}, context=run_context())
