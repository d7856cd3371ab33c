"""The omni tiny preset end to end through the llm_train flow (real Prefect API, MLflow store and
registry): tiny base → omni (tiny SigLIP + projector) → mm_align → mm_sft, the final model answering an
image through plain AutoModelForImageTextToText / AutoProcessor; without the omni section the dry run
stops with "modality validation failed"."""

from __future__ import annotations

import pytest

from flows.common import load_flow_config
from flows.llm_train import LLMTrainConfig, llm_train
from nexus_core.artifacts import read_manifest
from nexus_core.errors import ConfigError

pytestmark = [pytest.mark.integration]  # a Prefect harness + 3 tiny steps: ~30 s on 2 cores


def test_omni_tiny_preset_end_to_end(prefect_harness, repo):
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cfg = load_flow_config(LLMTrainConfig, str(repo / "configs/train/omni_tiny.yaml"), ["name=omni_e2e"])
    result = llm_train(cfg)
    assert list(result.artifacts) == ["ingest", "base_model", "omni", "align", "vqa"]
    omni, align, vqa = (read_manifest(result.artifacts[k].uri) for k in ("omni", "align", "vqa"))
    assert align.inputs["model"].digest == omni.digest and vqa.inputs["model"].digest == align.digest
    assert vqa.inputs["data"].name == "instruct.jsonl" and vqa.result["steps"] == 4
    assert set(result.registered) == {"align", "vqa"}

    path = str(result.artifacts["vqa"].path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    proc = AutoProcessor.from_pretrained(path)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]
    enc = proc(text=[proc.apply_chat_template(chat, add_generation_prompt=True)],
               images=[Image.open(repo / "data/raw/omni/images/blue_circle.png")], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 4

    text_only = cfg.model_copy(update={"omni": None, "dry_run": True, "name": "omni_missing"})
    with pytest.raises(ConfigError, match="stages.align: modality validation failed: the data needs vision"):
        llm_train(text_only)
