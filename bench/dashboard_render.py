"""Dashboard render time: each page through Streamlit's AppTest, on a big store vs an empty one.

    python -m bench.dashboard_render [--rows 100000] [--runs 200] [--repeat 3]

The big store: a filtered dataset of ``--rows`` rows with a human label on every row (the review
page's worst case), a model trained from it, ``--runs`` MLflow training runs with 50-step loss /
learning-rate / tokens-per-second curves, 2,000 cost-ledger entries under 20 flow runs and 50
evaluation reports. Every page is rendered once to warm imports, then ``--repeat`` times with the
Streamlit data cache cleared before each run (so the figures are real reads, not cache hits), as a
rerun of the same AppTest (what a user's refresh costs); the
median is printed beside the empty-store baseline. The target is < 2 s per page.

The review-queue page is left out: it asks the Prefect API, which this bench does not start.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pydantic import Field

from nexus_core.artifacts import ArtifactRef, atomic_write_json
from nexus_core.config import NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import step
from nexus_core.runner import StepResult

PAGES = ["data.py", "training.py", "leaderboard.py", "costs.py", "lineage.py"]
REPO = Path(__file__).resolve().parent.parent


def _use_store(root: Path) -> None:
    os.environ["NEXUS_HOME"] = str(root / "home")
    os.environ["NEXUS_DATA"] = str(root / "data")
    os.environ["NEXUS_CATALOG_URL"] = f"sqlite:///{root / 'home' / 'catalog.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'home' / 'mlflow.db'}"


# ---------------------------------------------------------------- stand-in steps (through the real runner)


class TableConfig(NexusModel):
    """Size of the bench table."""

    rows: int = Field(description="Rows to write")


class ReportConfig(NexusModel):
    """One evaluation report."""

    report: dict = Field(description="eval_report JSON, shaped like the evaluate flow's")


class ReportResult(StepResult):
    """Where the report file is (what records.record_report reads)."""

    report_file: str = "eval_report_bench.json"


@step(area="bench")
def run_bench_table(cfg: TableConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                    ctx: StepContext) -> StepResult:
    """Write the bench's filtered table: ``cfg.rows`` rows with keep / reasons like the filters step."""
    import polars as pl

    from nexus_core.io import schema_of, write_parquet

    rng = random.Random(0)
    reasons = ["too_short", "no_action_verb", "citation", "broken_format", "not_falsifiable", "duplicate"]
    n = cfg.rows
    picked = [[] if rng.random() < 0.7 else rng.sample(reasons, rng.randint(1, 2)) for _ in range(n)]
    df = pl.DataFrame({
        "row_id": [f"r{i:06d}" for i in range(n)],
        "template_name": [rng.choice(["hypothesis", "methodology"]) for _ in range(n)],
        "input": [f"Question {i} about soil respiration and drought cycles?" for i in range(n)],
        "response": [f"We measure and compare respiration in plot {i}; if rewetting drives it then ..." for i in range(n)],
        "status": ["ok"] * n, "keep": [not p for p in picked],
        "reasons": pl.Series(picked, dtype=pl.List(pl.Utf8)),
    })
    write_parquet(df, Path(out_uri) / "data.parquet")
    return StepResult(rows=n, columns=schema_of(df))


@step(area="bench", kind="model")
def run_bench_model(cfg: TableConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                    ctx: StepContext) -> StepResult:
    """A model-kind artifact 'trained' from the table (only its lineage matters here)."""
    atomic_write_json(Path(out_uri) / "config.json", {"model_type": "llama", "bench": True})
    return StepResult()


@step(area="bench", kind="report")
def run_bench_report(cfg: ReportConfig, *, inputs: dict[str, ArtifactRef], out_uri: str, ctx: StepContext) -> ReportResult:
    """An evaluation report JSON like the evaluate flow's."""
    atomic_write_json(Path(out_uri) / "eval_report_bench.json", cfg.report)
    return ReportResult(rows=1)


def fill(rows: int, runs: int) -> None:
    """Fill the current store (see module docstring)."""
    from sqlalchemy import insert

    from nexus_core import catalog, lineage
    from nexus_core.catalog import CostRow, ReviewLabelRow
    from nexus_core.evaluate import records
    from nexus_core.runner import run_step

    table = run_step(run_bench_table, TableConfig(rows=rows), name="bench_filtered")
    model = run_step(run_bench_model, TableConfig(rows=0), name="bench_model",
                     inputs={"data": table.ref})
    rng = random.Random(1)
    with catalog.engine().begin() as conn:
        conn.execute(insert(ReviewLabelRow), [
            {"dataset_uri": table.ref.uri, "row_id": f"r{i:06d}", "reviewer": rng.choice(["ana", "bo", "cy"]),
             "decision": rng.choice(["accept", "accept", "reject", "edit"]), "created_at": catalog._now()}
            for i in range(rows)])
        conn.execute(insert(CostRow), [
            {"flow_name": rng.choice(["distill", "llm_train", "evaluate"]), "flow_run_id": f"fr{i % 20}",
             "step": f"nexus_core.steps.x.run_{rng.choice(['collect', 'sft', 'judge'])}",
             "provider": rng.choice(["openai", "lambda", "runpod"]), "kind": rng.choice(["api", "gpu"]),
             "tokens_in": rng.randint(0, 5000), "tokens_out": rng.randint(0, 2000),
             "gpu_seconds": rng.random() * 600, "usd": rng.random() / 10, "created_at": catalog._now()}
            for i in range(2000)])

    from mlflow.entities import Metric, Param, RunTag

    client = lineage.client()
    exp = lineage.experiment_id("llm_train")
    now = int(time.time() * 1000)
    for r in range(runs):
        run = client.create_run(exp, tags={"nexus.kind": "step", "mlflow.runName": "run_sft",
                                           "nexus.artifact": f"bench_sft_{r}@v1"})
        ms = []
        for i in range(50):
            ms += [Metric("train/loss", 5.0 * 0.97 ** i + rng.random() * 0.1, now, i),
                   Metric("train/learning_rate", 2e-4 * (1 - i / 50), now, i),
                   Metric("train/tokens_per_s", 900 + rng.random() * 200, now, i)]
        ms += [Metric("final_loss", 1.2, now, 0), Metric("global_step", 50, now, 0),
               Metric("tokens_per_s", 1000.0, now, 0)]
        for i in range(0, len(ms), 1000):
            client.log_batch(run.info.run_id, metrics=ms[i:i + 1000],
                             params=[Param("learning_rate", "0.0002")] if i == 0 else [],
                             tags=[RunTag("nexus.step", "nexus_core.train.sft.run_sft")] if i == 0 else [])
        client.set_terminated(run.info.run_id)

    for e in range(50):
        report = {"run_id": f"bench-{e}", "model": {"name": model.ref.name, "uri": model.ref.uri, "digest": "d"},
                  "dataset": {"name": "holdout", "digest": "x"}, "metrics": {"rougeL": rng.random()},
                  "judge": {"kind": "heuristic", "name": "rules", "dimensions": {
                      d: {"median": rng.randint(1, 5)} for d in ("rigor", "clarity", "novelty")}},
                  "gates": [{"name": "rougeL_min", "passed": e % 2 == 0}], "gate_passed": e % 2 == 0,
                  "score": rng.random() * 5}
        rep = run_step(run_bench_report, ReportConfig(report=report), name="bench_report",
                       kind="report", inputs={"model": model.ref})
        records.record_report(rep.ref)


def render_times(repeat: int) -> dict[str, float]:
    """Median AppTest run time per page (data cache cleared before each run)."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    out = {}
    for page in PAGES:
        # One AppTest per page, run once to warm imports: its first run also scans every installed
        # package for Streamlit components (~1-3 s here), a test-harness cost a served app pays once.
        at = AppTest.from_file(str(REPO / "dashboards" / "views" / page), default_timeout=300)
        at.run()
        times = []
        for _ in range(repeat):
            st.cache_data.clear()
            t0 = time.perf_counter()
            at.run()
            times.append(time.perf_counter() - t0)
            if at.exception:
                raise RuntimeError(f"{page}: {at.exception[0].value}")
        out[page] = statistics.median(times)
    return out


def main(argv: list[str] | None = None) -> int:
    """Fill a big store, time every page on it and on an empty store, print both and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="reviewed rows")
    parser.add_argument("--runs", type=int, default=200, help="MLflow training runs")
    parser.add_argument("--repeat", type=int, default=3, help="timed renders per page")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="nexus-bench-dash-"))
    os.environ.setdefault("STREAMLIT_BROWSER_GATHER_USAGE_STATS", "false")
    _use_store(tmp / "empty")
    from nexus_core.settings import configure_environment

    configure_environment()
    baseline = render_times(args.repeat)

    _use_store(tmp / "big")
    t0 = time.perf_counter()
    fill(args.rows, args.runs)
    print(f"filled store: {args.rows:,} reviewed rows, {args.runs} MLflow runs in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    big = render_times(args.repeat)

    print(f"{'page':<16}{'empty store (s)':>16}{'big store (s)':>15}{'ratio':>8}  target < 2 s")
    for page in PAGES:
        ratio = big[page] / baseline[page] if baseline[page] else float("nan")
        verdict = "ok" if big[page] < 2.0 else "SLOW"
        print(f"{page:<16}{baseline[page]:>16.3f}{big[page]:>15.3f}{ratio:>7.1f}x  {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
