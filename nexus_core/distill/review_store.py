"""Human review bookkeeping: review requests (a flow waiting at the gate) and append-only labels.

Labels are :class:`nexus_core.catalog.ReviewLabelRow` rows: every decision is a new row, so two
reviewers working at once lose nothing; the latest label of a row wins. A review request records
which paused flow run waits for which dataset, so the review app knows whom to resume.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from functools import cache

from sqlmodel import Field, Session, SQLModel, col, select

from nexus_core import catalog
from nexus_core.catalog import ReviewLabelRow

DECISIONS = ("accept", "reject", "edit")


class ReviewRequestRow(SQLModel, table=True):
    """A flow run paused at the review gate for one filtered dataset."""

    __tablename__ = "review_requests"  # pyright: ignore[reportAssignmentType] - sqlmodel types it declared_attr
    id: int | None = Field(default=None, primary_key=True)
    dataset_uri: str = Field(index=True)
    flow_run_id: str | None = Field(default=None, index=True)
    flow_name: str | None = None
    rows: int = 0
    status: str = "waiting"  # waiting | submitted
    reviewer: str | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    submitted_at: datetime | None = None


@cache
def _ensure_table(url: str) -> None:
    # Created here rather than in catalog.py so the shared catalog module stays untouched.
    ReviewRequestRow.__table__.create(catalog.engine(), checkfirst=True)  # type: ignore[attr-defined]


def _engine():  # noqa: ANN202
    from nexus_core.settings import catalog_url

    _ensure_table(catalog_url())
    return catalog.engine()


def open_request(dataset_uri: str, flow_run_id: str | None, flow_name: str | None, rows: int) -> ReviewRequestRow:
    """Record that ``flow_run_id`` waits for a review of ``dataset_uri``.

    Idempotent per (dataset, flow run): a suspended run resumes by running again from the top,
    passing its gates again; the request it opened the first time is returned, not a new one.
    """
    row = ReviewRequestRow(dataset_uri=dataset_uri, flow_run_id=flow_run_id, flow_name=flow_name, rows=rows)
    with Session(_engine()) as session:
        if flow_run_id is not None:
            existing = session.exec(select(ReviewRequestRow).where(
                ReviewRequestRow.dataset_uri == dataset_uri, ReviewRequestRow.flow_run_id == flow_run_id)).first()
            if existing is not None:
                return existing
        session.add(row)
        session.commit()
        session.refresh(row)
        return row


def requests(status: str | None = None) -> list[ReviewRequestRow]:
    """Review requests, newest first, optionally by status."""
    with Session(_engine()) as session:
        query = select(ReviewRequestRow)
        if status:
            query = query.where(ReviewRequestRow.status == status)
        return list(session.exec(query.order_by(col(ReviewRequestRow.id).desc())))


def mark_submitted(request_id: int, reviewer: str) -> None:
    """Close a review request."""
    with Session(_engine()) as session:
        row = session.get(ReviewRequestRow, request_id)
        if row is not None:
            row.status, row.reviewer, row.submitted_at = "submitted", reviewer, datetime.now(UTC)
            session.add(row)
            session.commit()


def add_label(dataset_uri: str, row_id: str, decision: str, reviewer: str,
              edited_output: str | None = None, note: str | None = None) -> None:
    """Append one label (never updates: concurrent reviewers lose nothing)."""
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {', '.join(DECISIONS)}, got {decision!r}")
    catalog.add(ReviewLabelRow(dataset_uri=dataset_uri, row_id=row_id, decision=decision,
                               edited_output=edited_output if decision == "edit" else None,
                               reviewer=reviewer or "anonymous", note=note))


def all_labels(dataset_uri: str) -> list[ReviewLabelRow]:
    """Every label of a dataset, oldest first (the full audit trail)."""
    with Session(catalog.engine()) as session:
        query = select(ReviewLabelRow).where(ReviewLabelRow.dataset_uri == dataset_uri)
        return list(session.exec(query.order_by(col(ReviewLabelRow.id))))


def latest_labels(dataset_uri: str) -> dict[str, ReviewLabelRow]:
    """row_id → its latest label."""
    return {label.row_id: label for label in all_labels(dataset_uri)}


def labels_digest(dataset_uri: str) -> str:
    """sha256 of a dataset's labels: a submission's identity (it joins the review step's cache key)."""
    blob = json.dumps([[lb.id, lb.row_id, lb.decision, lb.edited_output, lb.reviewer]
                       for lb in all_labels(dataset_uri)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
