"""The llm_train flow on the tiny preset (quick), against a real Prefect API, MLflow store and registry."""

from __future__ import annotations

import pytest

from flows.common import load_flow_config
from flows.llm_train import LLMTrainConfig, llm_train
from nexus_core import lineage
from nexus_core.artifacts import read_manifest

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # a Prefect harness + 3 trainings: ~1-2 min


@pytest.fixture(scope="module")
def tiny_run(prefect_harness, repo):
    cfg = load_flow_config(LLMTrainConfig, str(repo / "configs/train/tiny.yaml"), [
        "name=lt", "quick=true", "quick_steps=2",
        f"corpus.sources=[{repo / 'data/raw/scientific/abstracts.jsonl'}]",
        f"datasets.chat={repo / 'data/raw/train/chat.jsonl'}", f"datasets.prefs={repo / 'data/raw/train/prefs.jsonl'}"])
    return cfg, llm_train(cfg)


def test_stages_chain_and_register_with_lineage(tiny_run):
    cfg, result = tiny_run
    assert list(result.artifacts) == ["ingest", "base_model", "sft", "dpo", "kd"]
    sft, dpo, kd = (read_manifest(result.artifacts[k].uri) for k in ("sft", "dpo", "kd"))
    assert dpo.inputs["model"].digest == sft.digest  # each stage consumes the previous stage's model
    assert kd.inputs["teacher"].digest == dpo.digest and kd.inputs["model"].name == "lt_base"
    assert sft.result["steps"] == 2  # quick
    assert sft.inputs["data"].name == "chat.jsonl"
    client = lineage.client()
    for stage in ("sft", "dpo", "kd"):
        name, version = result.registered[stage].split("/")
        mv = client.get_model_version(name, version)
        m = read_manifest(result.artifacts[stage].uri)
        assert mv.tags["nexus.artifact_uri"] == result.artifacts[stage].uri  # store-relative
        assert mv.source.endswith("/registered_model")  # an mlflow.transformers model in the run's artifacts
        assert mv.run_id == m.mlflow_run_id
        assert mv.tags["nexus.digest"] == m.digest
        assert m.inputs["data"].digest[:12] in mv.tags["nexus.inputs"]  # lineage to the dataset
    step_run = client.get_run(sft.mlflow_run_id)
    assert step_run.data.tags["mlflow.parentRunId"] == result.mlflow_run_id
    assert "train/loss" in step_run.data.metrics


def test_rerun_is_cached_and_registry_idempotent(tiny_run):
    cfg, result = tiny_run
    again = llm_train(cfg)
    assert again.artifacts == result.artifacts
    assert again.registered == result.registered


def test_dry_run_plans_without_training(tiny_run):
    cfg, result = tiny_run
    base = str(result.artifacts["base_model"].path)
    dry = llm_train(cfg.model_copy(update={"dry_run": True, "base_model": base}))
    assert dry.dry_run and dry.artifacts == {}
    assert dry.base_model["modalities"] == ["text"]
    assert dry.base_model["architecture"] == "LlamaForCausalLM"
    assert [q.split(":")[0] for q in dry.plan] == ["1. sft", "2. dpo", "3. kd"]


def test_a_bad_later_dataset_stops_the_run_before_the_first_stage(tiny_run, tmp_path):
    """The DPO stage's data has no chosen/rejected: the run fails up front, naming the stage and the
    file, and SFT never trains (no new version of any stage)."""
    from nexus_core.artifacts import list_versions
    from nexus_core.errors import InputError

    cfg, result = tiny_run
    bad = tmp_path / "prefs_without_pairs.jsonl"
    bad.write_text('{"prompt": "Hi?", "answer": "Hello."}\n')
    before = {s: list_versions("train", f"bad_{s}") for s in ("sft", "dpo", "kd")}
    broken = cfg.model_copy(update={"name": "bad", "datasets": {**cfg.datasets, "prefs": str(bad)},
                                    "base_model": result.artifacts["base_model"].uri})
    with pytest.raises(InputError) as err:
        llm_train(broken)
    assert "stage dpo" in str(err.value) and "prefs_without_pairs.jsonl" in str(err.value)
    assert "chosen/rejected" in str(err.value)
    assert {s: list_versions("train", f"bad_{s}") for s in ("sft", "dpo", "kd")} == before == {
        "sft": [], "dpo": [], "kd": []}
