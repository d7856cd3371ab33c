"""Recheck queue: the rows regeneration rescued, shaped for a second human review.

A regenerated answer passed the filters but no person has read it. In human review mode the flow
sends these rows back to the review app (a second gate) before packaging; ``sft_package`` then
applies that pass's decisions. Each row shows its final answer, the filter verdict and the
history of attempts, in the same columns the first review used.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from nexus_core.artifacts import ArtifactRef
from nexus_core.config import NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import step, table
from nexus_core.io import read_table, schema_of, write_parquet
from nexus_core.runner import StepResult

REQUIRED = ("row_id", "domain", "template_name", "system_prompt", "user_prompt", "final_output", "final_keep",
            "origin", "attempts", "history_json")


class RecheckConfig(NexusModel):
    """No settings: the queue is every row that regeneration rescued."""


@step(area="distill", inputs={"regenerated": table(*REQUIRED)})
def run_recheck_queue(cfg: RecheckConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                      ctx: StepContext) -> StepResult:
    """Write the rescued rows of ``inputs["regenerated"]`` with the review columns (response, keep, reason)."""
    df = read_table(inputs["regenerated"].path / "data.parquet", columns=REQUIRED)
    out = df.filter(pl.col("origin") == "regenerated").select(
        "row_id", "domain", "template_name", "system_prompt", "user_prompt",
        response=pl.col("final_output"), keep=pl.col("final_keep"),
        reason=pl.format("regenerated in {} attempt(s); passed the filters", pl.col("attempts")),
        attempts="attempts", history_json="history_json")
    write_parquet(out, Path(out_uri) / "data.parquet")
    return StepResult(rows=out.height, columns=schema_of(out), metrics={"queued": out.height})
