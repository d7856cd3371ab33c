"""Read and write tables: Parquet, JSONL, JSONL.gz and JSONL.zst, with errors that name the line.

Tables are polars DataFrames. Writes are atomic: a reader never sees half a file.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import polars as pl

from nexus_core.artifacts import atomic_path
from nexus_core.errors import InputError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson")


def _open_bytes(path: Path) -> io.BufferedIOBase:
    """The decompressed bytes of ``path`` (by suffix), read line by line: each line is decoded on its
    own, so a bad byte is reported on its own line, not on the line a text decoder's chunk began."""
    name = path.name
    if name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))  # type: ignore[arg-type]
    return open(path, "rb")


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield one dict per non-blank line; a bad line raises InputError naming file and line number."""
    for _, record in _numbered_records(Path(path)):
        yield record


def _numbered_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of every non-blank line of a JSONL file (see :func:`iter_jsonl`)."""
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        with _open_bytes(path) as fh:
            for lineno, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise InputError(f"{path}:{lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start} of "
                                     f"the line)") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(record, dict):
                    raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
                yield lineno, record
    except (OSError, EOFError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{path}: unreadable ({exc})") from None


def _json_kind(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"  # ints and floats share a column (as floats)
    return {str: "string", list: "array", dict: "object"}[type(value)]


def read_jsonl(path: str | Path) -> pl.DataFrame:
    """Read a JSONL (optionally .gz/.zst) file into a DataFrame.

    Each key must hold one JSON type in every row (null aside; ints and floats mix): a row with
    ``"title": 5`` after string titles raises InputError naming the line and key, rather than
    becoming the string ``"5"`` in a column polars widens to text.
    """
    path = Path(path)
    rows, kinds = [], {}
    for lineno, record in _numbered_records(path):
        for key, value in record.items():
            kind = _json_kind(value)
            if kind is None:
                continue
            first = kinds.setdefault(key, (kind, lineno))
            if first[0] != kind:
                raise InputError(f"{path}:{lineno}: {key}: expected a {first[0]} (as on line {first[1]}), "
                                 f"got a {kind}: {json.dumps(value)[:60]}")
        rows.append(record)
    return pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame()


def read_table(path: str | Path, columns: Iterable[str] | None = None) -> pl.DataFrame:
    """Read a Parquet or JSONL table; ``columns`` names required columns (missing ones are named)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.name.endswith(".parquet") or path.is_dir():
        try:
            df = pl.read_parquet(path)
        except Exception as exc:  # polars raises several error types for corrupt files
            raise InputError(f"{path}: unreadable Parquet ({exc})") from None
    elif path.name.endswith(JSONL_SUFFIXES):
        df = read_jsonl(path)
    else:
        raise InputError(f"{path}: unknown table format (expected .parquet, .jsonl, .jsonl.gz, .jsonl.zst)")
    if columns:
        require_columns(df, columns, str(path))
    return df


def require_columns(df: pl.DataFrame, columns: Iterable[str], where: str) -> None:
    """Raise InputError naming every required column missing from ``df``."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"{where}: missing column(s) {', '.join(missing)} (has: {', '.join(df.columns) or 'none'})")


def write_parquet(df: pl.DataFrame, path: str | Path) -> Path:
    """Write a DataFrame to Parquet atomically."""
    with atomic_path(path) as tmp:
        df.write_parquet(tmp, compression="zstd")
    return Path(path)


def write_jsonl(rows: Iterable[dict[str, Any]] | pl.DataFrame, path: str | Path) -> int:
    """Write records to JSONL (plain, .gz or .zst by suffix) atomically; returns the row count."""
    path = Path(path)
    records = rows.iter_rows(named=True) if isinstance(rows, pl.DataFrame) else rows
    count = 0
    with atomic_path(path) as tmp:
        raw = open(tmp, "wb")
        if path.name.endswith(".gz"):
            stream = gzip.GzipFile(fileobj=raw, mode="wb")
        elif path.name.endswith(".zst"):
            import zstandard

            stream = zstandard.ZstdCompressor().stream_writer(raw)
        else:
            stream = raw
        with stream:
            for record in records:
                stream.write((json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8"))
                count += 1
        if not raw.closed:
            raw.close()
    return count


def schema_of(df: pl.DataFrame) -> dict[str, str]:
    """Column name -> polars dtype string (what manifests record as schema)."""
    return {name: str(dtype) for name, dtype in df.schema.items()}


def row_id(*parts: str) -> str:
    """Stable id of a row from the things that define it."""
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:16]
