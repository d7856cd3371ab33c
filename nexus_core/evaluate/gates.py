"""Quality gates: thresholds from config over the judged table and the metrics, one verdict.

Defaults (issue 7): median >= 3.5 on plausibility and on falsifiability; >= 70 % of samples with a
methodology block of at least 3 ordered steps; teacher-student agreement (mean) >= 3.0 on the top 500.
Rubric columns are null for rows the judge could not score; those rows do not count in the statistic,
but they count against its *coverage*: every column gate reports ``n`` (rows with a value), ``rows``
(rows it looked at) and ``coverage`` = n / rows, and fails below ``min_coverage`` (default 0.9), so a
judge that answered 1 row in 8 cannot pass a gate on that one row. A gate with no usable value fails
(an evaluation that scored nothing must not promote a model).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Literal

import polars as pl
from pydantic import Field, model_validator

from nexus_core.artifacts import ArtifactRef, atomic_write_json
from nexus_core.config import NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import directory, step, table
from nexus_core.errors import InputError
from nexus_core.io import load_table, schema_of, write_parquet
from nexus_core.runner import StepResult


class Gate(NexusModel):
    """One threshold: a statistic of a judged-table column, or a metric value, must reach ``min``."""

    name: str = Field(description="Gate name shown in reports")
    column: str | None = Field(default=None, description="Judged-table column (a rubric dimension, has_methodology, ...)")
    metric: str | None = Field(default=None, description="Metric name from the score step (instead of a column)")
    stat: Literal["median", "mean", "share_true", "value"] = Field(
        default="median", description="median/mean of the column, share of true values, or the metric's value")
    min: float | None = Field(default=None, description="Pass when the statistic is >= min")
    max: float | None = Field(default=None, description="Pass when the statistic is <= max (e.g. perplexity)")
    top_n: int | None = Field(default=None, ge=1, description="Only the first N rows (after rank_by ordering)")
    rank_by: str | None = Field(default=None, description="Column ranking rows for top_n, highest first (None: table order)")
    min_coverage: float | None = Field(default=None, ge=0, le=1, description="Share of rows that must have a value "
                                       "(column gates); null: the gates section's min_coverage")

    @model_validator(mode="after")
    def _one_source(self) -> Gate:
        if (self.column is None) == (self.metric is None):
            raise ValueError(f"gate {self.name!r}: set exactly one of column or metric")
        if self.min is None and self.max is None:
            raise ValueError(f"gate {self.name!r}: set min or max")
        if self.metric is not None and self.stat != "value":
            raise ValueError(f"gate {self.name!r}: a metric gate uses stat 'value'")
        if self.metric is not None and self.min_coverage is not None:
            raise ValueError(f"gate {self.name!r}: min_coverage applies to column gates (a metric has no rows)")
        return self


def default_gates() -> list[Gate]:
    """The issue's default gates."""
    return [
        Gate(name="plausibility_median", column="plausibility", stat="median", min=3.5),
        Gate(name="falsifiability_median", column="falsifiability", stat="median", min=3.5),
        Gate(name="methodology_share", column="has_methodology", stat="share_true", min=0.70),
        Gate(name="teacher_agreement_top500", column="teacher_agreement", stat="mean", min=3.0, top_n=500),
    ]


class GatesConfig(NexusModel):
    """The gates a model must pass."""

    gates: list[Gate] = Field(default_factory=default_gates, description="Every gate must pass")
    min_coverage: float = Field(default=0.9, ge=0, le=1, description="A column gate fails when fewer than this "
                                "share of its rows has a value (rows the judge could not score count against it)")


class GatesResult(StepResult):
    """The verdict."""

    passed: bool
    failed_gates: list[str] = Field(default_factory=list)
    values: dict[str, float | None] = Field(default_factory=dict)
    coverage: dict[str, float | None] = Field(default_factory=dict, description="Per column gate: rows with a value / rows")


def rubric_problems(cfg: GatesConfig, dimensions: list[str], rubric: str) -> list[str]:
    """Gates reading a project-rubric dimension that ``rubric`` (with ``dimensions``) does not score: with a
    custom rubric the default gates must be replaced by gates naming its own dimensions."""
    from nexus_core.evaluate.rubric import KNOWN_DIMENSIONS

    return [f"gates.gates[{i}] ({g.name}): reads {g.column!r}, which rubric {rubric} does not score "
            f"(its dimensions: {', '.join(dimensions)})"
            for i, g in enumerate(cfg.gates) if g.column in KNOWN_DIMENSIONS and g.column not in dimensions]


def _stat(gate: Gate, judged: pl.DataFrame, metrics: dict[str, float | None],
          where: str) -> tuple[float | None, int, int]:
    """(statistic, rows with a value, rows looked at); a metric counts as one row."""
    if gate.metric is not None:
        if gate.metric not in metrics:
            raise InputError(f"{where}: gate {gate.name!r} needs metric {gate.metric!r} "
                             f"(computed: {', '.join(metrics) or 'none'})")
        return metrics[gate.metric], 1, 1
    for col in filter(None, (gate.column, gate.rank_by)):
        if col not in judged.columns:
            raise InputError(f"{where}: gate {gate.name!r} needs column {col!r} (has: {', '.join(judged.columns)})")
    if gate.rank_by:
        judged = judged.sort(gate.rank_by, descending=True, nulls_last=True, maintain_order=True)
    if gate.top_n:
        judged = judged.head(gate.top_n)
    assert gate.column is not None  # the gate's validator requires it for judged gates
    values = [v for v in judged[gate.column].to_list() if v is not None]
    if not values:
        return None, 0, judged.height
    if gate.stat == "median":
        return float(statistics.median(values)), len(values), judged.height
    if gate.stat == "mean":
        return float(statistics.fmean(values)), len(values), judged.height
    if gate.stat == "share_true":
        return sum(bool(v) for v in values) / len(values), len(values), judged.height
    raise InputError(f"{where}: gate {gate.name!r}: stat 'value' needs a metric, not a column")


# Each gate names its own column or metric; _stat checks them and names the gate.
@step(area="evaluate", inputs={
    "judged": table(description="the judge step's table"),
    "scores": directory(optional=True, description="the score step's output (metrics.json), for metric gates"),
})
def run_gates(cfg: GatesConfig, *, inputs: dict[str, ArtifactRef], out_uri: str, ctx: StepContext) -> GatesResult:
    """Evaluate every gate on ``inputs['judged']`` (and ``inputs['scores']`` for metric gates)."""
    judged = load_table(inputs["judged"])
    metrics: dict[str, float | None] = {}
    if "scores" in inputs:
        metrics = json.loads((inputs["scores"].path / "metrics.json").read_text())["values"]
    where = f"{inputs['judged'].uri}/data.parquet"
    rows = []
    for gate in cfg.gates:
        value, n, looked_at = _stat(gate, judged, metrics, where)
        judged_gate = gate.column is not None
        coverage = n / looked_at if judged_gate and looked_at else (None if judged_gate else 1.0)
        need = (gate.min_coverage if gate.min_coverage is not None else cfg.min_coverage) if judged_gate else None
        in_range = value is not None and (gate.min is None or value >= gate.min) and \
            (gate.max is None or value <= gate.max)
        covered = need is None or (coverage or 0.0) >= need
        detail = None
        if value is None:
            detail = "no usable values"
        elif not covered:
            detail = f"coverage {coverage:.3f} < min_coverage {need}: judged on {n} of {looked_at} rows"
        rows.append({"gate": gate.name, "value": value, "min": gate.min, "max": gate.max, "n": n,
                     "rows": looked_at, "coverage": coverage, "min_coverage": need, "judged": judged_gate,
                     "passed": in_range and covered, "detail": detail})
    passed = all(r["passed"] for r in rows)
    df = pl.DataFrame(rows, schema={"gate": pl.String, "value": pl.Float64, "min": pl.Float64, "max": pl.Float64,
                                    "n": pl.Int64, "rows": pl.Int64, "coverage": pl.Float64,
                                    "min_coverage": pl.Float64, "judged": pl.Boolean, "passed": pl.Boolean,
                                    "detail": pl.String})
    write_parquet(df, Path(out_uri) / "data.parquet")
    atomic_write_json(Path(out_uri) / "gates.json", {"passed": passed, "gates": rows})
    values = {r["gate"]: r["value"] for r in rows}
    return GatesResult(rows=df.height, columns=schema_of(df), passed=passed,
                       failed_gates=[r["gate"] for r in rows if not r["passed"]], values=values,
                       coverage={r["gate"]: r["coverage"] for r in rows if r["judged"]},
                       metrics={"gate_passed": float(passed),
                                **{f"gate.{k}": v for k, v in values.items() if v is not None}})
