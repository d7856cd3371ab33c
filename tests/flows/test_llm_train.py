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


def _mix_config(cfg, repo, name: str, **stage) -> LLMTrainConfig:
    return LLMTrainConfig.model_validate({
        **cfg.model_dump(include={"datasets"}), "name": name, "quick": True, "quick_steps": 2,
        "stages": [{"name": "sft", "train": {"method": "sft", "finetune": "lora", "batch_size": 4}, **stage}]})


def test_a_stage_mixes_datasets_by_weight_and_evaluates_on_its_eval_dataset(tiny_run, repo):
    """datasets: [{ref, weight}] reaches the step as data, data_1 (both in the manifest) with the weights in
    its config; eval_dataset as its eval_data (eval loss in the result); refs may be keys or paths."""
    cfg, result = tiny_run
    reasoning = str(repo / "data/raw/train/reasoning.jsonl")
    mix = _mix_config(cfg, repo, "mix", datasets=[{"ref": "chat", "weight": 3}, {"ref": reasoning, "weight": 1}],
                      eval_dataset="chat")
    assert mix.stages[0].dataset == "chat"
    out = llm_train(mix, base_model=result.artifacts["base_model"])
    m = read_manifest(out.artifacts["sft"].uri)
    assert m.inputs["data"].name == "chat.jsonl" and m.inputs["data_1"].name == "reasoning.jsonl"
    assert m.inputs["eval_data"].name == "chat.jsonl"
    assert m.config["data_weights"] == [3.0, 1.0]
    assert m.result["eval_loss"] is not None and m.result["metrics"]["eval_rows"] == 8
    assert (m.result["metrics"]["mix_rows_data"], m.result["metrics"]["mix_rows_data_1"]) == (12, 4)


def test_a_bad_mix_ref_is_named_before_training(tiny_run, repo):
    from nexus_core.errors import InputError

    cfg, result = tiny_run
    base = result.artifacts["base_model"]
    bad = _mix_config(cfg, repo, "badmix", datasets=[{"ref": "chat"}, {"ref": "no_such_dataset@v9"}])
    with pytest.raises(InputError, match=r"stages\.sft\.datasets\[1\]\.ref 'no_such_dataset@v9'"):
        llm_train(bad, base_model=base)
    prefs = _mix_config(cfg, repo, "badmix", datasets=[{"ref": "chat"}, {"ref": "prefs"}])
    with pytest.raises(InputError, match=r"stage sft \(datasets\[1\]\).*prefs\.jsonl"):
        llm_train(prefs, base_model=base)
    with pytest.raises(ValueError, match=r"stages\[0\]\.datasets: only sft, dpo, orpo and reward"):
        LLMTrainConfig.model_validate({"stages": [{"name": "c", "datasets": [{"ref": "chat"}],
                                                   "train": {"method": "cpt"}}]})
