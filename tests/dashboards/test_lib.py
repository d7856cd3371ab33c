"""Read helpers on their own: row history through regeneration rounds, reason histograms."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
from pydantic import Field

from dashboards import lib
from nexus_core.artifacts import ArtifactRef
from nexus_core.config import NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import step
from nexus_core.io import schema_of, write_parquet
from nexus_core.runner import StepResult, run_step


class TableConfig(NexusModel):
    """Rows to publish."""

    rows: list[dict] = Field(description="Table rows")


@step(area="lib")
def run_table(cfg: TableConfig, *, inputs: dict[str, ArtifactRef], out_uri: str, ctx: StepContext) -> StepResult:
    """Publish ``cfg.rows`` as data.parquet (stands in for the regenerate step's output shape)."""
    df = pl.DataFrame(cfg.rows)
    write_parquet(df, Path(out_uri) / "data.parquet")
    return StepResult(rows=df.height, columns=schema_of(df))


def test_row_history_lists_every_regeneration_round(data_root):
    history = [{"round": 1, "response": "Too short.", "keep": False, "reasons": "too_short"},
               {"round": 2, "response": "We measure and compare ...", "keep": True, "reasons": ""}]
    rows = [{"row_id": "x1", "final_output": "We measure and compare ...", "final_keep": True, "final_reasons": "",
             "history_json": json.dumps(history)},
            {"row_id": "x2", "final_output": "No.", "final_keep": False, "final_reasons": "too_short; citation",
             "history_json": "[]"}]
    ref = run_step(run_table, TableConfig(rows=rows), name="regenerated").ref
    hist = lib.row_history("x1")
    assert hist["round"].to_list() == [None, 1, 2]
    assert hist["verdict"].to_list() == ["keep", "reject", "keep"]
    assert hist["reason"][1] == "too_short" and hist["artifact"][0] == "regenerated@v1"
    reasons = lib.reason_histogram(ref.uri)
    assert dict(reasons.iter_rows()) == {"too_short": 1, "citation": 1}
    assert lib.row_history("nope").is_empty()
