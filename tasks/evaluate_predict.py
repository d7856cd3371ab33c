"""Task: generate predictions of a model on a validation set."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.evaluate.predict import PredictConfig, PredictResult, run_predict
from nexus_core.runner import run_step
from tasks.common import nexus_task, run_context


@nexus_task(run_predict, name="evaluate-predict", gpu=True, tags=["evaluate"])
def evaluate_predict(cfg: PredictConfig, model: ArtifactRef, dataset: ArtifactRef, name: str = "eval") -> PredictResult:
    """Batched generation → ``evaluate/<name>_predictions_vN`` (with predictions_<run_id>.parquet)."""
    return run_step(run_predict, cfg, name=f"{name}_predictions",
                    inputs={"model": model, "dataset": dataset}, context=run_context())
