"""Report: one ``eval_report_<run_id>.json`` tying model, dataset, metrics, judge verdicts and gates together.

Also writes ``data.parquet``: a one-row summary (what the leaderboard reads) and ``worst.parquet``:
the lowest-scored samples, for people reading the report. Standard tasks run by the harness step, when
given, go in their own ``harness`` section (and ``harness_json`` column), never into the rubric score.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import polars as pl
from pydantic import Field

from nexus_core.artifacts import ArtifactRef, atomic_write_json, now_iso, read_manifest
from nexus_core.config import NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import directory, step, table
from nexus_core.evaluate.records import harness_values
from nexus_core.evaluate.rubric import HEURISTIC_LABEL, judged_dimensions
from nexus_core.io import load_table, schema_of, write_parquet
from nexus_core.runner import StepResult


class ReportConfig(NexusModel):
    """What goes into the report."""

    run_id: str = Field(default="adhoc", description="Evaluation run id; names eval_report_<run_id>.json")
    worst_samples: int = Field(default=5, ge=0, description="Lowest-scored samples quoted in the report")


class ReportResult(StepResult):
    """The verdict and the headline numbers."""

    run_id: str
    report_file: str
    gate_passed: bool
    judge_kind: str
    score: float | None = Field(default=None, description="Mean of the rubric medians (the leaderboard's sort key)")
    coverage: float | None = Field(default=None, description="Rows with a usable verdict / rows")


def _ref_info(ref: ArtifactRef | None) -> dict | None:
    if ref is None:
        return None
    return {"name": ref.name, "version": ref.version, "uri": ref.uri, "digest": ref.digest, "rows": ref.rows}


@step(area="evaluate", kind="report", inputs={
    "predictions": directory(description="the predict step's artifact (its manifest names model and dataset)"),
    "scores": directory(description="the score step's output (metrics.json)"),
    "judged": table(description="the judge step's artifact"),
    "gates": directory(description="the gates step's output (gates.json)"),
    "harness": directory(optional=True, description="the harness step's output (harness.json), if it ran"),
})
def run_report(cfg: ReportConfig, *, inputs: dict[str, ArtifactRef], out_uri: str, ctx: StepContext) -> ReportResult:
    """Assemble the report from the predictions, scores, judged and gates artifacts."""
    scores = json.loads((inputs["scores"].path / "metrics.json").read_text())
    gates = json.loads((inputs["gates"].path / "gates.json").read_text())
    judged = load_table(inputs["judged"])
    judge_result = read_manifest(inputs["judged"].uri).result
    kind = judge_result.get("judge_kind", "unknown")
    dims = judged_dimensions(inputs["judged"], judged.columns)
    rows = judged.height
    ok = judge_result.get("ok")
    coverage = judge_result.get("coverage")
    if coverage is None and ok is not None:  # judged before coverage was recorded
        coverage = ok / rows if rows else 0.0
    summary = {}
    for d in dims:
        vals = [v for v in judged[d].to_list() if v is not None]
        summary[d] = {"median": statistics.median(vals) if vals else None,
                      "mean": statistics.fmean(vals) if vals else None, "n": len(vals),
                      "coverage": len(vals) / rows if rows else 0.0}
    medians = [s["median"] for s in summary.values() if s["median"] is not None]
    score = statistics.fmean(medians) if medians else None
    worst = judged
    if dims:
        worst = judged.with_columns(pl.mean_horizontal([pl.col(d) for d in dims]).alias("_mean")) \
                      .sort("_mean", nulls_last=False).drop("_mean")
    keep = [c for c in ["row_id", "input", "prediction", "reference", "status", "reason", *dims] if c in judged.columns]
    worst = worst.head(cfg.worst_samples).select(keep)

    pred_manifest = read_manifest(inputs["predictions"].uri)
    harness = json.loads((inputs["harness"].path / "harness.json").read_text()) if "harness" in inputs else None
    report = {
        "run_id": cfg.run_id,
        "created_at": now_iso(),
        "model": _ref_info(pred_manifest.inputs.get("model")),
        "dataset": _ref_info(pred_manifest.inputs.get("dataset")),
        "predictions": {**(_ref_info(inputs["predictions"]) or {}), "runtime": pred_manifest.result.get("runtime"),
                        "rows_digest": pred_manifest.result.get("rows_digest")},
        "metrics": scores["values"],
        "metrics_skipped": scores.get("skipped", {}),
        "judge": {"kind": kind, "name": judge_result.get("judge"),
                  "label": HEURISTIC_LABEL if kind == "heuristic" else judge_result.get("label"),
                  "rubric": judge_result.get("rubric"), "rows": rows, "ok": ok,
                  "unparseable": judge_result.get("unparseable"), "recovered": judge_result.get("recovered"),
                  "failed": judge_result.get("failed"), "coverage": coverage, "dimensions": summary},
        "coverage": coverage,
        "methodology_share": float(judged["has_methodology"].mean() or 0.0) if "has_methodology" in judged.columns else None,  # pyright: ignore[reportArgumentType] - polars' mean() is typed as any literal
        "gates": gates["gates"],
        "gate_passed": bool(gates["passed"]),
        "harness": harness,
        "score": score,
        "worst_samples": worst.to_dicts(),
    }
    out = Path(out_uri)
    fname = f"eval_report_{cfg.run_id}.json"
    atomic_write_json(out / fname, report)
    write_parquet(worst, out / "worst.parquet")
    model = report["model"] or {}
    row = pl.DataFrame([{
        "run_id": cfg.run_id, "model": model.get("name"), "model_uri": model.get("uri"),
        "dataset": (report["dataset"] or {}).get("name"), "judge_kind": kind, "judge": judge_result.get("judge"),
        "score": score, "gate_passed": report["gate_passed"], "rows": judged.height, "coverage": coverage,
        "rubric": judge_result.get("rubric"),
        "metrics_json": json.dumps(scores["values"]),
        "harness_json": json.dumps(harness_values(harness)),
        **{f"{d}_median": (None if s["median"] is None else float(s["median"])) for d, s in summary.items()},
    }])
    write_parquet(row, out / "data.parquet")
    metrics = {f"{kind}_judge.score": score} if score is not None else {}
    metrics["gate_passed"] = float(report["gate_passed"])
    if coverage is not None:
        metrics[f"{kind}_judge.coverage"] = coverage
    return ReportResult(rows=1, columns=schema_of(row), run_id=cfg.run_id, report_file=fname,
                        gate_passed=report["gate_passed"], judge_kind=kind, score=score, coverage=coverage,
                        metrics=metrics)
