"""Feedback loop: samples the model failed become teacher inputs for the next distillation run.

Writes ``teacher_inputs.jsonl`` (and ``data.parquet``) with the raw-corpus columns the distillation
teacher-inputs step reads — ``title``, ``abstract``, ``domain``, ``text`` — plus ``source_row_id`` and
``fail_reason`` for provenance. Title/abstract/domain come from the validation row's own columns or its
``meta`` when present, else from the prompt text.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
from pydantic import Field

from nexus_core.artifacts import ArtifactRef
from nexus_core.config import NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import step, table
from nexus_core.evaluate.rubric import judged_dimensions
from nexus_core.io import load_table, schema_of, write_jsonl, write_parquet
from nexus_core.runner import StepResult


class FeedbackConfig(NexusModel):
    """What counts as a failed sample."""

    below: float = Field(default=3.0, description="A sample fails when any rubric score is below this")
    require_methodology: bool = Field(default=True, description="A sample without a methodology block fails too")
    include_unjudged: bool = Field(default=False, description="Also feed back rows the judge could not score")
    max_records: int | None = Field(default=None, ge=1, description="Keep at most N failed samples (lowest scores first)")
    default_domain: str = Field(default="unknown", description="Domain when the row carries none")


class FeedbackResult(StepResult):
    """How many samples were fed back."""

    failed_samples: int
    file: str = "teacher_inputs.jsonl"


def _meta(value: object) -> dict:
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value.startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return {}
    return {}


def _title_from(text: str) -> str:
    first = re.split(r"(?<=[.?!])\s|\n", text.strip(), maxsplit=1)[0]
    words = first.split()
    return " ".join(words[:12]).rstrip(".:") + ("…" if len(words) > 12 else "")


@step(area="evaluate", inputs={"judged": table("row_id", "input", "status")})
def run_feedback(cfg: FeedbackConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                 ctx: StepContext) -> FeedbackResult:
    """Select failed rows of ``inputs['judged']`` and write them as teacher-input records."""
    judged = load_table(inputs["judged"])
    dims = judged_dimensions(inputs["judged"], judged.columns)
    records = []
    for row in judged.iter_rows(named=True):
        scores = [row[d] for d in dims if row[d] is not None]
        reasons = []
        if row["status"] != "ok":
            if not cfg.include_unjudged:
                continue
            reasons.append(f"judge {row['status']}: {row.get('reason')}")
        reasons += [f"{d}={row[d]}" for d in dims if row[d] is not None and row[d] < cfg.below]
        if cfg.require_methodology and row.get("has_methodology") is False:
            reasons.append(f"methodology block has {row.get('steps_count')} ordered steps")
        if not reasons:
            continue
        meta = _meta(row.get("meta"))
        text = str(row["input"])
        title = row.get("title") or meta.get("title") or _title_from(text)
        abstract = row.get("abstract") or meta.get("abstract") or text
        domain = row.get("domain") or meta.get("domain") or cfg.default_domain
        records.append({"title": title, "abstract": abstract, "domain": domain, "text": f"{title}. {abstract}",
                        "source_row_id": row["row_id"], "fail_reason": "; ".join(reasons),
                        "_score": sum(scores) / len(scores) if scores else -1.0})
    records.sort(key=lambda r: r["_score"])
    if cfg.max_records:
        records = records[:cfg.max_records]
    for r in records:
        r.pop("_score")
    out = Path(out_uri)
    schema = {k: pl.String for k in ("title", "abstract", "domain", "text", "source_row_id", "fail_reason")}
    df = pl.DataFrame(records, schema=schema)
    write_parquet(df, out / "data.parquet")
    write_jsonl(records, out / "teacher_inputs.jsonl")
    return FeedbackResult(rows=df.height, columns=schema_of(df), failed_samples=df.height,
                          metrics={"failed_samples": df.height, "failed_share": df.height / max(1, judged.height)})
