"""Helpers of the evaluation flow that are not steps: naming a run, finding inputs, recording reports.

Kept outside ``steps/`` so the flow, the tasks and other areas (the lifecycle's promote/reject
decision, the leaderboard dashboard) can share them without importing a step module.
"""

from __future__ import annotations

import hashlib
import json

from nexus_core import catalog, lineage
from nexus_core.artifacts import ArtifactRef, read_manifest


def eval_run_id(model: ArtifactRef, dataset: ArtifactRef, config_hash: str) -> str:
    """A stable id for (model, dataset, evaluation config): same inputs, same id, so caches still hit."""
    h = hashlib.sha256(f"{model.digest}:{dataset.digest}:{config_hash}".encode()).hexdigest()[:10]
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in model.name)[:40]
    return f"{safe}-v{model.version}-{h}"


def harness_values(harness: dict | None) -> dict[str, dict[str, float | int | None]]:
    """A report's harness section, flat per task: each metric's value and ``<metric>_stderr``, and ``n``
    (what the leaderboard shows beside, never inside, the rubric score)."""
    out: dict[str, dict[str, float | int | None]] = {}
    for task, t in ((harness or {}).get("tasks") or {}).items():
        row: dict[str, float | int | None] = {"n": t.get("n")}
        for name, m in (t.get("metrics") or {}).items():
            row[name], row[f"{name}_stderr"] = m.get("value"), m.get("stderr")
        out[task] = row
    return out


def latest_feedback(evaluation: str) -> tuple[ArtifactRef | None, str]:
    """The newest ``evaluate/<evaluation>_feedback`` artifact, if it holds failed samples, and one line
    saying what was found (the lifecycle logs it). A newest version with no samples returns None: that
    evaluation failed nothing, and older failures were another model's."""
    from nexus_core.io import DataQuery

    name = f"{evaluation}_feedback"
    info = next((i for i in DataQuery().list("evaluate") if i.name == name), None)
    if info is None:
        return None, f"feedback: no evaluate/{name} artifact yet; distill runs on its own sources"
    manifest = read_manifest(info.latest_uri)
    spec = f"evaluate/{name}@v{manifest.version}"
    if not manifest.rows:
        return None, f"feedback: {spec} holds no failed samples; nothing to add to distill's sources"
    return manifest.ref(), (f"feedback: distill's sources gain {spec}: {manifest.rows} sample(s) that "
                            f"evaluation failed, asked of the teacher again")


def record_report(report: ArtifactRef, flow_run_id: str | None = None) -> catalog.EvalReportRow:
    """Add the report to the leaderboard (idempotent) and log its JSON and tables to its MLflow run."""
    manifest = read_manifest(report.uri)
    result = manifest.result
    data = json.loads((report.path / result["report_file"]).read_text())
    model, dataset = data.get("model") or {}, data.get("dataset") or {}
    row = catalog.EvalReportRow(
        run_id=data["run_id"], model_name=model.get("name"), model_uri=model.get("uri"),
        model_digest=model.get("digest"), dataset_name=dataset.get("name"), dataset_digest=dataset.get("digest"),
        judge=data["judge"].get("name"), judge_kind=data["judge"]["kind"], score=data.get("score"),
        coverage=data.get("coverage"), rubric=data["judge"].get("rubric"),
        gate_passed=bool(data["gate_passed"]), metrics_json=json.dumps(data.get("metrics") or {}),
        harness_json=json.dumps(harness_values(data.get("harness"))),
        report_uri=report.uri, flow_run_id=flow_run_id,
    )
    catalog.add_eval_report(row)
    if manifest.mlflow_run_id:
        client = lineage.client()
        run_id = manifest.mlflow_run_id
        client.log_artifact(run_id, str(report.path / result["report_file"]))
        gates = data.get("gates") or []
        if gates:
            client.log_table(run_id, {k: [g.get(k) for g in gates] for k in gates[0]}, "eval_gates.json")
        worst = data.get("worst_samples") or []
        if worst:
            client.log_table(run_id, {k: [str(w.get(k)) for w in worst] for k in worst[0]}, "eval_worst_samples.json")
        client.set_tag(run_id, "nexus.eval.judge_kind", data["judge"]["kind"])
        client.set_tag(run_id, "nexus.eval.gate_passed", str(bool(data["gate_passed"])))
    return row
