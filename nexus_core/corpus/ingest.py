"""Ingest raw tables (JSONL, JSONL.gz/.zst, Parquet) into one versioned dataset with a manifest."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from pydantic import Field

from nexus_core.artifacts import ArtifactRef
from nexus_core.config import ConfigPath, NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import step
from nexus_core.errors import InputError
from nexus_core.io import read_table, schema_of, write_parquet
from nexus_core.runner import StepResult


class IngestConfig(NexusModel):
    """Which raw files to read and what they must contain."""

    sources: list[ConfigPath] = Field(description="Raw files (JSONL, JSONL.gz/.zst or Parquet), relative to the repo")
    required_columns: list[str] = Field(default_factory=lambda: ["text"],
                                        description="Columns every source must have")
    dedupe_on: str | None = Field(default="text", description="Drop exact duplicate rows on this column; null keeps all")


class IngestResult(StepResult):
    """Rows read per source file and rows kept."""

    rows_per_source: dict[str, int] = Field(default_factory=dict)
    duplicates_dropped: int = 0


# Sources are named by the caller (source_0, source_1, ...): the step checks them itself.
@step(area="corpus")
def run_ingest(cfg: IngestConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
               ctx: StepContext) -> IngestResult:
    """Read each source named in ``inputs``, check columns, add ``source_file``, write data.parquet."""
    if not inputs:
        raise InputError("ingest: no source files given")
    frames, per_source = [], {}
    for ref in inputs.values():
        df = read_table(ref.path, columns=cfg.required_columns)
        if df.height == 0:
            raise InputError(f"{ref.uri}: no rows")
        per_source[ref.path.name] = df.height
        frames.append(df.with_columns(pl.lit(ref.path.name).alias("source_file")))
    data = pl.concat(frames, how="diagonal_relaxed")
    before = data.height
    if cfg.dedupe_on:
        data = data.unique(subset=[cfg.dedupe_on], keep="first", maintain_order=True)
    write_parquet(data, Path(out_uri) / "data.parquet")
    return IngestResult(rows=data.height, columns=schema_of(data), rows_per_source=per_source,
                        duplicates_dropped=before - data.height,
                        metrics={"rows_in": before, "rows_out": data.height})
