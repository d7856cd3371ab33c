"""Script check: the strict two-speaker parse as a filter over teacher rows (rows are data, not exceptions).

Runs twice in the podcast flow. After the rule filters (``stage: filtered``) it ANDs the parse into
``keep`` and appends its reason to ``reasons``/``reason``, so an unusable script is a rejected row that
review sees and regeneration retries. After regeneration (``stage: final``) it does the same to
``final_keep``/``final_reasons``, since regeneration re-checks only the rule filters. Every row is
kept in the output with ``script_ok``, ``script_reason``, ``script_detail``, ``script_turns`` and
``script_json`` (the parsed turns), which the speech step and the SFT package read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import polars as pl
from pydantic import Field

from nexus_core.artifacts import ArtifactRef
from nexus_core.config import NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import step, table
from nexus_core.errors import InputError
from nexus_core.io import read_table, schema_of, write_parquet
from nexus_core.podcast.script import ScriptRules, parse_script, render_script
from nexus_core.runner import StepResult

FILTERED = ("row_id", "response", "keep", "reasons", "reason")
FINAL = ("row_id", "final_output", "final_keep", "final_reasons")


class ScriptCheckConfig(NexusModel):
    """Which columns to check and the script rules."""

    stage: Literal["filtered", "final"] = Field(default="filtered", description="filtered: check `response`, update "
                                                "keep/reasons/reason; final: check `final_output`, update "
                                                "final_keep/final_reasons")
    rules: ScriptRules = Field(default_factory=ScriptRules, description="What a usable script is")


class ScriptCheckResult(StepResult):
    """How many scripts parse, and why the others do not."""

    usable: int = 0
    kept: int = 0
    reasons: dict[str, int] = Field(default_factory=dict)


@step(area="podcast", inputs={"rows": table(one_of=[FILTERED, FINAL])})
def run_script_check(cfg: ScriptCheckConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                     ctx: StepContext) -> ScriptCheckResult:
    """Parse every row's script; write the rows with the verdict folded into their keep columns."""
    src = inputs["rows"].path / "data.parquet"
    final = cfg.stage == "final"
    df = read_table(src, columns=FINAL if final else FILTERED)
    if df.height == 0:
        raise InputError(f"{src}: no rows to check")
    text_col, keep_col = ("final_output", "final_keep") if final else ("response", "keep")
    parsed = [parse_script(t, cfg.rules) for t in df[text_col].to_list()]
    ok = pl.Series([p.ok for p in parsed], dtype=pl.Boolean)
    reason = pl.Series([p.reason for p in parsed], dtype=pl.Utf8)
    out = df.with_columns(
        script_ok=ok, script_reason=reason,
        script_detail=pl.Series([p.detail for p in parsed], dtype=pl.Utf8),
        script_turns=pl.Series([len(p.turns) for p in parsed], dtype=pl.Int64),
        script_json=pl.Series([json.dumps([{"speaker": t.speaker, "text": t.text} for t in p.turns]) if p.ok
                               else None for p in parsed], dtype=pl.Utf8),
        # the normalised text (speaker names in the config's spelling, no markdown) is what gets trained on
        script_text=pl.Series([render_script(p.turns) if p.ok else None for p in parsed], dtype=pl.Utf8),
    )
    answered = pl.col(text_col).is_not_null()  # a missing answer already carries its reason (no_response)
    bad = ~pl.col("script_ok") & answered
    if final:
        out = out.with_columns(
            final_keep=pl.col("final_keep") & pl.col("script_ok"),
            final_output=pl.when(pl.col("script_ok")).then(pl.col("script_text")).otherwise(pl.col("final_output")),
            final_reasons=pl.when(bad & pl.col("final_keep")).then(pl.col("script_reason"))
            .when(bad).then(pl.concat_str([pl.col("final_reasons"), pl.lit("; "), pl.col("script_reason")],
                                          ignore_nulls=True))
            .otherwise(pl.col("final_reasons")))
    else:
        out = out.with_columns(
            keep=pl.col("keep") & pl.col("script_ok"),
            reasons=pl.when(bad).then(pl.col("reasons").list.concat(pl.concat_list(pl.col("script_reason"))))
            .otherwise(pl.col("reasons")))
        out = out.with_columns(reason=pl.col("reasons").list.join("; "))
    write_parquet(out, Path(out_uri) / "data.parquet")
    counts = out.filter(~pl.col("script_ok")).group_by("script_reason").len().iter_rows()
    reasons = {str(r): int(n) for r, n in counts}
    usable, kept = int(ok.sum()), int(out[keep_col].sum())
    for r, n in sorted(reasons.items()):
        ctx.info(f"{n} script(s) rejected: {r}")
    return ScriptCheckResult(rows=out.height, columns=schema_of(out), usable=usable, kept=kept, reasons=reasons,
                             metrics={"usable": usable, "kept": kept, "rejected": out.height - kept,
                                      **{f"script_{k}": v for k, v in reasons.items()}})
