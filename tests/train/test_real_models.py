"""Training on models as they are released: given by hub id from the HF cache (offline), with a chat
template that has no ``{% generation %}`` markers, saved in bf16; fp32 master weights under bf16
autocast; LoRA + gradient checkpointing in the stages that build their own trainer (CPT, KD)."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nexus_core.artifacts import raw_ref
from nexus_core.config import repo_root
from nexus_core.errors import InputError
from nexus_core.runner import run_step
from nexus_core.train.chat import (
    TEMPLATE_DIR,
    encode_chat,
    model_has_template,
    queue_template_problems,
    stage_tokenizer,
)
from nexus_core.train.sft import SFTConfig, run_sft
from tests.train.conftest import QA

SHA = "fedcba9876543210fedcba9876543210fedcba98"
HUB_ID = "nexus-test/tiny-chat"
TALK = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And three plus three?"}, {"role": "assistant", "content": "Six."}]


def _no_template(src: Path, dest: Path) -> Path:
    """A copy of a model directory whose tokenizer has no chat template (a base model)."""
    shutil.copytree(src, dest)
    (dest / "chat_template.jinja").unlink(missing_ok=True)
    conf = json.loads((dest / "tokenizer_config.json").read_text())
    conf.pop("chat_template", None)
    (dest / "tokenizer_config.json").write_text(json.dumps(conf))
    assert not model_has_template(dest)
    return dest


@pytest.fixture
def released(tiny_model, tmp_path, monkeypatch) -> Path:
    """The tiny model as a chat model is released: bf16 weights, the Qwen2.5 template (no generation
    markers), in a Hugging Face cache laid out as huggingface_hub writes it, read offline."""
    from transformers import AutoModelForCausalLM

    cache = tmp_path / "hub"
    snapshot = cache / "models--nexus-test--tiny-chat" / "snapshots" / SHA
    _no_template(tiny_model.path, snapshot)
    AutoModelForCausalLM.from_pretrained(snapshot).to(torch.bfloat16).save_pretrained(snapshot)
    tok = stage_tokenizer(SFTConfig(chat_template="qwen2.5"), snapshot)
    tok.save_pretrained(snapshot)
    (cache / "models--nexus-test--tiny-chat" / "refs").mkdir()
    (cache / "models--nexus-test--tiny-chat" / "refs" / "main").write_text(SHA)
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return snapshot


def _loss_text(tok, enc) -> str:  # noqa: ANN001
    return "".join(tok.decode([i]) for i, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m)


@pytest.mark.parametrize(("name", "expected"), [
    ("qwen2.5", "Four.<|im_end|>\nSix.<|im_end|>\n"),
    ("llama3", "Four.<|eot_id|>Six.<|eot_id|>"),
])
def test_assistant_tokens_found_without_generation_markers(tiny_model, name, expected):
    """Shipped Qwen2.5 / Llama 3 templates have no generation markers; the loss still falls on exactly the
    assistant turns and their end-of-turn marks, nothing of the system prompt, user turns or headers."""
    assert not re.search(r"{%-?\s*generation", (repo_root() / TEMPLATE_DIR / f"{name}.jinja").read_text())
    tok = stage_tokenizer(SFTConfig(chat_template=name), tiny_model.path)
    enc = encode_chat(tok, TALK, 512)
    assert _loss_text(tok, enc) == expected
    assert tok.decode(enc["input_ids"]).count("What is two plus two?") == 1
    assert _loss_text(tok, encode_chat(tok, TALK, 512, assistant_only=False)) == tok.decode(enc["input_ids"])


def test_template_that_is_not_prefix_stable_is_refused(tiny_model):
    tok = stage_tokenizer(SFTConfig(), tiny_model.path)
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% if loop.last %}[end]{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}>{% endif %}")
    with pytest.raises(InputError, match="not prefix-stable"):
        encode_chat(tok, TALK, 512)


def test_base_model_without_template_fails_up_front_unless_one_is_configured(tiny_model, refs, tmp_path):
    base = raw_ref(_no_template(tiny_model.path, tmp_path / "base"))
    with pytest.raises(InputError, match=r"has no chat template.*chat_template: .*chatml, qwen2.5, llama3"):
        run_step(run_sft, SFTConfig(max_steps=1), name="t_notemplate", inputs={"model": base, "data": refs["sft"]})
    with pytest.raises(InputError, match="neither a file nor a shipped template"):
        run_step(run_sft, SFTConfig(max_steps=1, chat_template="nope"), name="t_notemplate",
                 inputs={"model": base, "data": refs["sft"]})

    # the flow's check walks the queue: the template a stage sets is carried to the stages after it
    class S:
        def __init__(self, name, train, model=None):  # noqa: ANN001
            self.name, self.train, self.model, self.dataset = name, train, model, "sft"

    plain, fixed = SFTConfig(), SFTConfig(chat_template="chatml")
    data = {"sft": refs["sft"]}
    (problem,) = queue_template_problems([S("a", plain)], base, {}, data)
    assert problem.startswith("stages.a") and "has no chat template" in problem
    assert queue_template_problems([S("a", fixed), S("b", plain)], base, {}, data) == []
    assert queue_template_problems([S("a", fixed), S("b", plain, model="base")], base, {}, data)[0].startswith(
        "stages.b")
    assert queue_template_problems([S("a", plain)], None, {}, data) == []  # the tiny base built at run time


def test_pure_bf16_is_opt_in_and_loses_small_updates(released, refs, tmp_path, caplog):
    """pure_bf16 keeps no fp32 master copy: at lr 2e-5 most updates round away (warned); the saved
    weights stay bf16. (The fp32-master case, with most weights changed, is the flow test below.)"""
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = SFTConfig(finetune="full", precision="pure_bf16", learning_rate=2e-5, lr_scheduler="constant",
                    max_steps=4, batch_size=2, checkpoint={"save_steps": 100})
    with caplog.at_level(logging.WARNING, logger="nexus_core.train.common"):
        r = run_step(run_sft, cfg, name="t_pure", inputs={"model": raw_ref(released), "data": raw_ref(data)})
    assert "no fp32 master copy" in caplog.text
    assert r.metrics["param_changed_frac"] < 0.45
    saved = load_file(str(r.ref.path / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}


def test_hub_chat_model_trains_full_bf16_then_cpt_and_kd_with_lora_and_checkpointing(
        prefect_harness, released, refs, train_files, tmp_path, data_root):
    """The issue's acceptance run: a chat model by hub id from the HF cache (offline), its template without
    generation markers, full SFT under bf16 autocast at lr 2e-5 with most weights really updated compared
    at bf16 (the dtype it is saved in), then CPT and KD (teacher by hub id) with LoRA + gradient
    checkpointing."""
    from flows.llm_train import LLMTrainConfig, llm_train

    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n" for q, a in QA))
    lora_gc = {"finetune": "lora", "gradient_checkpointing": True, "batch_size": 2}
    cfg = LLMTrainConfig(
        name="hub", base_model=HUB_ID, register_models=False, quick=True, quick_steps=4,
        datasets={"chat": str(chat), "text": str(train_files["text"]), "qa": str(train_files["sft"])},
        stages=[
            {"name": "sft", "dataset": "chat", "train": {"method": "sft", "finetune": "full", "precision": "bf16",
                                                        "learning_rate": 2e-5, "lr_scheduler": "constant",
                                                        "batch_size": 2}},
            {"name": "cpt", "dataset": "text", "train": {"method": "cpt", "max_length": 32, **lora_gc}},
            {"name": "kd", "dataset": "qa", "teacher": HUB_ID, "train": {"method": "kd", **lora_gc}},
        ])
    result = llm_train(cfg)
    from nexus_core.artifacts import read_manifest

    sft, cpt, kd = (read_manifest(result.artifacts[k].uri) for k in ("sft", "cpt", "kd"))
    assert sft.inputs["model"].digest == f"hf:{HUB_ID}@{SHA}"  # resolved through huggingface_hub's cache
    assert kd.inputs["teacher"].digest == f"hf:{HUB_ID}@{SHA}"
    assert sft.metrics["param_changed_frac"] > 0.5  # fp32 master weights: most bf16 values moved
    saved, before = load_file(str(result.artifacts["sft"].path / "model.safetensors")), load_file(
        str(released / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}  # saved as released, not doubled to fp32
    changed = sum(int((saved[k] != before[k]).sum()) for k in before) / sum(t.numel() for t in before.values())
    assert changed > 0.5  # the file itself, not only the metric
    for m in (cpt, kd):
        assert m.metrics["param_delta"] > 0 and m.result["steps"] == 4
        assert (result.artifacts[m.name.split("_")[-1]].path / "adapter").is_dir()
    trained_tok = stage_tokenizer(SFTConfig(), result.artifacts["kd"].path)
    assert "You are Qwen" in trained_tok.apply_chat_template(TALK[:1], tokenize=False)  # the template travels


def test_hub_ids_and_missing_paths_for_every_model_role(released, tmp_path):
    """Base, teacher and reward models resolve by hub id; a missing path is reported as a missing path."""
    from flows.llm_train import LLMTrainConfig, referenced_models

    cfg = LLMTrainConfig(datasets={"d": "x"}, stages=[
        {"name": "kd", "dataset": "d", "teacher": HUB_ID, "train": {"method": "kd"}},
        {"name": "rl", "dataset": "d", "reward_model": f"{HUB_ID}@{SHA}", "train": {"method": "grpo"}}])
    named = referenced_models(cfg)
    assert {k: v.digest for k, v in named.items()} == {HUB_ID: f"hf:{HUB_ID}@{SHA}",
                                                       f"{HUB_ID}@{SHA}": f"hf:{HUB_ID}@{SHA}"}
    ghost = str(tmp_path / "models" / "gone")
    bad = cfg.model_copy(update={"stages": [cfg.stages[0].model_copy(update={"teacher": ghost})]})
    with pytest.raises(InputError) as err:
        referenced_models(bad)
    assert "stages.kd.teacher" in str(err.value) and ghost in str(err.value)
    assert "no such file or directory" in str(err.value) and "dataset" not in str(err.value)
