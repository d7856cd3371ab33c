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
        name, version = result.summary["registered"][stage].split("/")
        mv = client.get_model_version(name, version)
        m = read_manifest(result.artifacts[stage].uri)
        assert mv.source.endswith(result.artifacts[stage].uri.rsplit("/", 1)[-1])
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
    assert again.summary["registered"] == result.summary["registered"]


def test_dry_run_plans_without_training(tiny_run):
    cfg, result = tiny_run
    base = result.artifacts["base_model"].uri
    dry = llm_train(cfg.model_copy(update={"dry_run": True, "base_model": base}))
    assert dry.artifacts == {}
    assert dry.summary["base_model"]["modalities"] == ["text"]
    assert dry.summary["base_model"]["architecture"] == "LlamaForCausalLM"
    assert [q.split(":")[0] for q in dry.summary["queue"]] == ["1. sft", "2. dpo", "3. kd"]
