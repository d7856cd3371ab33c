"""What the Prefect UI shows of a run: a markdown artifact per step (keyed, with history), the gate
verdicts, the leaderboard row, and progress artifacts that reach 100 %; read back from a real
(temporary) Prefect API with the Prefect client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nexus_core.artifacts import raw_ref
from nexus_core.context import StepContext
from tasks.ui import artifact_key, gates_section

REPO = Path(__file__).resolve().parents[2]


def test_artifact_keys_are_what_prefect_accepts():
    assert artifact_key("evaluate", "evt_gates") == "evaluate-evt-gates"
    assert artifact_key("train", "SFT.v2__lora") == "train-sft-v2-lora"


def test_gates_section_shows_each_verdict_against_its_threshold(tmp_path):
    gates = [{"gate": "plausibility_median", "value": 4.0, "min": 3.5, "max": None, "n": 8, "passed": True},
             {"gate": "ppl", "value": 120.0, "min": None, "max": 50.0, "n": 1, "passed": False},
             {"gate": "empty", "value": None, "min": 1.0, "max": None, "n": 0, "passed": False,
              "detail": "no usable values"}]
    (tmp_path / "gates.json").write_text(json.dumps({"passed": False, "gates": gates}))
    text = gates_section(raw_ref(tmp_path))
    assert text.startswith("#### Gates: FAILED (ppl, empty)")
    assert "| plausibility_median | ✅ pass | 4 | ≥ 3.5 | 8 |" in text
    assert "| ppl | ❌ fail | 120 | ≤ 50 | 1 |" in text
    assert "| empty | ❌ fail | no usable values | ≥ 1 | 0 |" in text
    gates.append({"gate": "thin", "value": 5.0, "min": 3.5, "max": None, "n": 1, "rows": 8, "coverage": 0.125,
                  "min_coverage": 0.9, "judged": True, "passed": False})
    (tmp_path / "gates.json").write_text(json.dumps({"passed": False, "gates": gates}))
    assert "| thin | ❌ fail | 5 | ≥ 3.5 | 1 | 0.125 of 8 rows (min 0.9) |" in gates_section(raw_ref(tmp_path))


def test_collect_reports_progress_as_answers_arrive(data_root, tmp_path):
    from nexus_core.distill.collect import CollectConfig, run_teacher_collect
    from nexus_core.distill.inputs import TeacherInputsConfig, run_teacher_inputs
    from nexus_core.distill.prompts import TeacherConfig
    from nexus_core.runner import run_step

    ti = run_step(run_teacher_inputs, TeacherInputsConfig(templates=["hypothesis"]), name="ti",
                  inputs={"s0": raw_ref(REPO / "data/raw/scientific/abstracts.jsonl")})
    reports: list[tuple[float, str]] = []
    ctx = StepContext(step="collect", work_dir=tmp_path / "work", on_progress=lambda f, m: reports.append((f, m)),
                      progress_every_s=0.0)
    out = tmp_path / "out"
    out.mkdir()
    cfg = CollectConfig(teacher=TeacherConfig(model="openai/never-recorded", offline=True, cache=False),
                        batch_size=16)  # one batch: without per-answer reports there would be one report
    run_teacher_collect(cfg, inputs={"teacher_inputs": ti.ref}, out_uri=str(out), ctx=ctx)
    answered = [f for f, m in reports if "answered" in m]
    assert answered[0] == pytest.approx(1 / 16) and answered[-1] == 1.0 and len(answered) == 16


def _artifacts(flow_run_id: str) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def _by_key(key: str) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


@pytest.mark.integration
def test_each_step_of_a_flow_run_shows_its_summary_and_progress(prefect_harness, data_root):
    from flows.common import load_flow_config
    from flows.evaluate import EvaluateConfig, evaluate

    cfg = load_flow_config(EvaluateConfig, str(REPO / "configs/eval/tiny.yaml"),
                           [f"dataset={REPO / 'data/raw/eval/tiny_validation.jsonl'}", "name=evui"])
    result = evaluate(cfg)
    assert result.flow_run_id
    arts = _artifacts(result.flow_run_id)
    markdown = {a.key: a for a in arts if a.type == "markdown"}
    # one keyed markdown artifact per step, each naming the artifact version the step produced
    assert len(markdown) == len(result.artifacts) == sum(a.type == "markdown" for a in arts) == 8
    for step, ref in result.artifacts.items():
        found = [a for a in markdown.values() if f"`{ref.name}@v{ref.version}`" in a.data]
        assert len(found) == 1, step
        assert f"`{ref.digest[:12]}`" in found[0].data and "no: executed in this task run" in found[0].data
    predict = markdown["evaluate-evui-predictions"]
    assert "#### Metrics" in predict.data and "| predict_seconds |" in predict.data
    # the gates: the verdict, each gate's value against its threshold (a random-weight model fails)
    gates = markdown["evaluate-evui-gates"]
    assert "#### Gates: FAILED" in gates.data and gates.description.endswith(")")
    assert result.failed_gates
    for gate in result.gate_values:
        assert f"| {gate} | {'❌ fail' if gate in result.failed_gates else '✅ pass'} |" in gates.data
    assert "≥ 3.5" in gates.data
    # the report: its leaderboard row
    report = markdown["evaluate-evui-report"]
    assert "#### Leaderboard row" in report.data and result.run_id in report.data
    # progress of the predictions reached 100 %, on the predict task run
    progress = [a for a in arts if a.type == "progress" and a.task_run_id == predict.task_run_id]
    assert len(progress) == 1 and progress[0].data == 100.0

    # A second run is served from Prefect's cache: every step still shows its summary, under the same
    # keys, so each key's history now holds both runs.
    again = evaluate(cfg)
    cached = {a.key: a for a in _artifacts(again.flow_run_id or "") if a.type == "markdown"}
    assert set(cached) == set(markdown)
    assert all("Prefect cache hit" in a.data for a in cached.values())
    assert len(_by_key("evaluate-evui-gates")) == 2
