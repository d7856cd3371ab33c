"""The distill flow on the tiny preset: all six stages offline, through the real litellm client path."""

from __future__ import annotations

import json

import polars as pl
import pytest

from flows.common import load_flow_config
from flows.distill import DistillConfig, distill
from nexus_core import catalog, lineage
from nexus_core.artifacts import read_manifest

pytestmark = pytest.mark.integration

STAGES = ["teacher_inputs", "collected", "filtered", "reviewed", "regenerated", "sft"]


@pytest.fixture(scope="module")
def tiny_run(prefect_harness, repo):
    cfg = load_flow_config(DistillConfig, str(repo / "configs/distill/tiny.yaml"), ["name=dtiny"])
    return cfg, distill(cfg)


def test_six_stages_offline_with_manifests_and_mlflow_runs(tiny_run):
    _, result = tiny_run
    assert list(result.artifacts) == STAGES
    assert result.offline_misses == 0 and result.collected_ok == 40
    assert result.teacher_usd == 0.0
    for ref in result.artifacts.values():
        m = read_manifest(ref.uri)
        assert m.prefect["flow_run_id"] == result.flow_run_id
        run = lineage.client().get_run(m.mlflow_run_id)
        assert run.data.tags["mlflow.parentRunId"] == result.mlflow_run_id
        assert [r for r in catalog.artifacts(area="distill") if r.uri == m.uri]
    sft = read_manifest(result.artifacts["sft"].uri)
    assert sft.inputs["regenerated"].digest == result.artifacts["regenerated"].digest


def test_rows_trace_to_prompt_teacher_and_filters(tiny_run):
    _, result = tiny_run
    col = pl.read_parquet(result.artifacts['collected'].path / "data.parquet")
    for c in ("row_id", "domain", "template_name", "template_hash", "system_prompt", "user_prompt", "response",
              "status", "error", "model", "prompt_tokens", "completion_tokens", "cost_usd", "latency_s",
              "logprobs_json"):
        assert c in col.columns, c
    assert (col["status"] == "ok").all() and col["cached"].all()
    lp = json.loads(col["logprobs_json"].drop_nulls()[0])
    assert {"token", "logprob", "top_logprobs"} <= set(lp[0])
    filt = pl.read_parquet(result.artifacts['filtered'].path / "data.parquet")
    rejected = filt.filter(~pl.col("keep"))
    assert rejected.height > 0 and (rejected["reason"] != "").all()  # weak answers caught, with reasons
    m = read_manifest(result.artifacts["filtered"].uri)
    assert "gate_falsifiable_hypothesis" in m.metrics and "gate_length_format_valid_pass" in m.metrics


def test_regeneration_keeps_history_and_sft_is_loadable(tiny_run):
    _, result = tiny_run
    regen = pl.read_parquet(result.artifacts['regenerated'].path / "data.parquet")
    redone = regen.filter(pl.col("attempts") > 0)
    assert redone.height > 0
    two_rounds = redone.filter(pl.col("attempts") == 2)
    assert two_rounds.height > 0  # some rows needed a second, stricter round
    hist = json.loads(two_rounds["history_json"][0])
    assert [h["round"] for h in hist] == [1, 2] and hist[0]["keep"] is False and hist[0]["reasons"]
    sft_dir = str(result.artifacts["sft"].path)
    records = [json.loads(line) for line in open(f"{sft_dir}/sft.jsonl")]
    assert records and {"input", "output", "meta", "logprobs_json"} == set(records[0])  # tiny asks for top-3
    assert all(r["logprobs_json"] for r in records)  # each answer's own, regenerated ones included
    assert {"domain", "quality", "template_name"} <= set(records[0]["meta"])
    from datasets import load_from_disk

    ds = load_from_disk(f"{sft_dir}/hf")
    assert len(ds) == len(records) == result.artifacts["sft"].rows
    assert "regenerated" in {r["meta"]["quality"] for r in records}


def test_rerun_pays_nothing_and_reuses_everything(tiny_run):
    cfg, result = tiny_run
    again = distill(cfg)
    assert again.artifacts == result.artifacts
    assert again.teacher_usd == 0.0


def test_scientific_config_against_a_live_teacher(prefect_harness, repo, monkeypatch):
    """configs/distill/scientific.yaml as shipped (an openrouter model string, its key from the env),
    only pointed at a scripted OpenAI-compatible teacher on loopback: real HTTP through litellm."""
    from tests.support import distill_teacher
    from tests.support.openai_stub import StubServer

    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-or-test-not-a-real-key")
    with StubServer(distill_teacher.handler) as stub:
        cfg = load_flow_config(DistillConfig, str(repo / "configs/distill/scientific.yaml"),
                               ["name=dscience", f"teacher.api_base={stub.url}", "teacher.rpm=6000",
                                "review.mode=auto"])
        result = distill(cfg)
        asked = len(stub.requests)
    assert cfg.teacher.model == "openrouter/openai/gpt-4o-mini"
    assert list(result.artifacts) == STAGES
    s = result.summary
    assert s["collected_ok"] == 40 and s["collected_failed"] == 0 and s["regenerated_rescued"] > 0
    assert asked >= 40 + s["regenerated_rescued"]  # collection, then at least one request per rescued row
    assert set(stub.auth) == {"Bearer sk-or-test-not-a-real-key"}  # the key came from api_key_env
    col = pl.read_parquet(result.artifacts['collected'].path / "data.parquet")
    assert (col["cost_usd"] > 0).all() and s["teacher_usd"] > 0  # priced by litellm from the model's list price
    assert col["logprobs_json"].is_not_null().all()  # top_logprobs: 5 in the config
    manifest = read_manifest(result.artifacts["collected"].uri)
    assert "sk-or-test" not in json.dumps(manifest.model_dump(mode="json"))
