"""Precomputed tower features (nexus_core/train/mm_features.py) on the tiny omni models: training from the
MDS shards gives the on-the-fly loss and weights for the same rows and seed, and a stage refuses shards
made with another tower, an unfrozen tower, or other row settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nexus_core.artifacts import ArtifactRef, raw_ref
from nexus_core.errors import InputError
from nexus_core.runner import run_step
from nexus_core.train.feature_shards import FeatureCollator, FeatureRows, merge_features, tower_digest
from nexus_core.train.mm_features import MMFeaturesConfig, features_config, run_mm_features
from nexus_core.train.mm_train import MMAlignConfig, MMSFTConfig, run_mm_train

REPO = Path(__file__).resolve().parents[2]
OMNI_DATA = REPO / "data" / "raw" / "omni"
FAST = {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "checkpoint": {"save_steps": 2}}


@pytest.fixture(scope="module")
def omni(tiny_llm) -> ArtifactRef:
    from nexus_core.train.omni import OmniConfig, run_omni

    r = run_step(run_omni, OmniConfig(vision="tiny"), name="t_feat_omni", inputs={"model": raw_ref(tiny_llm)})
    assert r.ref is not None
    return r.ref


@pytest.fixture(scope="module")
def audio_omni(tiny_llm) -> ArtifactRef:
    from nexus_core.train.omni import OmniConfig, run_omni

    r = run_step(run_omni, OmniConfig(vision="none", audio="tiny"), name="t_feat_audio_omni",
                 inputs={"model": raw_ref(tiny_llm)})
    assert r.ref is not None
    return r.ref


def _features(model: ArtifactRef, data: Path, name: str, **kw) -> ArtifactRef:
    r = run_step(run_mm_features, MMFeaturesConfig(batch_size=3, **kw), name=name,
                 inputs={"model": model, "data": raw_ref(data)})
    assert r.ref is not None and r.rows and r.metrics["media"] > 0
    return r.ref


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("stage, data", [
    (MMAlignConfig(**FAST), "captions.jsonl"),
    (MMSFTConfig(finetune="lora", **FAST), "instruct.jsonl"),
])
def test_training_from_features_matches_on_the_fly(omni, stage, data, tmp_path):
    feats = _features(omni, OMNI_DATA / data, f"t_feat_{stage.method}")
    meta = json.loads((feats.path / "mm_features.json").read_text())
    assert meta["tower_digest"] == tower_digest(omni.path) and meta["modality"] == "vision"
    live = run_step(run_mm_train, stage, name=f"t_live_{stage.method}",
                    inputs={"model": omni, "data": raw_ref(OMNI_DATA / data)})
    pre = run_step(run_mm_train, stage.model_copy(update={"precomputed": True}), name=f"t_pre_{stage.method}",
                   inputs={"model": omni, "data": raw_ref(OMNI_DATA / data), "features": feats})
    assert pre.metrics["train_loss"] == pytest.approx(live.metrics["train_loss"], rel=1e-5)
    assert pre.metrics["param_delta"] > 0
    a, b = _weights(live.ref.path), _weights(pre.ref.path)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)


def test_feature_loss_equals_model_forward_for_audio(audio_omni):
    """One batch of the audio model: the loss from stored features is the model's own forward loss."""
    from transformers import AutoModelForSeq2SeqLM, AutoProcessor

    from nexus_core.train.audio import audio_spec
    from nexus_core.train.audio_data import AudioCollator, audio_records, encode_audio_mm
    from nexus_core.train.data import load_rows

    feats = _features(audio_omni, OMNI_DATA / "audio_captions.jsonl", "t_feat_audio")
    base = audio_omni.path
    proc = AutoProcessor.from_pretrained(str(base))
    model = AutoModelForSeq2SeqLM.from_pretrained(str(base)).eval()
    spec = audio_spec(base, 30.0)
    df, where = load_rows(raw_ref(OMNI_DATA / "audio_captions.jsonl"))
    records, _ = audio_records(df, where, OMNI_DATA, spec)
    live_rows = [encode_audio_mm(proc, r, spec, 512) for r in records]
    stored = FeatureRows(feats.path / "mds", feats.path.parent / "t_audio_cache")
    assert len(stored) == len(live_rows)
    assert [list(stored[i]["input_ids"]) for i in range(len(stored))] == [r["input_ids"] for r in live_rows]
    live = AudioCollator(proc.feature_extractor, proc.tokenizer.pad_token_id, spec)(live_rows)
    batch = FeatureCollator(proc.tokenizer.pad_token_id)([stored[i] for i in range(len(stored))])
    with torch.no_grad():
        want = model(**live).loss
        got = model(inputs_embeds=merge_features(model, batch["input_ids"], batch["media_features"]),
                    attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    shutil.rmtree(feats.path.parent / "t_audio_cache", ignore_errors=True)


def test_refusals_other_tower_unfrozen_tower_other_settings(omni, tmp_path):
    feats = _features(omni, OMNI_DATA / "captions.jsonl", "t_feat_refuse")
    other = tmp_path / "other"
    shutil.copytree(omni.path, other)
    w = _weights(other)
    key = next(k for k in w if "vision_tower" in k and k.endswith("weight"))
    w[key] = w[key] + 1.0
    save_file(w, str(other / "model.safetensors"), metadata={"format": "pt"})
    (other / "manifest.json").unlink(missing_ok=True)
    data = raw_ref(OMNI_DATA / "captions.jsonl")
    with pytest.raises(InputError, match=r"were made with tower [0-9a-f]{16} .*but model .*other has tower [0-9a-f]{16}"):
        run_step(run_mm_train, MMAlignConfig(precomputed=True, **FAST), name="t_pre_other",
                 inputs={"model": raw_ref(other), "data": data, "features": feats})
    with pytest.raises(ValueError, match="frozen tower"):
        MMSFTConfig(precomputed=True, train_vision_tower=True)
    with pytest.raises(InputError, match=r"max_length: 64, but features .* max_length=512"):
        run_step(run_mm_train, MMAlignConfig(precomputed=True, max_length=64, **FAST), name="t_pre_len",
                 inputs={"model": omni, "data": data, "features": feats})
    with pytest.raises(InputError, match="needs the 'features' input"):
        run_step(run_mm_train, MMAlignConfig(precomputed=True, **FAST), name="t_pre_none",
                 inputs={"model": omni, "data": data})
    assert features_config(MMSFTConfig(max_length=96, video_fps=2.0)).model_dump() == MMFeaturesConfig(
        max_length=96, video_fps=2.0).model_dump()
