"""The podcast flow on the tiny preset, offline: recorded teacher → filters + script check → review →
regeneration → final check → SFT dataset + tiny two-speaker VITS → WAV episodes with timed scripts."""

from __future__ import annotations

import json
import wave

import polars as pl
import pytest

from flows.common import load_flow_config
from flows.podcast import PodcastConfig, podcast
from nexus_core.artifacts import list_versions, read_manifest

pytestmark = pytest.mark.integration

STAGES = ["teacher_inputs", "collected", "ruled", "filtered", "reviewed", "regenerated", "scripts", "sft", "tts",
          "episodes"]


@pytest.fixture(scope="module")
def tiny_run(prefect_harness, repo):
    cfg = load_flow_config(PodcastConfig, str(repo / "configs/podcast/tiny.yaml"), ["name=ptiny"])
    return cfg, podcast(cfg)


def test_tiny_recipe_writes_two_speaker_scripts_and_wavs_a_plain_reader_opens(tiny_run):
    cfg, result = tiny_run
    assert list(result.artifacts) == STAGES
    assert result.episode_count == 3 and result.scripts_kept == 3
    assert result.scripts_rejected == {"one_speaker": 1} and result.regenerated_rescued == 1  # the monologue
    root = result.episodes.path
    manifest = read_manifest(result.episodes.uri)
    assert manifest.kind == "dataset" and manifest.rows == 3 and manifest.metrics["episodes"] == 3
    assert manifest.inputs["tts"].digest == result.artifacts["tts"].digest  # the voices trace to their model
    assert manifest.inputs["scripts"].digest == result.artifacts["scripts"].digest
    records = [json.loads(line) for line in (root / "scripts.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for rec in records:
        assert {t["speaker"] for t in rec["turns"]} == {"HOST", "GUEST"}
        with wave.open(str(root / rec["wav"]), "rb") as fh:  # the standard library's reader
            seconds = fh.getnframes() / fh.getframerate()
            assert fh.getnchannels() == 1 and fh.getframerate() == 16000
        assert seconds >= 0.5 and abs(seconds - rec["turns"][-1]["end_s"]) < 2e-3
        assert all(t["end_s"] - t["start_s"] >= 0.5 - 1e-3 for t in rec["turns"])
        assert [t["start_s"] for t in rec["turns"]] == sorted(t["start_s"] for t in rec["turns"])
        assert json.loads((root / rec["wav"].replace(".wav", ".json")).read_text()) == rec
    assert abs(result.audio_seconds - sum(r["duration_s"] for r in records)) < 0.01
    assert any(t["padded_s"] > 0 for r in records for t in r["turns"])  # the tiny voices need the padding


def test_scripts_trace_to_the_teacher_and_feed_an_sft_dataset(tiny_run):
    _, result = tiny_run
    collected = pl.read_parquet(result.artifacts["collected"].path / "data.parquet")
    assert (collected["status"] == "ok").all() and collected["cached"].all()  # the recorded teacher, offline
    filtered = pl.read_parquet(result.artifacts["filtered"].path / "data.parquet")
    rejected = filtered.filter(~pl.col("keep"))
    assert rejected["reason"].to_list() == ["one_speaker"] and rejected["script_detail"][0]
    regen = pl.read_parquet(result.artifacts["regenerated"].path / "data.parquet")
    assert regen.filter(pl.col("origin") == "regenerated").height == 1
    sft = pl.read_parquet(result.artifacts["sft"].path / "data.parquet")
    assert sft.height == 3
    assert all(line.startswith(("HOST: ", "GUEST: ")) for out in sft["output"] for line in out.splitlines())
    assert all("Document:" in i for i in sft["input"])


def test_the_podcast_training_recipe_accepts_the_scripts(tiny_run, repo):
    """configs/train/podcast_tiny.yaml checked against this run's SFT artifact (a dry run: every stage's
    dataset against its trainer's contract; the training itself is the llm_train flow's, tested there)."""
    from flows.llm_train import LLMTrainConfig, llm_train

    _, result = tiny_run
    cfg = load_flow_config(LLMTrainConfig, str(repo / "configs/train/podcast_tiny.yaml"),
                           ["dry_run=true", f"datasets.podcast={result.sft.uri}"])
    planned = llm_train(cfg)
    assert planned.dry_run and planned.plan[0].startswith("1. podcast: sft (lora) on podcast")


def test_rerun_is_served_from_cache(tiny_run):
    cfg, first = tiny_run
    again = podcast(cfg)
    assert again.artifacts == first.artifacts and again.flow_run_id != first.flow_run_id
    assert list_versions("podcast", "ptiny_episodes") == [1]  # nothing synthesised twice
