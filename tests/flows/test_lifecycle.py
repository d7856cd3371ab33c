"""The lifecycle flow on the tiny preset, against a real (temporary) Prefect API and MLflow store."""

import pytest

from flows.common import load_flow_config
from flows.lifecycle import LifecycleConfig, lifecycle
from nexus_core import catalog, lineage
from nexus_core.artifacts import read_manifest
from nexus_core.models.tiny import load_llm

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def first_run(prefect_harness, repo):
    cfg = load_flow_config(LifecycleConfig, str(repo / "configs/presets/tiny.yaml"),
                           [f"corpus.sources=[{repo / 'data/raw/scientific/abstracts.jsonl'}]", "name=lc"])
    return cfg, lifecycle(cfg)


def test_every_step_leaves_manifest_catalog_row_and_nested_mlflow_run(first_run):
    cfg, result = first_run
    assert list(result.artifacts) == ["ingest", "base_model"]
    flow_run = lineage.client().get_run(result.mlflow_run_id)
    assert flow_run.data.tags["prefect.flow_run_id"] == result.flow_run_id
    assert flow_run.info.status == "FINISHED"
    for ref in result.artifacts.values():
        m = read_manifest(ref.uri)
        assert m.prefect["flow_run_id"] == result.flow_run_id
        assert m.prefect["task_run_id"]
        step_run = lineage.client().get_run(m.mlflow_run_id)
        assert step_run.data.tags["mlflow.parentRunId"] == result.mlflow_run_id
        assert [r for r in catalog.artifacts() if r.uri == m.uri]
    corpus = read_manifest(result.artifacts["ingest"].uri)
    assert corpus.rows == 16
    base = read_manifest(result.artifacts["base_model"].uri)
    assert base.inputs["corpus"].digest == corpus.digest  # the model traces back to its rows


def test_base_model_loads_through_from_pretrained(first_run):
    _, result = first_run
    model, tokenizer = load_llm(result.artifacts["base_model"].uri)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Soil respiration"}],
                                        add_generation_prompt=True, return_tensors="pt")
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_second_run_is_served_from_cache(first_run):
    cfg, result = first_run
    again = lifecycle(cfg)
    assert again.artifacts == result.artifacts
    assert again.flow_run_id != result.flow_run_id
