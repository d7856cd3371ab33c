"""Streaming SFT data: rows read from the file in batches and tokenized as training consumes them, so a
large table is never held in memory (as CPT streams its corpus).

A data input streams when its table file (an artifact's ``data.parquet`` / ``data.jsonl``, or a raw
``.parquet`` / ``.jsonl`` / ``.jsonl.zst`` file) is larger than the stage's ``stream_threshold_mb``;
a stage then streams all its data inputs. The eval split is kept by row hash as in memory, but as a
threshold on each row's own hash (a stream cannot be sorted): a row is held out when its hash falls in
the first ``eval_split`` of the hash range, so the split is the same on every run and disjoint, and
only the held-out rows are kept in memory (read in one pass before training). Several streams mix
by weight through ``datasets.interleave_datasets`` (probabilities, seeded); each stream is shuffled in
a buffer of ``SHUFFLE_BUFFER`` rows. A stream has no length: ``max_steps`` must be set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl

from nexus_core.artifacts import ArtifactRef
from nexus_core.train.steer import row_hash

SHUFFLE_BUFFER = 10_000
BATCH_ROWS = 1024
_SUFFIXES = (".parquet", ".jsonl", ".jsonl.zst")


def table_file(ref: ArtifactRef) -> Path | None:
    """The file a dataset input streams from, or None when it is not a table file we can stream."""
    path = ref.path
    if path.is_dir():
        path = next((path / f"data{s}" for s in (".parquet", ".jsonl") if (path / f"data{s}").is_file()), path)
    return path if path.is_file() and path.name.endswith(_SUFFIXES) else None


def streams(ref: ArtifactRef, threshold_mb: float) -> bool:
    """Whether ``ref``'s table file is larger than ``threshold_mb`` (0: any streamable file)."""
    path = table_file(ref)
    return path is not None and path.stat().st_size > threshold_mb * 2**20


def columns(ref: ArtifactRef) -> pl.DataFrame:
    """An empty frame with the table's columns (from its schema or first row; nothing else is read)."""
    from nexus_core.contract import columns_of

    return pl.DataFrame({c: [] for c in columns_of(ref) or []})


def frames(path: Path, rows: int = BATCH_ROWS) -> Iterator[pl.DataFrame]:
    """The table in frames of ``rows`` rows."""
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=rows):
            yield pl.from_arrow(batch)  # type: ignore[misc] - a RecordBatch gives a DataFrame
        return
    from nexus_core.io import iter_jsonl

    chunk: list[dict[str, Any]] = []
    for record in iter_jsonl(path):
        chunk.append(record)
        if len(chunk) == rows:
            yield pl.DataFrame(chunk)
            chunk = []
    if chunk:
        yield pl.DataFrame(chunk)


def held_out(record: Any, share: float) -> bool:
    """Whether a streamed row belongs to the eval split: its content hash in the first ``share`` of the range."""
    return share > 0 and int(row_hash(record)[:16], 16) < share * 2**64


def stream_rows(path: Path, to_records: Callable[[pl.DataFrame], list[Any]], share: float,
                evaluation: bool) -> Iterator[Any]:
    """Records of the file, frame by frame: the training side of the split, or (``evaluation``) the eval side."""
    for frame in frames(path):
        for record in to_records(frame):
            if held_out(record, share) == evaluation:
                yield record
