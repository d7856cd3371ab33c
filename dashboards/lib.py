"""Read helpers behind the dashboard pages: plain functions over nexus_core and the Prefect client.

No Streamlit here, so the helpers are testable and benchmarkable on their own; the pages wrap them
in ``st.cache_data`` keyed by :func:`store_key` (so switching stores never serves stale figures).
Everything is read-only. Heavy imports (mlflow, prefect) happen inside the functions that need them.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import polars as pl

from nexus_core.settings import configure_environment

# Prefect and MLflow read their homes from the environment at import: set the project defaults first.
configure_environment()

REVIEW_STATES = ("Suspended", "Paused")
TRAIN_PREFIX = "train/"
# Column names that carry a filter / review verdict's reason, in the order we prefer them.
REASON_COLUMNS = ("reasons", "final_reasons", "review_reason", "reason")


def store_key() -> tuple[str, str, str]:
    """Where the dashboard reads from (data root, catalog URL, MLflow URI): the cache key of every page."""
    from nexus_core.settings import catalog_url, data_root, mlflow_uri

    return str(data_root()), catalog_url(), mlflow_uri()


# ---------------------------------------------------------------- data


def datasets() -> pl.DataFrame:
    """Every artifact name with its versions (area, name, kind, versions, latest rows and uri)."""
    from nexus_core.io import DataQuery

    infos = DataQuery().list()
    return pl.DataFrame(
        [{"area": i.area, "name": i.name, "kind": i.kind, "versions": len(i.versions),
          "latest": f"v{i.versions[-1]}", "rows": i.rows, "uri": i.latest_uri} for i in infos],
        schema={"area": pl.Utf8, "name": pl.Utf8, "kind": pl.Utf8, "versions": pl.Int64, "latest": pl.Utf8,
                "rows": pl.Int64, "uri": pl.Utf8},
    )


def versions(area: str, name: str) -> pl.DataFrame:
    """Versions of one artifact with their manifests' headline facts, newest first."""
    from nexus_core.io import DataQuery

    rows = []
    for m in DataQuery().manifests():
        if Path(m.uri).parent.name == area and m.name == name:
            rows.append({"version": m.version, "rows": m.rows, "bytes": m.bytes, "step": m.step.rsplit(".", 1)[-1],
                         "config_hash": m.config_hash, "digest": m.digest[:12], "finished_at": m.finished_at,
                         "uri": m.uri})
    rows.sort(key=lambda r: -r["version"])
    return pl.DataFrame(rows) if rows else pl.DataFrame()


def main_table(uri: str) -> Path | None:
    """The artifact's main table file (``data.parquet``), or None when it has none (a model, a report)."""
    from nexus_core.store import local_path

    path = local_path(uri) / "data.parquet"
    return path if path.is_file() else None


def schema(uri: str) -> pl.DataFrame:
    """Column names and types of an artifact's main table (read from the Parquet footer only)."""
    path = main_table(uri)
    if path is None:
        return pl.DataFrame()
    cols = pl.read_parquet_schema(path)
    return pl.DataFrame({"column": list(cols), "type": [str(t) for t in cols.values()]})


def sample(uri: str, n: int = 50) -> pl.DataFrame:
    """The first ``n`` rows of an artifact's main table, nested columns rendered as JSON text."""
    path = main_table(uri)
    if path is None:
        return pl.DataFrame()
    df = pl.scan_parquet(path).head(n).collect()
    nested = [c for c, t in df.schema.items() if isinstance(t, pl.List | pl.Struct | pl.Array)]
    if nested:
        # Streamlit's grid shows nested values poorly; JSON text is what people copy anyway.
        df = df.with_columns([pl.col(c).map_elements(lambda v: json.dumps(v.to_list() if isinstance(v, pl.Series)
                                                                           else v, default=str),
                                                     return_dtype=pl.Utf8) for c in nested])
    return df


def reason_histogram(uri: str) -> pl.DataFrame:
    """Rejections by reason (columns ``reason``, ``rows``) from the first reason-like column of the table."""
    path = main_table(uri)
    if path is None:
        return pl.DataFrame()
    cols = pl.read_parquet_schema(path)
    col = next((c for c in REASON_COLUMNS if c in cols), None)
    if col is None:
        return pl.DataFrame()
    lf = pl.scan_parquet(path).select(pl.col(col).alias("reason"))
    if isinstance(cols[col], pl.List):
        lf = lf.explode("reason")
    else:
        # A string column may hold several reasons joined by ';' or ','.
        lf = lf.with_columns(pl.col("reason").str.split(";")).explode("reason") \
               .with_columns(pl.col("reason").str.strip_chars())
    out = (lf.filter(pl.col("reason").is_not_null() & (pl.col("reason") != ""))
             .group_by("reason").agg(pl.len().alias("rows")).sort("rows", descending=True).collect())
    return out


def row_history(row_id: str) -> pl.DataFrame:
    """One row across every artifact version that holds it (collection, filters, review, regeneration
    rounds), oldest first, with each regeneration attempt and each human label as its own line."""
    from nexus_core.io import DataQuery

    lines: list[dict[str, Any]] = []
    manifests = sorted(DataQuery().manifests(), key=lambda m: m.finished_at)
    for m in manifests:
        path = main_table(m.uri)
        if path is None or "row_id" not in pl.read_parquet_schema(path):
            continue
        hit = pl.scan_parquet(path).filter(pl.col("row_id") == row_id).head(1).collect()
        if hit.height == 0:
            continue
        row = hit.row(0, named=True)
        base = {"artifact": f"{m.name}@v{m.version}", "step": m.step.rsplit(".", 1)[-1], "at": m.finished_at}
        verdict = next((row[c] for c in ("final_keep", "keep", "decision", "status") if c in row), None)
        if isinstance(verdict, bool):
            verdict = "keep" if verdict else "reject"
        reason = next((row[c] for c in REASON_COLUMNS if c in row and row[c]), None)
        text = next((row[c] for c in ("final_output", "reviewed_output", "response", "output") if c in row), None)
        lines.append({**base, "round": None, "verdict": _text(verdict), "reason": _text(reason),
                      "text": _text(text)})
        for attempt in json.loads(row.get("history_json") or "[]"):
            lines.append({**base, "round": attempt.get("round"), "verdict": "keep" if attempt.get("keep") else "reject",
                          "reason": _text(attempt.get("reasons")), "text": _text(attempt.get("response"))})
        for label in _labels_of_row(m.uri, row_id):
            lines.append({**base, "step": f"label by {label.reviewer}", "at": label.created_at.isoformat(),
                      "round": None, "verdict": label.decision, "reason": _text(label.note),
                      "text": _text(label.edited_output)})
    schema_ = {"artifact": pl.Utf8, "step": pl.Utf8, "at": pl.Utf8, "round": pl.Int64, "verdict": pl.Utf8,
               "reason": pl.Utf8, "text": pl.Utf8}
    return pl.DataFrame(lines, schema=schema_)


def _labels_of_row(dataset_uri: str, row_id: str) -> list:
    """Labels of one row, oldest first (filtered in SQL: a dataset may carry 100k labels)."""
    from sqlmodel import Session, select

    from nexus_core import catalog
    from nexus_core.catalog import ReviewLabelRow

    with Session(catalog.engine()) as session:
        query = select(ReviewLabelRow).where(ReviewLabelRow.dataset_uri == dataset_uri,
                                             ReviewLabelRow.row_id == row_id)
        return list(session.exec(query.order_by(ReviewLabelRow.id)))


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, list | tuple | pl.Series):
        return "; ".join(str(v) for v in value)
    return str(value)


def label_counts() -> pl.DataFrame:
    """Review labels per dataset and decision (one SQL aggregate, not one object per label)."""
    from sqlalchemy import func
    from sqlmodel import Session, select

    from nexus_core import catalog
    from nexus_core.catalog import ReviewLabelRow

    with Session(catalog.engine()) as session:
        rows = session.exec(select(ReviewLabelRow.dataset_uri, ReviewLabelRow.decision, func.count(),
                                   func.count(func.distinct(ReviewLabelRow.reviewer)))
                            .group_by(ReviewLabelRow.dataset_uri, ReviewLabelRow.decision)).all()
    return pl.DataFrame([{"dataset_uri": u, "decision": d, "labels": n, "reviewers": r} for u, d, n, r in rows],
                        schema={"dataset_uri": pl.Utf8, "decision": pl.Utf8, "labels": pl.Int64,
                                "reviewers": pl.Int64})


# ---------------------------------------------------------------- review queue


def review_queue(limit: int = 200) -> pl.DataFrame:
    """Flow runs waiting at a review gate (Prefect state Suspended or Paused), joined with the review
    requests the distill flow recorded (which dataset, how many rows)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateName
    from prefect.client.schemas.sorting import FlowRunSort

    from nexus_core.distill import review_store

    flt = FlowRunFilter(state=FlowRunFilterState(name=FlowRunFilterStateName(any_=list(REVIEW_STATES))))
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=flt, sort=FlowRunSort.START_TIME_DESC, limit=limit)
        flows = {f.id: f.name for f in client.read_flows(limit=200)} if runs else {}
    waiting = {r.flow_run_id: r for r in review_store.requests(status="waiting") if r.flow_run_id}
    rows = []
    for run in runs:
        req = waiting.get(str(run.id))
        state = run.state
        rows.append({
            "flow": flows.get(run.flow_id, "?"), "flow_run": run.name, "flow_run_id": str(run.id),
            "state": state.name if state else None,
            "since": state.timestamp.isoformat(timespec="seconds") if state and state.timestamp else None,
            "dataset_uri": req.dataset_uri if req else None, "rows": req.rows if req else None,
            "message": state.message if state else None,
        })
    return pl.DataFrame(rows, schema={"flow": pl.Utf8, "flow_run": pl.Utf8, "flow_run_id": pl.Utf8, "state": pl.Utf8,
                                      "since": pl.Utf8, "dataset_uri": pl.Utf8, "rows": pl.Int64,
                                      "message": pl.Utf8})


# ---------------------------------------------------------------- training (MLflow)


def training_runs(max_results: int = 200) -> pl.DataFrame:
    """Step runs that logged training metrics (``train/*``), newest first, with their final values."""
    from nexus_core import lineage

    client = lineage.client()
    exps = [e.experiment_id for e in client.search_experiments()]
    if not exps:
        return pl.DataFrame()
    runs = client.search_runs(exps, filter_string="tags.`nexus.kind` = 'step'", max_results=max_results,
                              order_by=["attributes.start_time DESC"])
    rows = []
    for run in runs:
        metrics = run.data.metrics
        if not any(k.startswith(TRAIN_PREFIX) for k in metrics):
            continue
        tags = run.data.tags
        rows.append({
            "run_id": run.info.run_id, "name": tags.get("mlflow.runName", run.info.run_id[:8]),
            "artifact": tags.get("nexus.artifact"), "status": run.info.status,
            "started": _ms(run.info.start_time), "minutes": _minutes(run.info.start_time, run.info.end_time),
            "final_loss": metrics.get("final_loss", metrics.get(f"{TRAIN_PREFIX}loss")),
            "steps": metrics.get("global_step"), "tokens_per_s": metrics.get("tokens_per_s"),
            "learning_rate": _float(run.data.params.get("learning_rate")),
        })
    return pl.DataFrame(rows) if rows else pl.DataFrame()


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _ms(ms: int | None) -> str | None:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds") if ms else None


def _minutes(start: int | None, end: int | None) -> float | None:
    return round((end - start) / 60000, 2) if start and end else None


def curves(run_ids: list[str], names: dict[str, str] | None = None,
           keys: tuple[str, ...] = ("loss", "learning_rate", "tokens_per_s")) -> pl.DataFrame:
    """Long table (run, metric, step, value) of ``train/<key>`` histories for the given runs."""
    from nexus_core import lineage

    client = lineage.client()
    rows = []
    for run_id in run_ids:
        label = (names or {}).get(run_id, run_id[:8])
        for key in keys:
            for m in client.get_metric_history(run_id, f"{TRAIN_PREFIX}{key}"):
                rows.append({"run": label, "metric": key, "step": m.step, "value": m.value})
    return pl.DataFrame(rows, schema={"run": pl.Utf8, "metric": pl.Utf8, "step": pl.Int64, "value": pl.Float64})


# ---------------------------------------------------------------- leaderboard


def leaderboard() -> pl.DataFrame:
    """Evaluation reports per (dataset, judge kind), LLM judges first, ranked within each group (gates
    passed, coverage, score; ``rank`` restarts per group), with their metrics flattened into columns and
    lm-evaluation-harness results as ``harness.<task>.<metric>`` columns (shown, never ranked on)."""
    from nexus_core import catalog

    rows, group, rank = [], None, 0
    for r in catalog.leaderboard():
        if catalog.leaderboard_group(r) != group:
            group, rank = catalog.leaderboard_group(r), 0
        rank += 1
        metrics = {f"metric.{k}": v for k, v in json.loads(r.metrics_json or "{}").items()
                   if isinstance(v, int | float)}
        metrics |= {f"harness.{task}.{k}": v for task, values in json.loads(r.harness_json or "{}").items()
                    for k, v in values.items() if isinstance(v, int | float)}
        rows.append({"rank": rank, "dataset": r.dataset_name, "judge_kind": r.judge_kind, "model": r.model_name,
                     "score": r.score, "coverage": r.coverage, "gate": "pass" if r.gate_passed else "fail",
                     "judge": r.judge, "rubric": r.rubric, "run_id": r.run_id,
                     "created": r.created_at.isoformat(timespec="seconds"), "report_uri": r.report_uri, **metrics})
    return pl.DataFrame(rows) if rows else pl.DataFrame()


def report_details(report_uri: str) -> dict[str, Any]:
    """The report JSON of an evaluation artifact: rubric breakdown (``judge.dimensions``) and gates."""
    from nexus_core.artifacts import read_manifest
    from nexus_core.store import local_path

    manifest = read_manifest(report_uri)
    root = local_path(report_uri)
    name = manifest.result.get("report_file") or next((p.name for p in root.glob("eval_report_*.json")), None)
    if not name:
        return {}
    return json.loads((root / name).read_text(encoding="utf-8"))


def rubric_frame(reports: dict[str, dict[str, Any]]) -> pl.DataFrame:
    """(model, dimension, median) rows for a chart of the rubric breakdown across reports."""
    rows = []
    for label, data in reports.items():
        for dim, s in ((data.get("judge") or {}).get("dimensions") or {}).items():
            if s.get("median") is not None:
                rows.append({"model": label, "dimension": dim, "median": float(s["median"])})
    return pl.DataFrame(rows, schema={"model": pl.Utf8, "dimension": pl.Utf8, "median": pl.Float64})


# ---------------------------------------------------------------- costs


def cost_frame() -> pl.DataFrame:
    """The cost ledger as a table with a ``day`` column (one SQL read of the plain columns)."""
    from sqlmodel import Session, select

    from nexus_core import catalog
    from nexus_core.catalog import CostRow

    cols = (CostRow.flow_name, CostRow.flow_run_id, CostRow.step, CostRow.provider, CostRow.kind, CostRow.model,
            CostRow.tokens_in, CostRow.tokens_out, CostRow.gpu_seconds, CostRow.usd, CostRow.created_at)
    with Session(catalog.engine()) as session:
        rows = session.exec(select(*cols)).all()
    names = ["flow", "flow_run_id", "step", "provider", "kind", "model", "tokens_in", "tokens_out", "gpu_seconds",
             "usd", "created_at"]
    df = pl.DataFrame([dict(zip(names, r, strict=True)) for r in rows],
                      schema={"flow": pl.Utf8, "flow_run_id": pl.Utf8, "step": pl.Utf8, "provider": pl.Utf8,
                              "kind": pl.Utf8, "model": pl.Utf8, "tokens_in": pl.Int64, "tokens_out": pl.Int64,
                              "gpu_seconds": pl.Float64, "usd": pl.Float64, "created_at": pl.Datetime})
    return df.with_columns(pl.col("flow").fill_null("(no flow)"),
                           pl.col("step").str.split(".").list.last().alias("step"),
                           pl.col("created_at").dt.date().alias("day"))


def flow_budgets() -> dict[str, float]:
    """Budget (USD) per flow, from the newest flow run whose logged config has a ``*budget_usd`` param."""
    from nexus_core import lineage

    client = lineage.client()
    exps = [e.experiment_id for e in client.search_experiments()]
    if not exps:
        return {}
    out: dict[str, float] = {}
    for run in client.search_runs(exps, filter_string="tags.`nexus.kind` = 'flow'", max_results=500,
                                  order_by=["attributes.start_time DESC"]):
        flow = run.data.tags.get("nexus.flow")
        if not flow or flow in out:
            continue
        for key, value in run.data.params.items():
            if key.endswith("budget_usd") and (v := _float(value)) is not None:
                out[flow] = v
                break
    return out


# ---------------------------------------------------------------- lineage


def models() -> pl.DataFrame:
    """Model artifacts, newest first (what the lineage page starts from)."""
    from nexus_core.io import DataQuery

    ms = [m for m in DataQuery().manifests() if m.kind == "model"]
    ms.sort(key=lambda m: m.finished_at, reverse=True)
    return pl.DataFrame([{"model": f"{m.name}@v{m.version}", "uri": m.uri, "step": m.step.rsplit(".", 1)[-1],
                          "finished_at": m.finished_at} for m in ms],
                        schema={"model": pl.Utf8, "uri": pl.Utf8, "step": pl.Utf8, "finished_at": pl.Utf8})


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def lineage_graph(uri: str, max_nodes: int = 200) -> tuple[str, list[dict[str, Any]]]:
    """Graphviz DOT of an artifact's ancestry (walking manifests' input refs), plus one row per node.

    Nodes: artifacts (models, datasets), raw files, the teacher/judge models and prompt templates
    named in each step's config, and the human reviews recorded against each dataset.
    """
    from nexus_core.artifacts import read_manifest
    from nexus_core.config import flatten
    from nexus_core.errors import InputError
    from nexus_core.trace import PROMPT_KEYS, TEACHER_KEYS

    labels = label_counts()
    by_uri: dict[str, Counter[str]] = {}
    for r in labels.iter_rows(named=True):
        by_uri.setdefault(r["dataset_uri"], Counter())[r["decision"]] += r["labels"]
    lines = ["digraph lineage {", "rankdir=LR;", 'node [fontname="Helvetica", fontsize=10];']
    nodes: list[dict[str, Any]] = []
    seen: set[str] = set()
    todo = [uri]
    while todo and len(seen) < max_nodes:
        cur = todo.pop(0)
        if cur in seen:
            continue
        seen.add(cur)
        try:
            m = read_manifest(cur)
        except InputError:  # not an artifact (a plain directory)
            continue
        shape, color = ("box3d", "#c6dbef") if m.kind == "model" else ("box", "#e5f5e0")
        label = f"{m.name}@v{m.version}\\n{m.kind} · {m.step.rsplit('.', 1)[-1]}" + (f"\\n{m.rows} rows" if m.rows else "")
        lines.append(f'{_q(cur)} [label="{label}", shape={shape}, style=filled, fillcolor="{color}"];')
        nodes.append({"node": f"{m.name}@v{m.version}", "kind": m.kind, "step": m.step, "uri": cur,
                      "mlflow_run_id": m.mlflow_run_id})
        flat = flatten(m.config)
        for key, value in sorted(flat.items()):
            if not isinstance(value, str) or not value:
                continue
            if key.endswith(TEACHER_KEYS) or key == "model":
                node = f"model:{value}"
                lines.append(f'{_q(node)} [label={_q("teacher/judge: " + value)}, shape=ellipse, style=filled, '
                             f'fillcolor="#fdd0a2"];')
                lines.append(f'{_q(node)} -> {_q(cur)} [label={_q(key)}, style=dashed];')
                nodes.append({"node": value, "kind": "teacher", "step": key, "uri": None, "mlflow_run_id": None})
            elif key.rsplit(".", 1)[-1] in PROMPT_KEYS:
                node = f"prompt:{value}"
                lines.append(f'{_q(node)} [label={_q(key.rsplit(".", 1)[-1] + ": " + value)}, shape=note, '
                             f'style=filled, fillcolor="#fff7bc"];')
                lines.append(f'{_q(node)} -> {_q(cur)} [style=dashed];')
                nodes.append({"node": value, "kind": "prompt", "step": key, "uri": None, "mlflow_run_id": None})
        if cur in by_uri:
            c = by_uri[cur]
            node = f"reviews:{cur}"
            text = f"reviews: {sum(c.values())} labels\\n" + ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
            lines.append(f'{_q(node)} [label="{text}", shape=octagon, style=filled, fillcolor="#fcbba1"];')
            lines.append(f'{_q(node)} -> {_q(cur)};')
            nodes.append({"node": f"{sum(c.values())} labels", "kind": "review", "step": None, "uri": cur,
                          "mlflow_run_id": None})
        for key, ref in m.inputs.items():
            if ref.kind == "raw" or ref.version == 0:  # a raw file or a model outside the store
                lines.append(f'{_q(ref.uri)} [label={_q(ref.name)}, shape=cylinder];')
                if ref.uri not in seen:
                    seen.add(ref.uri)
                    nodes.append({"node": ref.name, "kind": "raw", "step": None, "uri": ref.uri, "mlflow_run_id": None})
            else:
                todo.append(ref.uri)
            lines.append(f'{_q(ref.uri)} -> {_q(cur)} [label={_q(key)}];')
    lines.append("}")
    # Several steps may share a teacher or template: identical node and edge lines are kept once.
    return "\n".join(dict.fromkeys(lines)), nodes
