"""Metrics: compute the configured metrics (nexus_core.evaluate.metrics registry) on a predictions table.

Refusal metrics (``refusal_rate_harmful``, ``refusal_rate_benign``) read a ``refused`` column: when the
predictions lack it, the refusal classifier (:mod:`nexus_core.evaluate.refusal`, ``refusal`` section) adds
it from each prediction, and the per-prompt records are written to ``refusals.parquet``. Likewise
``remotion_parse_rate`` reads ``remotion_ok``, added by the Remotion checks (:mod:`nexus_core.evaluate.remotion`,
``remotion`` section; records in ``remotion_checks.parquet``, MP4s under ``renders/`` when rendering)."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
from pydantic import Field, field_validator

from nexus_core.artifacts import ArtifactRef, atomic_write_json
from nexus_core.config import NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import step, table
from nexus_core.errors import InputError
from nexus_core.evaluate.metrics import COLUMNS, METRICS, compute
from nexus_core.evaluate.refusal import RefusalConfig, classify
from nexus_core.evaluate.remotion import RemotionConfig, check_predictions
from nexus_core.io import load_table, schema_of, write_parquet
from nexus_core.runner import StepResult


class ScoreConfig(NexusModel):
    """Which metrics to compute."""

    metrics: list[str] = Field(default_factory=lambda: ["exact_match", "perplexity"],
                               description=f"Metric names from nexus_core.evaluate.metrics ({', '.join(sorted(METRICS))})")
    skip_missing: bool = Field(default=False, description="Skip metrics whose columns are absent instead of failing")
    refusal: RefusalConfig = Field(default_factory=RefusalConfig,
                                   description="Refusal classifier used by the refusal_rate_* metrics")
    remotion: RemotionConfig = Field(default_factory=RemotionConfig,
                                     description="TSX parse + structure checks used by remotion_parse_rate")

    @field_validator("metrics")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {', '.join(unknown)} (known: {', '.join(sorted(METRICS))})")
        return names


class ScoreResult(StepResult):
    """Metric values (NaN when undefined, e.g. AUROC with one class) and those skipped."""

    values: dict[str, float | None] = Field(default_factory=dict)
    skipped: dict[str, str] = Field(default_factory=dict)
    refusals_file: str | None = Field(default=None, description="Per-prompt refusal records (refusal metrics only)")
    remotion_file: str | None = Field(default=None, description="Per-prompt Remotion check records "
                                                                "(remotion_parse_rate only)")


# Each metric names the columns it needs (see nexus_core.evaluate.metrics); compute() checks them.
@step(area="evaluate", inputs={"predictions": table(description="the predict step's table")})
def run_score(cfg: ScoreConfig, *, inputs: dict[str, ArtifactRef], out_uri: str, ctx: StepContext) -> ScoreResult:
    """Compute each metric over ``inputs['predictions']``; write data.parquet (name, value, n) and metrics.json."""
    ref = inputs["predictions"]
    preds = load_table(ref)
    where = f"{ref.uri}/data.parquet"
    refusals_file = None
    if any("refused" in COLUMNS[n] for n in cfg.metrics) and "refused" not in preds.columns \
            and not (cfg.skip_missing and "harmful" not in preds.columns):
        preds, records = classify(preds, cfg.refusal, where)
        refusals_file = "refusals.parquet"
        write_parquet(records, Path(out_uri) / refusals_file)
    remotion_file = None
    if any("remotion_ok" in COLUMNS[n] for n in cfg.metrics) and "remotion_ok" not in preds.columns \
            and not (cfg.skip_missing and "prediction" not in preds.columns):
        preds, records = check_predictions(preds, cfg.remotion, where, Path(out_uri))
        remotion_file = "remotion_checks.parquet"
        write_parquet(records, Path(out_uri) / remotion_file)
    values: dict[str, float | None] = {}
    skipped: dict[str, str] = {}
    for name in cfg.metrics:
        try:
            value = compute(name, preds, where)
        except InputError as exc:
            if not cfg.skip_missing:
                raise
            skipped[name] = str(exc)
            continue
        values[name] = None if math.isnan(value) else value
    rows = pl.DataFrame({"metric": list(values), "value": list(values.values()),
                         "n": [preds.height] * len(values)}, schema={"metric": pl.String, "value": pl.Float64,
                                                                     "n": pl.Int64})
    write_parquet(rows, Path(out_uri) / "data.parquet")
    atomic_write_json(Path(out_uri) / "metrics.json", {"values": values, "skipped": skipped, "rows": preds.height,
                                                           "refusals_file": refusals_file,
                                                           "remotion_file": remotion_file})
    return ScoreResult(rows=rows.height, columns=schema_of(rows), values=values, skipped=skipped,
                       refusals_file=refusals_file, remotion_file=remotion_file,
                       metrics={k: v for k, v in values.items() if v is not None})
