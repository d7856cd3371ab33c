"""Printing what a flow produced (manifests, MLflow run, where to look next) or why it failed.

A failed command prints one ``error:`` line: the NexusError's message (it names the file, key or row),
or for an unexpected exception its type and first line, with where its traceback went. Tracebacks
reach the console only with ``--debug``; Prefect's log records keep them, so the Prefect UI and API
still show them.
"""

from __future__ import annotations

import copy
import logging
import sys
import traceback
from typing import Any

from flows.results import FlowResult
from nexus_core.errors import NexusError
from nexus_core.settings import mlflow_uri, nexus_home


def _short(value: Any) -> Any:
    """An artifact as ``name@vN``, recursively inside mappings and lists; anything else as it is."""
    if isinstance(value, dict):
        if {"uri", "name", "version", "digest"} <= set(value):
            return f"{value['name']}@v{value['version']}"
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items() if v not in (None, [], {})) + "}"
    if isinstance(value, list):
        return [_short(v) for v in value]
    return value


def print_result(result: Any) -> None:
    """Print the manifests a flow produced and how to open the UIs."""
    if not isinstance(result, FlowResult):
        print(result)
        return
    if result.dry_run:
        print(f"\n{result.flow}: dry run, nothing produced. Checked plan:")
        for line in result.plan:
            print(f"  {line}")
        for key, value in result.summary.items():
            if value not in (None, [], {}):
                print(f"  {key}: {_short(value)}")
        return
    print(f"\n{result.flow}: {len(result.artifacts)} artifact(s)")
    for step, ref in result.artifacts.items():
        note = " (reused)" if step in result.reused else ""
        rows = f", {ref.rows} rows" if ref.rows is not None else ""
        print(f"  {step:<16} {ref.name}@v{ref.version}{rows}{note}\n  {'':<16} {ref.uri}/manifest.json")
    for key, value in result.summary.items():
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            print(f"  {key}:")  # a stage → summary mapping (the lifecycle's stages): one line each
            for sub, fields in value.items():
                print(f"    {sub}: {_short(fields)}")
        else:
            print(f"  {key}: {_short(value)}")
    print(f"\nMLflow run {result.mlflow_run_id} in {mlflow_uri()}")
    print(f"Prefect flow run {result.flow_run_id}")
    print("Look at it:")
    print(f"  mlflow ui --backend-store-uri {mlflow_uri()}      # http://127.0.0.1:5000")
    print("  streamlit run dashboards/app.py                    # review, data, training, leaderboard, costs, lineage")
    print("  make up                                            # Prefect UI :4200, MLflow :5000, Streamlit :8501")
    print(f"  nexus data ls                                      # datasets and versions (state in {nexus_home()})")


class _WithoutTraceback(logging.Formatter):
    """Formats a record as ``inner`` does, minus its traceback. Works on a copy: the record is shared
    with the other handlers (Prefect's API handler sends the traceback on to the UI)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            record = copy.copy(record)
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return self.inner.format(record)


def quiet_console_tracebacks() -> None:
    """Keep tracebacks out of the console logs: Prefect logs one per failed task and flow run.

    Wraps the formatter of each console handler Prefect set up when it was imported (the root
    logger's, and uvicorn's and fastapi's for its temporary server); other handlers are untouched.
    """
    import prefect  # noqa: F401 - importing prefect is what configures its logging handlers

    for name in ("", "uvicorn", "fastapi"):
        for handler in logging.getLogger(name).handlers:
            console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            if console and not isinstance(handler.formatter, _WithoutTraceback):
                handler.setFormatter(_WithoutTraceback(handler.formatter or logging.Formatter()))


def report_failure(exc: BaseException, debug: bool = False) -> int:
    """Print why a command failed as one ``error:`` line and return the exit code.

    With ``debug`` the traceback is printed first. Without it, an unexpected (non-Nexus) exception's
    traceback is written to ``NEXUS_HOME/last_error.txt`` and the line says so.
    """
    if isinstance(exc, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        return 130
    if debug:
        traceback.print_exception(exc)
    if isinstance(exc, NexusError):
        print(f"error: {exc}", file=sys.stderr)
        return 1
    lines = str(exc).strip().splitlines()
    message = f"{type(exc).__name__}: {lines[0]}{' ...' if len(lines) > 1 else ''}" if lines else type(exc).__name__
    if debug:
        note = "traceback above"
    else:
        saved = _save_traceback(exc)
        note = f"traceback in {saved}; " if saved else ""
        note += "run again with --debug to print it"
    print(f"error: unexpected {message} ({note})", file=sys.stderr)
    return 1


def _save_traceback(exc: BaseException) -> str | None:
    """Write the traceback to ``NEXUS_HOME/last_error.txt`` (a long run need not be repeated to see it)."""
    try:
        path = nexus_home() / "last_error.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(traceback.format_exception(exc)), encoding="utf-8")
    except OSError:
        return None
    return str(path)
