"""Filters: rule-based quality checks on teacher responses (polars), plus dataset quality gates.

Rules live in a YAML file (``configs/distill/filters.yaml``): minimum length, action verbs, no
hallucinated citations or bracketed references, no broken formatting, falsifiable hypotheses,
methods present, exact and near-duplicate removal. Every row gets ``keep`` and its ``reasons``;
rejected rows stay in the table (they feed review and regeneration).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from pydantic import Field

from nexus_core.artifacts import ArtifactRef
from nexus_core.config import ConfigPath, NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import step, table
from nexus_core.distill.rules import apply_rules, gate_metrics, load_rules
from nexus_core.errors import InputError
from nexus_core.io import read_table, schema_of, write_parquet
from nexus_core.runner import StepResult

REQUIRED = ("row_id", "template_name", "response", "status")


class FiltersConfig(NexusModel):
    """Where the rules are."""

    rules: ConfigPath = Field(default="configs/distill/filters.yaml", validate_default=True, description="Filter rules YAML (its content joins the cache key)")


class FiltersResult(StepResult):
    """Kept/rejected counts, rejections by reason, and the quality gates."""

    kept: int = 0
    rejected: int = 0
    reasons: dict[str, int] = Field(default_factory=dict)
    gates_passed: bool = False


@step(area="distill", inputs={"collected": table(*REQUIRED)}, reads=lambda cfg, inputs: [cfg.rules])
def run_distill_filters(cfg: FiltersConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                        ctx: StepContext) -> FiltersResult:
    """Apply the rules to ``inputs["collected"]``; write every row with keep/reasons to ``data.parquet``."""
    rules, _ = load_rules(cfg.rules)
    df = read_table(inputs["collected"].path / "data.parquet", columns=REQUIRED)
    if df.height == 0:
        raise InputError(f"{inputs['collected'].uri}: no rows to filter")
    # Only answered rows take part in duplicate detection; failed ones are rejected as no_response.
    out = apply_rules(df.with_columns(pl.when(pl.col("status") == "ok").then(pl.col("response"))
                                      .otherwise(None).alias("response")), rules)
    gates = gate_metrics(out, rules)
    passed = all(v == 1.0 for k, v in gates.items() if k.endswith("_pass"))
    for key, value in gates.items():
        if not key.endswith("_pass"):
            ctx.info(f"quality gate {key} = {value:.2f} ({'pass' if gates[key + '_pass'] else 'FAIL'})")
    counts = (out.select(pl.col("reasons").explode().drop_nulls()).to_series().value_counts())
    reasons = {r: int(n) for r, n in counts.iter_rows()} if counts.height else {}
    write_parquet(out, Path(out_uri) / "data.parquet")
    kept = int(out["keep"].sum())
    return FiltersResult(rows=out.height, columns=schema_of(out), kept=kept, rejected=out.height - kept,
                         reasons=reasons, gates_passed=passed,
                         metrics={"kept": kept, "rejected": out.height - kept, **gates,
                                  **{f"rejected_{k}": v for k, v in reasons.items()}})
