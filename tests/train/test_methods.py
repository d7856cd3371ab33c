"""Every training method trains the tiny model for a few steps on CPU through the real spine:
loss finite, trainable parameters changed, artifact saved and loaded back (LoRA: adapter onto base)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nexus_core import lineage
from nexus_core.artifacts import read_manifest
from nexus_core.runner import run_step
from nexus_core.train.cpt import CPTConfig, run_cpt
from nexus_core.train.dpo import DPOConfig, run_dpo
from nexus_core.train.grpo import GRPOConfig, run_grpo
from nexus_core.train.kd import KDConfig, run_kd
from nexus_core.train.orpo import ORPOConfig, run_orpo
from nexus_core.train.reward import RewardConfig, run_reward
from nexus_core.train.sft import SFTConfig, run_sft
from tests.train.conftest import QA, _write_jsonl, teacher_logprobs

FAST = {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-3, "checkpoint": {"save_steps": 2}}


def _weights(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "model.safetensors"))


def _changed(base: str, trained: str) -> float:
    a, b = _weights(base), _weights(trained)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if k in b)


def _check_model(result, base_uri: str, lora: bool) -> None:
    assert math.isfinite(result.metrics["train_loss"])
    assert result.metrics["param_delta"] > 0
    uri = str(result.ref.path)
    assert (Path(uri) / "config.yaml").is_file() and (Path(uri) / "manifest.json").is_file()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(uri)
    assert AutoTokenizer.from_pretrained(uri).chat_template
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size
    assert _changed(base_uri, uri) > 0  # merged (or full) weights differ from the base
    if lora:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(base_uri)
        adapted = PeftModel.from_pretrained(base, str(Path(uri) / "adapter"))
        assert any("lora_" in n for n, _ in adapted.named_parameters())


def test_sft_lora_logs_to_mlflow_and_adapter_loads_onto_base(tiny_model, refs):
    cfg = SFTConfig(finetune="lora", seed=1, **FAST)
    r = run_step(run_sft, cfg, name="t_sft_lora", inputs={"model": tiny_model, "data": refs["sft"]})
    _check_model(r, str(tiny_model.path), lora=True)
    assert r.trainable_params < r.total_params
    run = lineage.client().get_run(read_manifest(r.ref.uri).mlflow_run_id)
    assert "train/loss" in run.data.metrics and "train/grad_norm" in run.data.metrics
    history = lineage.client().get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert run.data.tags["nexus.last_checkpoint"].endswith("checkpoint-3")


def test_sft_full_with_packing(tiny_model, refs):
    cfg = SFTConfig(finetune="full", packing=True, seed=2, **FAST)
    r = run_step(run_sft, cfg, name="t_sft_full", inputs={"model": tiny_model, "data": refs["sft"]})
    _check_model(r, str(tiny_model.path), lora=False)
    assert r.trainable_params == r.total_params


def test_cpt_streams_large_corpus_and_scales_rope(tiny_model, refs):
    cfg = CPTConfig(finetune="full", max_length=64, stream_threshold_mb=0, rope_scaling={"factor": 2.0}, **FAST)
    r = run_step(run_cpt, cfg, name="t_cpt", inputs={"model": tiny_model, "data": refs["text"]})
    _check_model(r, str(tiny_model.path), lora=False)
    assert r.streamed
    conf = json.loads((r.ref.path / "config.json").read_text())
    base = json.loads((tiny_model.path / "config.json").read_text())
    assert conf["max_position_embeddings"] == 2 * base["max_position_embeddings"]
    assert conf["rope_scaling"]["factor"] == 2.0


@pytest.mark.parametrize(("fn", "cfg", "lora"), [
    (run_dpo, DPOConfig(finetune="lora", eval_split=0.25, **FAST), True),
    (run_orpo, ORPOConfig(finetune="full", **FAST), False),
])
def test_preference_methods(tiny_model, refs, fn, cfg, lora):
    r = run_step(fn, cfg, name=f"t_{cfg.method}", inputs={"model": tiny_model, "data": refs["prefs"]})
    _check_model(r, str(tiny_model.path), lora=lora)
    if cfg.eval_split:  # 2 of 8 pairs held out; evaluated at the checkpoint (step 2) and on the final weights
        assert r.metrics["eval_rows"] == 2 and r.metrics["evaluations"] == 1
        assert r.eval_loss is not None and math.isfinite(r.eval_loss) and not r.stopped_early
    else:
        assert r.eval_loss is None and "eval_rows" in r.metrics and r.metrics["eval_rows"] == 0


def test_reward_model_then_grpo_against_it(tiny_model, refs):
    from transformers import AutoModelForSequenceClassification

    rm = run_step(run_reward, RewardConfig(finetune="lora", **FAST), name="t_rm",
                  inputs={"model": tiny_model, "data": refs["prefs"]})
    assert rm.metrics["param_delta"] > 0
    scorer = AutoModelForSequenceClassification.from_pretrained(str(rm.ref.path))
    assert scorer(torch.tensor([[1, 2, 3]])).logits.shape == (1, 1)
    cfg = GRPOConfig(finetune="lora", rewards=["exact_match", "format"], num_generations=2,
                     reward_funcs=["tests.train.custom_rewards:brevity"], max_completion_length=6, **FAST)
    r = run_step(run_grpo, cfg, name="t_grpo",
                 inputs={"model": tiny_model, "data": refs["math"], "reward_model": rm.ref})
    _check_model(r, str(tiny_model.path), lora=True)
    manifest = read_manifest(r.ref.uri)
    assert manifest.inputs["reward_model"].digest == rm.ref.digest
    assert any(f.endswith("custom_rewards.py") for f in manifest.files)  # its source is in the cache key
    metrics = lineage.client().get_run(manifest.mlflow_run_id).data.metrics
    assert "train/rewards/brevity/mean" in metrics  # the function named by import path scored completions


def test_kd_from_teacher_model_and_from_stored_logprobs(tiny_model, refs, tmp_path):
    teacher = run_step(run_sft, SFTConfig(finetune="full", seed=3, **FAST), name="t_teacher",
                       inputs={"model": tiny_model, "data": refs["sft"]}).ref
    r = run_step(run_kd, KDConfig(source="model", divergence="reverse", finetune="full", **FAST),
                 name="t_kd_model", inputs={"model": tiny_model, "data": refs["sft"], "teacher": teacher})
    _check_model(r, str(tiny_model.path), lora=False)
    # Teacher collection rows as the distill flow writes them (contract 2), logprobs from the teacher.
    rows = [{"row_id": str(i), "user_prompt": q, "response": a, "status": "ok",
             "logprobs_json": teacher_logprobs(teacher.path, q, a)} for i, (q, a) in enumerate(QA)]
    rows.append({"row_id": "x", "user_prompt": "q", "response": None, "status": "failed", "logprobs_json": None})
    from nexus_core.artifacts import raw_ref

    collected = raw_ref(_write_jsonl(tmp_path / "collected.jsonl", rows))
    r = run_step(run_kd, KDConfig(source="logprobs", finetune="lora", **FAST), name="t_kd_lp",
                 inputs={"model": tiny_model, "data": collected})
    _check_model(r, str(tiny_model.path), lora=True)
