"""What a step shows in the Prefect UI besides its logs: a summary artifact and live progress.

- After every step task completes (the step executed, an existing artifact was reused, or Prefect served
  the task from its cache) an ``on_completion`` hook writes a markdown artifact under a stable key,
  ``<area>-<artifact name>`` (e.g. ``evaluate-eval-gates``), so the Artifacts page keeps its history
  across runs. It holds the manifest summary, the step's metrics and, for the gates, benchmark and
  evaluation-report steps, the verdicts, the benchmark table and the leaderboard row, read from the
  published artifact (nothing is recomputed).
- :func:`progress_reporter` is what a step's ``ctx.progress`` calls under Prefect: one progress
  artifact per task run, updated in place.

Both are cosmetic: a failure to write them is logged and never fails the step.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import warnings
from collections.abc import Callable
from typing import Any

from nexus_core.artifacts import ArtifactRef, Manifest, read_manifest
from nexus_core.context import ProgressFn
from nexus_core.contract import contract_of
from nexus_core.runner import StepResult

log = logging.getLogger("nexus")
MAX_METRIC_ROWS = 40  # the rest is in the step's MLflow run


def artifact_key(area: str, name: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for the artifact ``<area>/<name>``."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", f"{area}-{name}".lower())).strip("-")


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{int(value):,}" if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table; cells are formatted and escaped."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _size(n: int | None) -> str | None:
    if n is None:
        return None
    size, unit = float(n), "B"
    for bigger in ("kB", "MB", "GB"):
        if size < 1000:
            break
        size, unit = size / 1000, bigger
    return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"


def _reuse_text(result: StepResult, prefect_cached: bool) -> str:
    if prefect_cached:
        return "yes: Prefect cache hit (the result of an earlier task run; the step did not run)"
    if result.reused:
        return "yes: an existing artifact had the same cache key (the step did not run)"
    return "no: executed in this task run"


def _summary(ref: ArtifactRef, m: Manifest | None, result: StepResult, prefect_cached: bool) -> str:
    c = result.cost
    cost = "none"
    if c.usd or c.tokens_in or c.tokens_out or c.gpu_seconds:
        cost = (f"${c.usd:.4f}, {c.tokens_in:,} tokens in / {c.tokens_out:,} out, {c.gpu_seconds:.0f} GPU s "
                f"({c.provider}" + (f", {c.model})" if c.model else ")"))
    rows = [["artifact", f"`{ref.name}@v{ref.version}` ({ref.kind})"], ["uri", f"`{ref.uri}`"],
            ["rows", ref.rows], ["bytes", _size(ref.bytes)], ["digest", f"`{ref.digest[:12]}`"],
            ["config hash", f"`{m.config_hash[:12]}`" if m else None],
            ["cache key", f"`{m.cache_key[:12]}`" if m and m.cache_key else None],
            ["reused", _reuse_text(result, prefect_cached)], ["cost", cost],
            ["MLflow run", f"`{m.mlflow_run_id}`" if m and m.mlflow_run_id else None],
            ["made by flow run", f"`{m.prefect.get('flow_run_id')}`" if m and m.prefect.get("flow_run_id") else None]]
    return md_table(["field", "value"], rows)


def _metrics(result: StepResult) -> str:
    if not result.metrics:
        return ""
    items = list(result.metrics.items())
    text = "#### Metrics\n\n" + md_table(["metric", "value"], [[k, v] for k, v in items[:MAX_METRIC_ROWS]])
    if len(items) > MAX_METRIC_ROWS:
        text += f"\n\n… and {len(items) - MAX_METRIC_ROWS} more in the step's MLflow run."
    return text


def _threshold(gate: dict[str, Any]) -> str:
    parts = [f"≥ {gate['min']:g}" if gate.get("min") is not None else "",
             f"≤ {gate['max']:g}" if gate.get("max") is not None else ""]
    return " and ".join(p for p in parts if p)


def gates_section(ref: ArtifactRef) -> str:
    """The verdict of every gate, from the gates artifact's ``gates.json``."""
    data = json.loads((ref.path / "gates.json").read_text())
    failed = [g["gate"] for g in data["gates"] if not g["passed"]]
    head = "#### Gates: PASSED" if data["passed"] else f"#### Gates: FAILED ({', '.join(failed)})"
    rows = [[g["gate"], "✅ pass" if g["passed"] else "❌ fail", g["value"] if g["value"] is not None
             else g.get("detail") or "no value", _threshold(g), g.get("n"), _coverage(g)] for g in data["gates"]]
    return head + "\n\n" + md_table(["gate", "verdict", "value", "threshold", "n", "coverage"], rows)


def _coverage(gate: dict[str, Any]) -> str | None:
    """``0.125 of 8 rows (min 0.9)`` for a judged gate; None for a metric gate (or an older gates.json)."""
    if not gate.get("judged") or gate.get("coverage") is None:
        return None
    need = f" (min {gate['min_coverage']:g})" if gate.get("min_coverage") is not None else ""
    return f"{gate['coverage']:.3g} of {gate.get('rows')} rows{need}"


def benchmark_section(ref: ArtifactRef) -> str:
    """The benchmark artifact's own table (``report.md``), under a smaller heading."""
    text = (ref.path / "report.md").read_text()
    return re.sub(r"^# .*\n", "#### Benchmark\n", text, count=1).strip()


def report_section(ref: ArtifactRef) -> str:
    """The leaderboard row the evaluation report wrote (its ``data.parquet``)."""
    from nexus_core.io import read_table

    row = read_table(ref.path / "data.parquet").to_dicts()[0]
    cols = [k for k in row if k not in {"metrics_json", "model_uri"}]
    return "#### Leaderboard row\n\n" + md_table(cols, [[row[k] for k in cols]])


def _step_section(result: StepResult, ref: ArtifactRef) -> str:
    # Imported here: these step modules are needed only once a step has finished.
    from nexus_core.compress.benchmark import BenchmarkResult
    from nexus_core.evaluate.gates import GatesResult
    from nexus_core.evaluate.report import ReportResult

    if isinstance(result, GatesResult):
        return gates_section(ref)
    if isinstance(result, BenchmarkResult):
        return benchmark_section(ref)
    if isinstance(result, ReportResult):
        return report_section(ref)
    return ""


def step_markdown(title: str, result: StepResult, prefect_cached: bool = False) -> str:
    """The markdown of a finished step: manifest summary, metrics, and the step's own section."""
    ref = result.ref
    assert ref is not None, "a step result from the runner carries its artifact"
    try:
        manifest: Manifest | None = read_manifest(ref.path)
    except Exception:  # noqa: BLE001 - a manifest on a remote store: the summary shows what the ref has
        manifest = None
    parts = [f"### {title}: `{ref.name}@v{ref.version}`", _summary(ref, manifest, result, prefect_cached),
             _step_section(result, ref), _metrics(result)]
    return "\n\n".join(p for p in parts if p) + "\n"


def step_description(result: StepResult, prefect_cached: bool = False) -> str:
    """One line for the Artifacts page: which version, whether the step ran, a gate verdict."""
    from nexus_core.evaluate.gates import GatesResult

    assert result.ref is not None
    text = f"{result.ref.name}@v{result.ref.version}: " + ("reused" if prefect_cached or result.reused else "executed")
    if isinstance(result, GatesResult):
        text += ", gates passed" if result.passed else f", gates failed ({', '.join(result.failed_gates)})"
    return text


def step_artifact_hook(step_fn: Callable[..., Any]) -> Callable[[Any, Any, Any], None]:
    """An ``on_completion`` hook for the task that runs ``step_fn``: writes the step's markdown artifact."""
    area = contract_of(step_fn).area

    def publish_step_artifact(task: Any, task_run: Any, state: Any) -> None:
        from prefect.artifacts import MarkdownArtifact

        try:
            result = state.result(raise_on_failure=False, _sync=True)
            if not isinstance(result, StepResult) or result.ref is None:
                return
            cached = state.name == "Cached"
            MarkdownArtifact(
                key=artifact_key(area, result.ref.name), markdown=step_markdown(task.name, result, cached),
                description=step_description(result, cached), task_run_id=task_run.id,
                flow_run_id=task_run.flow_run_id,
            ).create(_sync=True)  # pyright: ignore[reportCallIssue] - create is wrapped in async_dispatch
        except Exception as exc:  # noqa: BLE001 - the summary is cosmetic; the step already succeeded
            log.warning("%s: no Prefect artifact for this step: %s: %s", task.name, type(exc).__name__, exc)

    return publish_step_artifact


def progress_reporter(task_run_id: str | None, flow_run_id: str | None) -> ProgressFn:
    """A progress artifact of the task run, created on the first report and updated in place.

    The ids are passed in because a step may report from a thread without Prefect's run context (an
    event loop in its own thread); the sync client is used explicitly for the same reason.
    """
    artifact_id: list[Any] = []
    lock = threading.Lock()

    def report(fraction: float, message: str) -> None:
        from prefect.artifacts import ProgressArtifact, update_progress_artifact

        percent = round(100 * fraction, 1)
        with lock, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "outside of a flow or task run": the ids say where
            if not artifact_id:
                created = ProgressArtifact(progress=percent, description=message, task_run_id=task_run_id,  # pyright: ignore[reportArgumentType]
                                           flow_run_id=flow_run_id).create(_sync=True)  # pyright: ignore[reportCallIssue, reportArgumentType]
                artifact_id.append(created.id)
            else:
                update_progress_artifact(artifact_id[0], percent, description=message, _sync=True)  # pyright: ignore[reportCallIssue]

    return report
