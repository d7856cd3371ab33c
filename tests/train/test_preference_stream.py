"""Streaming for the DPO, ORPO and reward stages (nexus_core.train.preference): above
``stream_threshold_mb`` the pairs are read in batches as training consumes them, never loaded whole;
the same rows train to the same losses as in memory."""

from __future__ import annotations

import math

import polars as pl
import pytest

from nexus_core import lineage
from nexus_core.artifacts import raw_ref, read_manifest
from nexus_core.errors import InputError, StepError
from nexus_core.runner import run_step
from nexus_core.train import data as train_data
from nexus_core.train.dpo import DPOConfig, run_dpo
from nexus_core.train.orpo import ORPOConfig, run_orpo
from nexus_core.train.reward import RewardConfig, run_reward
from tests.train.conftest import QA, _write_jsonl


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """The eight QA pairs as parquet, plus a row whose rejected answer is missing (left out by both paths)."""
    rows = [{"prompt": q, "chosen": a, "rejected": "I do not know."} for q, a in QA]
    rows.insert(3, {"prompt": "Who failed?", "chosen": "The teacher.", "rejected": None})
    path = tmp_path_factory.mktemp("prefs") / "pairs.parquet"
    pl.DataFrame(rows).write_parquet(path)
    return raw_ref(path)


def _history(result, key: str = "train/loss") -> list[float]:
    run_id = read_manifest(result.ref.uri).mlflow_run_id
    return [m.value for m in sorted(lineage.client().get_metric_history(run_id, key), key=lambda m: m.step)]


def _never_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a table whole (what the in-memory path does) fails the test."""
    def whole(*args, **kwargs):
        raise AssertionError(f"a streamed stage read a table whole: {args}")

    monkeypatch.setattr(train_data, "read_table", whole)
    monkeypatch.setattr(train_data, "load_table", whole)


@pytest.mark.parametrize("run, cfg_cls", [(run_dpo, DPOConfig), (run_orpo, ORPOConfig), (run_reward, RewardConfig)],
                         ids=["dpo", "orpo", "reward"])
def test_streamed_stage_trains_like_in_memory_without_loading_the_table(run, cfg_cls, tiny_model, pairs, monkeypatch):
    # One batch holds every pair, so both paths see the same rows at every step whatever their order.
    fixed = {"finetune": "full", "max_steps": 3, "batch_size": 8, "learning_rate": 1e-3, "seed": 3,
             "checkpoint": {"save_steps": 3}}
    method = cfg_cls().method
    whole = run_step(run, cfg_cls(**fixed), name=f"t_{method}_whole", inputs={"model": tiny_model, "data": pairs})
    with monkeypatch.context() as m:
        _never_loaded(m)
        streamed = run_step(run, cfg_cls(stream_threshold_mb=0, **fixed), name=f"t_{method}_stream",
                            inputs={"model": tiny_model, "data": pairs})
    assert streamed.streamed and not whole.streamed and streamed.steps == 3
    assert streamed.metrics["param_delta"] > 0 and whole.metrics["train_rows"] == 8  # the null row left out
    assert len(_history(streamed)) == 3 and all(math.isfinite(x) for x in _history(streamed))
    # The loss is logged rounded to 4 decimals; the gradient norm is not, and tells a changed batch apart.
    assert _history(streamed) == pytest.approx(_history(whole), abs=2e-4)
    assert _history(streamed, "train/grad_norm") == pytest.approx(_history(whole, "train/grad_norm"), rel=1e-4)


def test_streamed_dpo_mixes_two_datasets_and_holds_out_by_hash(tiny_model, refs, tmp_path, monkeypatch):
    from nexus_core.train.data import preference_records
    from nexus_core.train.stream import held_out

    extra = raw_ref(_write_jsonl(tmp_path / "count.jsonl", [
        {"prompt": f"Count to {i}.", "chosen": " ".join(str(j) for j in range(i)), "rejected": "No."}
        for i in range(1, 17)]))
    cfg = DPOConfig(finetune="lora", max_steps=2, batch_size=4, learning_rate=1e-3, stream_threshold_mb=0,
                    data_weights=[3, 1], eval_split=0.3, checkpoint={"save_steps": 2})
    expected = sum(held_out(r, 0.3) for ref in (refs["prefs"], extra)
                   for r in preference_records(*train_data.load_rows(ref), "dpo"))
    with monkeypatch.context() as m:
        _never_loaded(m)
        r = run_step(run_dpo, cfg, name="t_dpo_stream_mix",
                     inputs={"model": tiny_model, "data": refs["prefs"], "data_1": extra})
    assert r.streamed and r.steps == 2 and r.metrics["param_delta"] > 0
    assert expected > 0 and r.metrics["eval_rows"] == expected  # the rows the hash picks, read once
    assert r.eval_loss is not None and math.isfinite(r.eval_loss)


def test_streaming_refusals_before_any_training(tiny_model, refs, tmp_path):
    with pytest.raises(StepError, match="max_steps: streamed data"):
        run_step(run_orpo, ORPOConfig(stream_threshold_mb=0), name="t_orpo_stream_bad",
                 inputs={"model": tiny_model, "data": refs["prefs"]})
    bare = raw_ref(_write_jsonl(tmp_path / "bare.jsonl", [{"chosen": "Four.", "rejected": "Five."}] * 4))
    with pytest.raises(InputError, match=r"datasets data have a prompt .* and data_1 have not"):
        run_step(run_reward, RewardConfig(data_weights=[1, 1], max_steps=1), name="t_reward_mixed_prompts",
                 inputs={"model": tiny_model, "data": refs["prefs"], "data_1": bare})
    nulls = raw_ref(_write_jsonl(tmp_path / "nulls.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": None}] * 2))
    with pytest.raises(InputError, match=r"nulls\.jsonl: no usable rows"):
        run_step(run_dpo, DPOConfig(max_steps=1), name="t_dpo_nulls", inputs={"model": tiny_model, "data": nulls})
