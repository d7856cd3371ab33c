"""Task: write the evaluation report and put it on the leaderboard."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.evaluate.records import record_report
from nexus_core.evaluate.report import ReportConfig, ReportResult, run_report
from nexus_core.runner import run_step
from tasks.common import nexus_task, run_context


@nexus_task(run_report, name="evaluate-report", tags=["evaluate"])
def evaluate_report(cfg: ReportConfig, predictions: ArtifactRef, scores: ArtifactRef, judged: ArtifactRef,
                    gates: ArtifactRef, harness: ArtifactRef | None = None, name: str = "eval") -> ReportResult:
    """``evaluate/<name>_report_vN`` with eval_report_<run_id>.json; a leaderboard row; MLflow tables."""
    ctx = run_context()
    result = run_step(run_report, cfg, name=f"{name}_report",
                      inputs={"predictions": predictions, "scores": scores, "judged": judged, "gates": gates,
                              "harness": harness},
                      context=ctx)
    record_report(result.ref, ctx.flow_run_id)  # idempotent: a reused report is not listed twice
    return result
