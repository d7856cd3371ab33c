"""configs/train/video_tiny.yaml end to end through the llm_train flow (tiny base → omni → mm_align →
mm_sft on the shipped GIFs, frames sampled by the stage's video settings), then the trained model
through the evaluate flow on the VQA set (configs/eval/vqa_tiny.yaml): the whole vision path on 2 cores."""

from __future__ import annotations

import pytest

from flows.common import load_flow_config
from flows.evaluate import EvaluateConfig, evaluate
from flows.llm_train import LLMTrainConfig, llm_train
from nexus_core.artifacts import read_manifest

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # two flows, 3 tiny training steps


def test_video_tiny_recipe_then_vqa_eval(prefect_harness, repo):
    from transformers import AutoModelForImageTextToText

    cfg = load_flow_config(LLMTrainConfig, str(repo / "configs/train/video_tiny.yaml"), ["name=video_e2e"])
    result = llm_train(cfg)
    assert list(result.artifacts) == ["ingest", "base_model", "omni", "align", "video"]
    video = read_manifest(result.artifacts["video"].uri)
    assert video.inputs["data"].name == "videos.jsonl" and video.result["steps"] == 4
    assert video.config["video_fps"] == 4 and video.config["video_max_frames"] == 4
    path = result.artifacts["video"].path
    assert type(AutoModelForImageTextToText.from_pretrained(str(path))).__name__ == "LlavaForConditionalGeneration"

    ev = evaluate(load_flow_config(EvaluateConfig, str(repo / "configs/eval/vqa_tiny.yaml"),
                                   [f"model={path}", "name=vqa_video_e2e"]))
    assert ev.summary["metrics"].keys() == {"vqa_exact_match", "vqa_accuracy"}
    assert read_manifest(ev.artifacts["predict"].uri).inputs["model"].digest == video.digest
