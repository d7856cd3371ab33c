"""The omni audio tiny preset end to end through the llm_train flow (real Prefect API, MLflow store and
registry): tiny base → omni (tiny Whisper + projector, the Qwen2-Audio sibling) → mm_align → mm_sft, the
final model answering a clip through plain transformers; without the omni section the dry run stops with
"modality validation failed"."""

from __future__ import annotations

import pytest

from flows.common import load_flow_config
from flows.llm_train import LLMTrainConfig, llm_train
from nexus_core.artifacts import read_manifest
from nexus_core.errors import ConfigError

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # a Prefect harness + 5 tiny steps: ~35 s on 2 cores


def test_omni_audio_tiny_preset_end_to_end(prefect_harness, repo):
    import torch
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    from nexus_core.train.audio import AudioSpec, load_audio

    cfg = load_flow_config(LLMTrainConfig, str(repo / "configs/train/omni_audio_tiny.yaml"), ["name=omni_audio_e2e"])
    result = llm_train(cfg)
    assert list(result.artifacts) == ["ingest", "base_model", "omni", "align", "aqa"]
    omni, align, aqa = (read_manifest(result.artifacts[k].uri) for k in ("omni", "align", "aqa"))
    assert omni.result["architecture"] == "Qwen2AudioForConditionalGeneration"
    assert align.inputs["model"].digest == omni.digest and aqa.inputs["model"].digest == align.digest
    assert aqa.inputs["data"].name == "audio_instruct.jsonl" and aqa.result["steps"] == 4
    assert set(result.registered) == {"align", "aqa"}

    path = str(result.artifacts["aqa"].path)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(path)
    proc = AutoProcessor.from_pretrained(path)
    chat = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Is the sound high or low?"}]}]
    clip = load_audio(repo / "data/raw/omni/audio/low_330.wav", AudioSpec(16000, 30.0))
    enc = proc(text=[proc.apply_chat_template(chat, add_generation_prompt=True)], audio=[clip], sampling_rate=16000,
               return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 4

    text_only = cfg.model_copy(update={"omni": None, "dry_run": True, "name": "omni_audio_missing"})
    with pytest.raises(ConfigError, match="stages.align: modality validation failed: the data needs audio"):
        llm_train(text_only)
