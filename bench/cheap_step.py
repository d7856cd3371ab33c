"""A cheap step for the orchestration benchmark: adds a column to a small table."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from nexus_core.config import NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import step
from nexus_core.io import write_parquet
from nexus_core.runner import StepResult


class CheapConfig(NexusModel):
    index: int = 0
    rows: int = 1000


class CheapResult(StepResult):
    pass


@step(area="bench")
def run_cheap(cfg: CheapConfig, *, inputs: dict, out_uri: str, ctx: StepContext) -> CheapResult:
    """Build a small table and write it: a few milliseconds of real work."""
    df = pl.DataFrame({"i": range(cfg.rows)}).with_columns((pl.col("i") * cfg.index).alias("x"))
    write_parquet(df, Path(out_uri) / "data.parquet")
    return CheapResult(rows=df.height)
