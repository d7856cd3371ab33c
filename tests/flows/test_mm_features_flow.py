"""The omni tiny preset with precomputed tower features through the llm_train flow (real Prefect API,
MLflow store): each mm stage gets a features step (MDS shards) first and trains from it; the stage's
manifest names the features artifact, whose tower digest is its model's; the final model loads."""

from __future__ import annotations

import json

import pytest

from flows.common import load_flow_config
from flows.llm_train import LLMTrainConfig, llm_train
from nexus_core.artifacts import read_manifest
from nexus_core.train.feature_shards import tower_digest

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # a Prefect harness + 5 tiny steps: ~30 s on 2 cores


def test_omni_tiny_with_precomputed_features(prefect_harness, repo):
    from transformers import AutoModelForImageTextToText

    cfg = load_flow_config(LLMTrainConfig, str(repo / "configs/train/omni_tiny.yaml"), ["name=omni_feat"])
    cfg = cfg.model_copy(update={"stages": [s.model_copy(update={"train": s.train.model_copy(
        update={"precomputed": True})}) for s in cfg.stages]})
    result = llm_train(cfg)
    for name, model in (("align", "omni"), ("vqa", "align")):
        stage = read_manifest(result.artifacts[name].uri)
        feats = stage.inputs["features"]
        meta = json.loads((feats.path / "mm_features.json").read_text())
        assert feats.name.startswith(f"omni_feat_{name}_features")
        assert stage.inputs["model"].digest == result.artifacts[model].digest
        assert meta["tower_digest"] == tower_digest(result.artifacts[model].path) and meta["rows"] > 0
    vqa = read_manifest(result.artifacts["vqa"].uri)
    assert vqa.result["steps"] == 4 and result.losses["vqa"] > 0
    AutoModelForImageTextToText.from_pretrained(str(result.artifacts["vqa"].path))
