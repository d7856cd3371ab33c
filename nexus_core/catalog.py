"""The catalog: a small SQL database of artifacts, step runs, review labels and costs.

SQLite under ``NEXUS_HOME`` by default; any SQLAlchemy URL through ``NEXUS_CATALOG_URL``. The
dashboards and ``nexus costs`` read it; artifacts themselves stay on disk with their manifests.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, event
from sqlmodel import Field, Session, SQLModel, col, create_engine, select

from nexus_core.settings import catalog_url, nexus_home

if TYPE_CHECKING:
    from nexus_core.artifacts import Manifest


def _now() -> datetime:
    return datetime.now(UTC)


class ArtifactRow(SQLModel, table=True):
    """One finished artifact version."""

    __tablename__ = "artifacts"  # pyright: ignore[reportAssignmentType] - sqlmodel types it declared_attr
    id: int | None = Field(default=None, primary_key=True)
    kind: str
    area: str = Field(index=True)
    name: str = Field(index=True)
    version: int
    uri: str = Field(unique=True)
    digest: str
    rows: int | None = None
    bytes: int = 0
    step: str
    config_hash: str
    flow_run_id: str | None = Field(default=None, index=True)
    mlflow_run_id: str | None = None
    created_at: datetime = Field(default_factory=_now)


class StepRunRow(SQLModel, table=True):
    """One call of a step: executed, returned from an existing manifest, or failed."""

    __tablename__ = "step_runs"  # pyright: ignore[reportAssignmentType] - sqlmodel types it declared_attr
    id: int | None = Field(default=None, primary_key=True)
    step: str = Field(index=True)
    status: str  # completed | reused | failed | killed (a signal or cancellation ended it)
    config_hash: str
    artifact_uri: str | None = None
    error: str | None = None
    flow_name: str | None = None
    flow_run_id: str | None = Field(default=None, index=True)
    task_run_id: str | None = None
    mlflow_run_id: str | None = None
    started_at: datetime = Field(default_factory=_now)
    seconds: float = 0.0


class CostRow(SQLModel, table=True):
    """Spend of one step execution: API tokens and dollars, or GPU seconds and dollars."""

    __tablename__ = "costs"  # pyright: ignore[reportAssignmentType] - sqlmodel types it declared_attr
    id: int | None = Field(default=None, primary_key=True)
    flow_name: str | None = Field(default=None, index=True)
    flow_run_id: str | None = None
    step: str = Field(index=True)
    provider: str = "local"
    kind: str = "api"  # api | gpu | cpu
    model: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    gpu_seconds: float = 0.0
    usd: float = 0.0
    created_at: datetime = Field(default_factory=_now, index=True)


class FlowRunRow(SQLModel, table=True):
    """One Prefect flow run of a Nexus flow: where it sits in its flow-run tree and its budget.

    Every flow registers itself when it starts, so any process that shares the catalog (a subflow
    started with ``run_deployment`` on another machine) can sum the ledger over a run and all its
    subflows, and find every budget above a step.
    """

    __tablename__ = "flow_runs"  # pyright: ignore[reportAssignmentType] - sqlmodel types it declared_attr
    id: int | None = Field(default=None, primary_key=True)
    flow_run_id: str = Field(unique=True)
    flow_name: str | None = None
    parent_flow_run_id: str | None = None
    root_flow_run_id: str = Field(index=True)
    ancestors: str = ""  # ids of the enclosing flow runs, root first, space-separated
    budget_usd: float | None = None
    created_at: datetime = Field(default_factory=_now)


class ReviewLabelRow(SQLModel, table=True):
    """A reviewer's decision on one row of a dataset (append-only: the latest label wins)."""

    __tablename__ = "review_labels"  # pyright: ignore[reportAssignmentType] - sqlmodel types it declared_attr
    id: int | None = Field(default=None, primary_key=True)
    dataset_uri: str = Field(index=True)
    row_id: str = Field(index=True)
    decision: str  # accept | reject | edit
    edited_output: str | None = None
    reviewer: str
    note: str | None = None
    created_at: datetime = Field(default_factory=_now)


class EvalReportRow(SQLModel, table=True):
    """One evaluation report (issue 7): the leaderboard is a query over these rows."""

    __tablename__ = "eval_reports"  # pyright: ignore[reportAssignmentType] - sqlmodel types it declared_attr
    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(index=True)
    model_name: str | None = Field(default=None, index=True)
    model_uri: str | None = None
    model_digest: str | None = None
    dataset_name: str | None = Field(default=None, index=True)
    dataset_digest: str | None = None
    judge: str | None = None
    judge_kind: str = "heuristic"  # heuristic | llm: heuristic scores are never ranked as LLM-judged
    score: float | None = None  # mean of the rubric medians
    coverage: float | None = None  # rows the judge scored / rows (null: recorded before coverage existed)
    rubric: str | None = None  # name@vN: scores on different rubrics are not comparable either
    gate_passed: bool = False
    metrics_json: str = "{}"
    harness_json: str | None = None  # lm-eval task → metric → value (and stderr, n); never part of `score`
    report_uri: str = Field(unique=True)
    flow_run_id: str | None = None
    created_at: datetime = Field(default_factory=_now, index=True)


@cache
def _engine_for(url: str) -> Engine:
    args = {"check_same_thread": False, "timeout": 30} if url.startswith("sqlite") else {}
    engine = create_engine(url, connect_args=args)
    if url.startswith("sqlite"):
        # WAL lets the dashboard read while a flow writes; two writers wait instead of failing.
        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record):  # noqa: ANN001
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=30000")

    with migration_lock("catalog"):  # concurrent first runs on a fresh home create the tables once
        SQLModel.metadata.create_all(engine)
        _add_missing_columns(engine)
    return engine


# Columns added after a table first shipped: (table, column, SQL type). create_all never alters an
# existing table, so a catalog made by an older version gets them here (nullable, so old rows stay valid).
_ADDED_COLUMNS = [("eval_reports", "coverage", "FLOAT"), ("eval_reports", "rubric", "VARCHAR"),
                  ("eval_reports", "harness_json", "VARCHAR")]


def _add_missing_columns(engine: Engine) -> None:
    from sqlalchemy import inspect, text

    inspector = inspect(engine)
    with engine.begin() as conn:
        for table, column, sql_type in _ADDED_COLUMNS:
            if column not in {c["name"] for c in inspector.get_columns(table)}:
                conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}"))


@contextmanager
def migration_lock(name: str) -> Iterator[None]:
    """An exclusive lock under ``NEXUS_HOME`` around creating or migrating a database, so several
    processes starting at once on a fresh home do not race each other's schema changes."""
    import fcntl

    with open(nexus_home() / f".{name}.migrate.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def engine() -> Engine:
    """Engine for the configured catalog, tables created on first use."""
    return _engine_for(catalog_url())


def add(*rows: SQLModel) -> None:
    """Insert rows in one transaction.

    An artifact row replaces any row with the same URI: versions are immutable, so a URI written
    again means its data root was deleted and the old row describes data that is gone.
    """
    with Session(engine()) as session:
        for row in rows:
            if isinstance(row, ArtifactRow):
                for old in session.exec(select(ArtifactRow).where(ArtifactRow.uri == row.uri)):
                    session.delete(old)
        session.flush()  # the unit of work would otherwise insert before it deletes
        session.add_all(rows)
        session.commit()


def artifacts(name: str | None = None, area: str | None = None) -> list[ArtifactRow]:
    """Artifact rows, newest first, optionally filtered by name and area."""
    with Session(engine()) as session:
        query = select(ArtifactRow)
        if name:
            query = query.where(ArtifactRow.name == name)
        if area:
            query = query.where(ArtifactRow.area == area)
        return list(session.exec(query.order_by(col(ArtifactRow.id).desc())))


def step_runs(flow_run_id: str | None = None) -> list[StepRunRow]:
    """Step-run rows, oldest first, optionally for one flow run."""
    with Session(engine()) as session:
        query = select(StepRunRow)
        if flow_run_id:
            query = query.where(StepRunRow.flow_run_id == flow_run_id)
        return list(session.exec(query.order_by(col(StepRunRow.id))))


def costs() -> list[CostRow]:
    """Every cost row, oldest first."""
    with Session(engine()) as session:
        return list(session.exec(select(CostRow).order_by(col(CostRow.id))))


def add_eval_report(row: EvalReportRow) -> None:
    """Insert an evaluation report row unless one for the same report URI exists (idempotent)."""
    with Session(engine()) as session:
        if session.exec(select(EvalReportRow).where(EvalReportRow.report_uri == row.report_uri)).first():
            return
        session.add(row)
        session.commit()


# A report scored on fewer rows than this is ranked below every fully judged one of its group.
LEADERBOARD_MIN_COVERAGE = 0.9
JUDGE_KIND_ORDER = {"llm": 0, "heuristic": 1}


def leaderboard_group(row: EvalReportRow) -> tuple[str, str]:
    """(dataset, judge kind): reports are ranked only against others of the same group, because a score
    on another dataset, or from another kind of judge, measures something else."""
    return row.dataset_name or "?", row.judge_kind


def leaderboard(dataset_name: str | None = None, judge_kind: str | None = None) -> list[EvalReportRow]:
    """Evaluation reports grouped by dataset, then judge kind (LLM judges before the heuristic, so it can
    never outrank one), and ranked within each group: gates passed first, then coverage at least
    :data:`LEADERBOARD_MIN_COVERAGE`, then score (highest first), then newest."""
    with Session(engine()) as session:
        query = select(EvalReportRow)
        if dataset_name:
            query = query.where(EvalReportRow.dataset_name == dataset_name)
        if judge_kind:
            query = query.where(EvalReportRow.judge_kind == judge_kind)
        rows = list(session.exec(query))

    def key(r: EvalReportRow) -> tuple:
        thin = r.coverage is not None and r.coverage < LEADERBOARD_MIN_COVERAGE
        return (r.dataset_name or "", JUDGE_KIND_ORDER.get(r.judge_kind, 2), r.judge_kind, not r.gate_passed, thin,
                -(r.score if r.score is not None else float("-inf")), -r.id if r.id is not None else 0)

    return sorted(rows, key=key)


def artifact_row(m: Manifest) -> ArtifactRow:
    """The catalog row of a published artifact, from its manifest."""
    return ArtifactRow(kind=m.kind, area=Path(m.uri).parent.name, name=m.name, version=m.version, uri=m.uri,
                       digest=m.digest, rows=m.rows, bytes=m.bytes, step=m.step, config_hash=m.config_hash,
                       flow_run_id=m.prefect.get("flow_run_id"), mlflow_run_id=m.mlflow_run_id)


def ensure_artifact(m: Manifest) -> bool:
    """Add the row of a published artifact if the catalog lacks it (a run killed between publishing and
    cataloguing). Returns True when a row was added."""
    with Session(engine()) as session:
        if session.exec(select(ArtifactRow.id).where(ArtifactRow.uri == m.uri)).first() is not None:
            return False
    add(artifact_row(m))
    return True


def repair(root: Path | str | None = None) -> int:
    """Add a row for every published artifact in the store that has none; the number added.
    Manifests are the truth: the catalog is an index that can always be rebuilt from them (a fresh
    machine on a shared store rebuilds its own). Only manifests without a row are read."""
    from nexus_core.artifacts import iter_manifests

    with Session(engine()) as session:
        known = set(session.exec(select(ArtifactRow.uri)))
    missing = [artifact_row(m) for m in iter_manifests(root, skip=known)]
    if missing:
        add(*missing)
    return len(missing)
