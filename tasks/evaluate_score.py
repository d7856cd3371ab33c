"""Task: compute metrics on a predictions table."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.evaluate.score import ScoreConfig, ScoreResult, run_score
from nexus_core.runner import run_step
from tasks.common import nexus_task, run_context


@nexus_task(run_score, name="evaluate-score", tags=["evaluate"])
def evaluate_score(cfg: ScoreConfig, predictions: ArtifactRef, name: str = "eval") -> ScoreResult:
    """Metrics from the registry → ``evaluate/<name>_scores_vN`` (metrics.json)."""
    return run_step(run_score, cfg, name=f"{name}_scores", inputs={"predictions": predictions},
                    context=run_context())
