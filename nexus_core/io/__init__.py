"""Table I/O and dataset queries."""

from nexus_core.io.query import DataQuery, DatasetInfo, load_table, parse_spec, resolve_ref
from nexus_core.io.tables import (
    iter_jsonl,
    read_jsonl,
    read_table,
    require_columns,
    row_id,
    schema_of,
    write_jsonl,
    write_parquet,
)

__all__ = [
    "DataQuery", "DatasetInfo", "iter_jsonl", "load_table", "parse_spec", "read_jsonl", "read_table", "resolve_ref",
    "require_columns", "row_id", "schema_of", "write_jsonl", "write_parquet",
]
