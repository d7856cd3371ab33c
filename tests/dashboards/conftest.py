"""A store filled by a real tiny run, for the dashboard tests.

Every artifact goes through ``nexus_core.runner.run_step`` (manifest, MLflow run, catalog rows):
ingest of raw teacher rows, the real distill filters, human labels through ``review_store``, a tiny
base model, a few real SFT steps (loss / learning-rate / tokens-per-second curves in MLflow), a
teacher-API spend and a GPU spend under a flow run with a budget. The leaderboard is filled by the
real evaluation steps on that SFT model (offline preset, heuristic judge) and ``eval_lib.record_report``,
and the flow run waiting at a review gate is a real Prefect flow run in state Suspended.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import Field

from nexus_core import lineage
from nexus_core.artifacts import ArtifactRef, atomic_write_json, raw_ref
from nexus_core.config import NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import step
from nexus_core.distill import review_store
from nexus_core.runner import Cost, RunContext, StepResult, run_step

REPO = Path(__file__).resolve().parents[2]
PAGES = REPO / "dashboards" / "views"

GOOD = ("We measure soil respiration in 12 randomised control plots and compare drought cycles. If rewetting "
        "drives the pulse then respiration predicts carbon loss; a flat response would refute it.")
ROWS = [
    {"row_id": "r1", "template_name": "hypothesis", "status": "ok", "input": "Soil drought?", "response": GOOD},
    {"row_id": "r2", "template_name": "hypothesis", "status": "ok", "input": "Sleep memory?", "response": "Too short."},
    {"row_id": "r3", "template_name": "methodology", "status": "ok", "input": "MEMS drift?",
     "response": GOOD.replace("soil", "sensor") + " As shown [3]."},
    {"row_id": "r4", "template_name": "hypothesis", "status": "failed", "input": "Coral?", "response": None},
    {"row_id": "r5", "template_name": "hypothesis", "status": "ok", "input": "Bees?",
     "response": GOOD.replace("soil", "hive")},
]


class SpendConfig(NexusModel):
    """Stand-in for a teacher or GPU step: records what it spent."""

    label: str = Field(description="What was spent on")
    cost: Cost = Field(description="The spend to record")


class SpendResult(StepResult):
    """Nothing but the cost."""


@step(area="dash")
def run_spend(cfg: SpendConfig, *, inputs: dict[str, ArtifactRef], out_uri: str, ctx: StepContext) -> SpendResult:
    """Write a receipt; the runner puts ``cost`` in the ledger."""
    atomic_write_json(Path(out_uri) / "receipt.json", {"label": cfg.label})
    return SpendResult(cost=cfg.cost)


def _fill(tmp: Path) -> dict:
    from nexus_core.corpus.ingest import IngestConfig, run_ingest
    from nexus_core.distill.filters import FiltersConfig, run_distill_filters
    from nexus_core.train.base_model import BaseModelConfig, run_base_model
    from nexus_core.train.sft import SFTConfig, run_sft

    raw = tmp / "teacher_rows.jsonl"
    # ``output`` makes the rows trainable as SFT pairs (input/output) after filtering.
    raw.write_text("".join(json.dumps({**r, "output": r["response"] or "No answer."}) + "\n" for r in ROWS))
    collected = run_step(run_ingest, IngestConfig(sources=[str(raw)], required_columns=["row_id", "response"],
                                                  dedupe_on=None),
                         name="dash_collected", inputs={"source_0": raw_ref(raw)})
    filtered = run_step(run_distill_filters, FiltersConfig(rules=str(REPO / "configs/distill/filters.yaml")),
                        name="dash_filtered", inputs={"collected": collected.ref})
    for row_id, decision in [("r1", "accept"), ("r2", "reject"), ("r3", "edit"), ("r2", "accept")]:
        review_store.add_label(filtered.ref.uri, row_id, decision, reviewer="ana",
                             edited_output="Fixed answer." if decision == "edit" else None, note=f"{decision} it")

    corpus = run_step(run_ingest, IngestConfig(sources=[str(REPO / "data/raw/scientific/abstracts.jsonl")]),
                      name="dash_corpus", inputs={"source_0": raw_ref(REPO / "data/raw/scientific/abstracts.jsonl")})
    base = run_step(run_base_model, BaseModelConfig.model_validate(
        {"source": "tiny", "text_column": "text",
         "tiny": {"vocab_size": 320, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}}),
        name="dash_base", inputs={"corpus": corpus.ref})
    sft = run_step(run_sft, SFTConfig.model_validate(
        {"max_steps": 4, "batch_size": 2, "max_length": 64, "logging_steps": 1, "learning_rate": 1e-3,
         "precision": "fp32"}),
        name="dash_sft", inputs={"model": base.ref, "data": filtered.ref})

    flow_run_id = "00000000-0000-0000-0000-00000000da5b"
    flow_mlflow = lineage.start_flow_run("distill", flow_run_id, {"budget_usd": 0.05, "name": "dash"})
    ctx = RunContext(flow_name="distill", flow_run_id=flow_run_id)
    run_step(run_spend, SpendConfig(label="teacher", cost=Cost(usd=0.04, tokens_in=1200, tokens_out=800,
                                                               provider="openai", model="gpt-4o-mini")),
             name="dash_teacher_spend", context=ctx)
    run_step(run_spend, SpendConfig(label="gpu", cost=Cost(usd=0.03, gpu_seconds=90.0, provider="lambda",
                                                           model="gpu_1x_a10")),
             name="dash_gpu_spend", context=ctx)
    lineage.end_run(flow_mlflow)

    return {"collected": collected.ref, "filtered": filtered.ref, "corpus": corpus.ref, "base": base.ref,
            "sft": sft.ref, "flow_run_id": flow_run_id}


@pytest.fixture(scope="session")
def filled_store(tmp_path_factory) -> dict:
    """The session store (NEXUS_HOME / NEXUS_DATA of conftest) after one real tiny run."""
    return _fill(tmp_path_factory.mktemp("dash-raw"))


@pytest.fixture(scope="session")
def evaluated(filled_store) -> dict:
    """The evaluation steps (tiny offline preset: heuristic judge, its gates) on the fixture's SFT model,
    each through run_step, and the report put on the leaderboard as the evaluate flow does."""
    from nexus_core.config import load_config
    from nexus_core.corpus.ingest import IngestConfig, run_ingest
    from nexus_core.evaluate.gates import GatesConfig, run_gates
    from nexus_core.evaluate.judge import JudgeConfig, run_judge
    from nexus_core.evaluate.predict import PredictConfig, run_predict
    from nexus_core.evaluate.records import record_report
    from nexus_core.evaluate.report import ReportConfig, run_report
    from nexus_core.evaluate.score import ScoreConfig, run_score

    preset = REPO / "configs/eval/tiny.yaml"
    raw = REPO / "data/raw/eval/tiny_validation.jsonl"
    dataset = run_step(run_ingest, IngestConfig(sources=[str(raw)], required_columns=["input", "output"],
                                                dedupe_on=None), name="dash_validation",
                       inputs={"validation": raw_ref(raw)}).ref
    predict_cfg = load_config(preset, PredictConfig, ["predict.max_new_tokens=4", "predict.run_id=dash"],
                              section="predict")
    preds = run_step(run_predict, predict_cfg, name="dash_predictions",
                     inputs={"model": filled_store["sft"], "dataset": dataset}).ref
    scores = run_step(run_score, load_config(preset, ScoreConfig, section="score"),
                      name="dash_scores", inputs={"predictions": preds}).ref
    judge_cfg = load_config(preset, JudgeConfig, [f"judge.rubric={REPO / 'configs/eval/rubric.json'}"],
                            section="judge")
    judged = run_step(run_judge, judge_cfg, name="dash_judged", inputs={"predictions": preds}).ref
    gates = run_step(run_gates, load_config(preset, GatesConfig, section="gates"), name="dash_gates",
                     inputs={"judged": judged, "scores": scores}).ref
    report = run_step(run_report, load_config(preset, ReportConfig, ["report.run_id=dash-eval"], section="report"),
                      name="dash_report",
                      inputs={"predictions": preds, "scores": scores, "judged": judged, "gates": gates})
    record_report(report.ref)
    return {"run_id": "dash-eval", "gate_passed": report.gate_passed, "report": report.ref}


@pytest.fixture(scope="session")
def suspended_run(prefect_harness, filled_store) -> str:
    """A real Prefect flow run named like the distill flow, in state Suspended, with its review request."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Suspended

    @flow(name="distill")
    def distill_standin() -> None:
        """Only its name matters: the run is created directly in the Suspended state."""

    with get_client(sync_client=True) as client:
        created = client.create_flow_run(distill_standin, name="dash-waiting",
                                         state=Suspended(timeout_seconds=3600))
    review_store.open_request(filled_store["filtered"].uri, str(created.id), "distill", filled_store["filtered"].rows)
    return str(created.id)


@pytest.fixture
def empty_store(tmp_path, monkeypatch) -> Path:
    """A fresh, empty data root, catalog and MLflow store (what a new checkout sees)."""
    monkeypatch.setenv("NEXUS_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("NEXUS_CATALOG_URL", f"sqlite:///{tmp_path / 'catalog.db'}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def app_test(page: str, timeout: float = 60):  # noqa: ANN201
    """An AppTest of one page file, run once."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(PAGES / page), default_timeout=timeout)
    at.run()
    return at


def texts(at) -> str:  # noqa: ANN001
    """Every text-like element of a rendered page, joined (for `in` assertions)."""
    parts = []
    for kind in ("title", "caption", "markdown", "info", "warning", "error", "success", "subheader", "metric"):
        for el in getattr(at, kind):
            parts.append(str(getattr(el, "value", "")) + " " + str(getattr(el, "label", "")))
    return "\n".join(parts)


os.environ.setdefault("STREAMLIT_BROWSER_GATHER_USAGE_STATS", "false")
# The app refuses to render on a non-loopback address without a login (dashboards/auth.py); the repo's
# .streamlit/config.toml says 127.0.0.1, this covers pytest started from another directory.
os.environ.setdefault("STREAMLIT_SERVER_ADDRESS", "127.0.0.1")
