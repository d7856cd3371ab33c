"""SFT packaging: the kept rows as ``{"input", "output", "meta"}`` records.

Writes ``data.parquet`` (``meta`` a struct), ``sft.jsonl`` (same records) and a Hugging Face
``datasets`` dataset under ``hf/`` (``load_from_disk``). Training accepts any table with
``input``/``output``.

When the teacher was asked for logprobs (``teacher.top_logprobs``), each record also keeps
``logprobs_json``: the teacher's per-token top-k for exactly that ``output`` (null where a reviewer
edited it), so a ``kd`` stage with ``source: logprobs`` trains on the reviewed rows.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from pydantic import Field

from nexus_core.artifacts import ArtifactRef
from nexus_core.config import NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import step, table
from nexus_core.errors import InputError
from nexus_core.io import read_table, schema_of, write_jsonl, write_parquet
from nexus_core.runner import StepResult

REQUIRED = ("row_id", "domain", "template_name", "template_hash", "user_prompt", "final_output", "final_keep",
            "origin", "decision_source")
RECHECK_REQUIRED = ("row_id", "decision", "decision_source", "reviewed_output")


class PackageConfig(NexusModel):
    """What goes into the SFT dataset."""

    include_system_prompt: bool = Field(default=False, description="Prefix input with the system prompt")
    min_rows: int = Field(default=1, ge=0, description="Fail if fewer rows survive (an empty SFT set is a bug upstream)")


class PackageResult(StepResult):
    """Rows per template and domain."""

    per_template: dict[str, int] = Field(default_factory=dict)
    per_domain: dict[str, int] = Field(default_factory=dict)


def _apply_recheck(df: pl.DataFrame, path: Path) -> pl.DataFrame:
    """Apply the second review of regenerated rows: a reject drops the row, an edit replaces its output."""
    second = read_table(path, columns=RECHECK_REQUIRED).select(
        "row_id", re_decision="decision", re_source="decision_source", re_output="reviewed_output")
    joined = df.join(second, on="row_id", how="left")
    labelled = pl.col("re_source") == "human"
    if "final_logprobs_json" in joined.columns:  # an edited answer is no longer the teacher's
        joined = joined.with_columns(final_logprobs_json=pl.when(
            labelled & (pl.col("re_output") != pl.col("final_output"))).then(pl.lit(None, pl.Utf8))
            .otherwise(pl.col("final_logprobs_json")))
    return joined.with_columns(
        final_keep=pl.col("final_keep") & (pl.col("re_decision").fill_null("accept") == "accept"),
        final_output=pl.when(labelled).then(pl.col("re_output")).otherwise(pl.col("final_output")),
        decision_source=pl.when(labelled).then(pl.lit("human")).otherwise(pl.col("decision_source")),
    ).drop("re_decision", "re_source", "re_output")


@step(area="distill", inputs={
    "regenerated": table(*REQUIRED),
    "rereviewed": table(*RECHECK_REQUIRED, optional=True, description="The second review of regenerated rows"),
})
def run_sft_package(cfg: PackageConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                    ctx: StepContext) -> PackageResult:
    """Package the kept rows of ``inputs["regenerated"]`` (after ``inputs["rereviewed"]``, when given)."""
    src = inputs["regenerated"].path / "data.parquet"
    df = read_table(src, columns=REQUIRED)
    if "final_logprobs_json" in df.columns and df["final_logprobs_json"].null_count() == df.height:
        df = df.drop("final_logprobs_json")  # no logprobs asked for: the dataset keeps its plain layout
    if "rereviewed" in inputs:
        df = _apply_recheck(df, inputs["rereviewed"].path / "data.parquet")
    df = df.filter(pl.col("final_keep") & pl.col("final_output").is_not_null())
    if df.height < cfg.min_rows:
        raise InputError(f"{src}: only {df.height} kept row(s), need at least {cfg.min_rows}")
    model = pl.col("model") if "model" in df.columns else pl.lit(None, pl.Utf8)
    inp = pl.col("user_prompt")
    if cfg.include_system_prompt:
        inp = pl.concat_str([pl.col("system_prompt"), pl.lit("\n\n"), pl.col("user_prompt")])
    quality = (pl.when(pl.col("decision_source") == "human").then(pl.lit("human_reviewed"))
               .when(pl.col("origin") == "regenerated").then(pl.lit("regenerated"))
               .otherwise(pl.lit("filter_passed")))
    out = df.select(
        input=inp, output=pl.col("final_output"),
        meta=pl.struct(row_id=pl.col("row_id"), domain=pl.col("domain"), quality=quality,
                       template_name=pl.col("template_name"), template_hash=pl.col("template_hash"),
                       teacher=model, origin=pl.col("origin"), review=pl.col("decision_source"),
                       attempts=pl.col("attempts") if "attempts" in df.columns else pl.lit(0)),
    )
    if "final_logprobs_json" in df.columns:
        out = out.with_columns(logprobs_json=df["final_logprobs_json"])
    root = Path(out_uri)
    write_parquet(out, root / "data.parquet")
    write_jsonl(out, root / "sft.jsonl")
    from datasets import Dataset

    Dataset.from_list(out.to_dicts()).save_to_disk(str(root / "hf"))
    per_template = dict(out.group_by(pl.col("meta").struct.field("template_name")).len().iter_rows())
    per_domain = dict(out.group_by(pl.col("meta").struct.field("domain")).len().iter_rows())
    with_lp = {"rows_with_logprobs": out.height - out["logprobs_json"].null_count()} if "logprobs_json" in out.columns else {}
    return PackageResult(rows=out.height, columns=schema_of(out), per_template=per_template,
                         per_domain=per_domain, metrics={"rows": out.height, **with_lp})
