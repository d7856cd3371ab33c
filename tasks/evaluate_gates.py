"""Task: decide the quality gates."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.evaluate.gates import GatesConfig, GatesResult, run_gates
from nexus_core.runner import run_step
from tasks.common import nexus_task, run_context


@nexus_task(run_gates, name="evaluate-gates", tags=["evaluate"])
def evaluate_gates(cfg: GatesConfig, judged: ArtifactRef, scores: ArtifactRef | None = None,
                   name: str = "eval") -> GatesResult:
    """Every gate's value and verdict → ``evaluate/<name>_gates_vN`` (gates.json)."""
    return run_step(run_gates, cfg, name=f"{name}_gates", inputs={"judged": judged, "scores": scores},
                    context=run_context())
