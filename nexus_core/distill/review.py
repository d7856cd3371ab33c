"""Review: turn filter verdicts and human labels into one accept/reject decision per row.

``mode: auto`` accepts what passed the filters. ``mode: human`` runs after the flow resumed from
the review gate: the latest label of each row (from the catalog) decides; unlabelled rows fall back
to the filter verdict or are rejected (``unlabeled``). Exports ``labels/<date>.jsonl`` (every
label, the audit trail), ``accepted.jsonl`` and ``rejected.jsonl`` beside ``data.parquet``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import polars as pl
from pydantic import Field

from nexus_core.artifacts import ArtifactRef
from nexus_core.config import NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import step, table
from nexus_core.distill.review_store import all_labels
from nexus_core.io import read_table, schema_of, write_jsonl, write_parquet
from nexus_core.runner import StepResult

REQUIRED = ("row_id", "keep", "reason", "response")


class ReviewSubmission(NexusModel):
    """What the review app sends when it resumes the flow (the gate's typed input)."""

    reviewer: str = Field(description="Who submitted the batch")
    labels_digest: str = Field(description="Digest of the dataset's labels at submit time")
    labels: int = Field(default=0, description="Number of labels at submit time")


class ReviewConfig(NexusModel):
    """Review mode and how to treat unlabelled rows."""

    mode: Literal["auto", "human"] = Field(default="auto", description="auto: accept what passed the filters; human: wait for labels")
    unlabeled: Literal["filter", "reject"] = Field(default="filter", description="Human mode: unlabelled rows follow the filter verdict, or are rejected")
    timeout_s: int = Field(default=86400, ge=1, description="How long the flow waits at the gate (human mode)")
    poll_interval_s: int = Field(default=5, ge=1, description="How often a paused in-process flow checks for resumption")
    recheck_regenerated: bool = Field(default=True, description="Human mode: send the rows regeneration rescued back "
                                      "to the review app (a second gate) before packaging")
    submission: ReviewSubmission | None = Field(default=None, description="Filled by the flow from the gate's input; not set by hand")


class ReviewResult(StepResult):
    """Decision counts."""

    accepted: int = 0
    rejected: int = 0
    edited: int = 0
    human_labels: int = 0


# Human labels come from the catalog, not a file: ``cfg.submission`` (their digest) keys them.
@step(area="distill", inputs={"filtered": table(*REQUIRED)})
def run_review(cfg: ReviewConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
               ctx: StepContext) -> ReviewResult:
    """Decide every row of ``inputs["filtered"]``; write decisions and the label exports."""
    ref = inputs["filtered"]
    df = read_table(ref.path / "data.parquet", columns=REQUIRED)
    labels = all_labels(ref.uri) if cfg.mode == "human" else []
    latest = {lb.row_id: lb for lb in labels}
    label_df = pl.DataFrame(
        {"row_id": list(latest), "label": [lb.decision for lb in latest.values()],
         "edited_output": [lb.edited_output for lb in latest.values()],
         "reviewer": [lb.reviewer for lb in latest.values()], "review_note": [lb.note for lb in latest.values()]},
        schema={"row_id": pl.Utf8, "label": pl.Utf8, "edited_output": pl.Utf8, "reviewer": pl.Utf8,
                "review_note": pl.Utf8})
    out = df.join(label_df, on="row_id", how="left")
    fallback = pl.when(pl.col("keep")).then(pl.lit("accept")).otherwise(pl.lit("reject"))
    if cfg.mode == "human" and cfg.unlabeled == "reject":
        fallback = pl.lit("reject")
    out = out.with_columns(
        decision=pl.when(pl.col("label") == "reject").then(pl.lit("reject"))
        .when(pl.col("label").is_in(["accept", "edit"])).then(pl.lit("accept")).otherwise(fallback),
        decision_source=pl.when(pl.col("label").is_not_null()).then(pl.lit("human"))
        .otherwise(pl.lit("auto" if cfg.mode == "auto" else "filter")),
        reviewed_output=pl.when(pl.col("label") == "edit").then(pl.col("edited_output"))
        .otherwise(pl.col("response")),
    ).with_columns(review_reason=pl.when(pl.col("decision") == "accept").then(pl.lit(None, pl.Utf8))
                   .when(pl.col("label") == "reject").then(pl.lit("reviewer rejected"))
                   .otherwise(pl.col("reason")))
    root = Path(out_uri)
    write_parquet(out, root / "data.parquet")
    cols = ["row_id", "decision", "decision_source", "reviewer", "review_reason", "reviewed_output"]
    write_jsonl(out.filter(pl.col("decision") == "accept").select(cols), root / "accepted.jsonl")
    write_jsonl(out.filter(pl.col("decision") == "reject").select(cols), root / "rejected.jsonl")
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    write_jsonl([lb.model_dump(mode="json") for lb in labels], root / "labels" / f"{date}.jsonl")
    accepted = int((out["decision"] == "accept").sum())
    edited = int((out["label"] == "edit").sum())
    return ReviewResult(rows=out.height, columns=schema_of(out), accepted=accepted,
                        rejected=out.height - accepted, edited=edited, human_labels=len(latest),
                        metrics={"accepted": accepted, "rejected": out.height - accepted, "edited": edited,
                                 "human_labels": len(latest)})
