"""VQA evaluation: the VQA answer normalisation and metrics by hand, bad rows named, the image bytes in
the predict step's cache key, and the real evaluate flow on the tiny omni model (its processor answers
every image question; the metrics and the gate agree with the predictions); a text-only model, or
perplexity on image rows, stops before work with a clear message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest

from flows.common import load_flow_config
from nexus_core.artifacts import raw_ref
from nexus_core.contract import contract_of
from nexus_core.errors import ConfigError, InputError
from nexus_core.evaluate.metrics import compute, normalize_vqa
from nexus_core.evaluate.predict import PredictConfig, run_predict
from nexus_core.evaluate.vqa import vqa_rows
from nexus_core.io import read_table
from tests.train.test_omni import omni  # noqa: F401  (the module-scoped tiny omni model fixture)

REPO = Path(__file__).resolve().parents[2]
VQA = REPO / "data/raw/eval/vqa_tiny.jsonl"
CONFIG = REPO / "configs/eval/vqa_tiny.yaml"


def test_vqa_normalisation_and_metrics_by_hand():
    assert normalize_vqa("The Red!") == "red" and normalize_vqa("two  squares.") == "2 squares"
    assert normalize_vqa("A square") == normalize_vqa("square")
    table = pl.DataFrame({"reference": ["red", "square", "2", "blue"],
                          "answers": [json.dumps(a) for a in (["red"], ["square", "box"], ["2", "two"], ["blue"])],
                          "prediction": ["Red.", "a box", "Two", "green"]})
    assert compute("vqa_exact_match", table) == pytest.approx(2 / 4)  # red, two; "a box" is not "square"
    assert compute("vqa_accuracy", table) == pytest.approx(3 / 4)  # box is accepted
    with pytest.raises(InputError, match="metric 'vqa_accuracy' needs column\\(s\\) answers"):
        compute("vqa_accuracy", table.drop("answers"))


def test_bad_vqa_rows_name_their_row(tmp_path):
    shutil.copy(REPO / "data/raw/omni/images/red_square.png", tmp_path / "red.png")
    (tmp_path / "broken.png").write_bytes(b"nope")
    ok = {"question": "Colour?", "answer": "red"}
    df = pl.DataFrame([{**ok, "images": ["red.png", "red.png"]}, {**ok, "images": ["broken.png"]}])
    with pytest.raises(InputError, match=r"v.jsonl: row 1: image 'broken.png' .* cannot be read"):
        vqa_rows(df, "v.jsonl", tmp_path)
    rows = vqa_rows(df.head(1), "v.jsonl", tmp_path)
    assert rows[0]["answers"] == ["red"] and len(rows[0]["paths"]) == 2
    for bad, message in [({**ok, "image": None}, "row 0: no image"), ({"question": " ", "answer": "red", "image": "red.png"},
                                                                      "row 0: empty question")]:
        with pytest.raises(InputError, match=message):
            vqa_rows(pl.DataFrame([bad]), "v.jsonl", tmp_path)


def test_the_images_join_the_predict_cache_key(tmp_path, tiny_llm):
    files = contract_of(run_predict).files_read(PredictConfig(), {"dataset": raw_ref(VQA), "model": raw_ref(tiny_llm)})
    assert sorted(p.name for p in files) == sorted(f"{c}_{s}.png" for c in ("red", "green", "blue", "yellow")
                                                    for s in ("square", "circle"))


def _evaluate(model: Path, name: str, *overrides: str):
    from flows.evaluate import EvaluateConfig, evaluate

    return evaluate(load_flow_config(EvaluateConfig, str(CONFIG), [f"model={model}", f"name={name}", *overrides]))


@pytest.mark.integration
def test_vqa_eval_of_the_tiny_omni_model_through_the_evaluate_flow(omni, prefect_harness):  # noqa: F811
    from nexus_core.evaluate.metrics import _accepted

    result = _evaluate(omni.path, "vqa_omni")
    assert list(result.artifacts) == ["predict", "score", "judge", "gates", "report"]  # read in place
    preds = read_table(result.artifacts["predict"].path / "data.parquet")
    source = read_table(VQA)
    assert preds["row_id"].to_list() == source["row_id"].to_list() and preds.height == 16
    assert preds["input"].to_list() == source["question"].to_list()
    assert json.loads(preds["media"][0]) == ["../omni/images/red_square.png"]
    assert all(isinstance(p, str) for p in preds["prediction"]) and min(preds["generated_tokens"]) >= 1
    exact = sum(normalize_vqa(p) == normalize_vqa(r) for p, r in zip(preds["prediction"], preds["reference"],
                                                                      strict=True)) / 16
    accepted = sum(normalize_vqa(p) in {normalize_vqa(a) for a in _accepted(acc)}
                   for p, acc in zip(preds["prediction"], preds["answers"], strict=True)) / 16
    metrics = result.summary["metrics"]
    assert metrics["vqa_exact_match"] == pytest.approx(exact) and metrics["vqa_accuracy"] == pytest.approx(accepted)
    assert result.summary["gate_values"] == {"vqa_accuracy": metrics["vqa_accuracy"]}
    assert result.summary["gate_passed"] is (accepted >= 0.5)  # an untrained projector: not promoted
    assert accepted < 0.5


@pytest.mark.integration
def test_a_text_only_model_or_perplexity_on_image_rows_stops_before_work(tiny_llm, omni, prefect_harness):  # noqa: F811
    with pytest.raises(ConfigError, match=r"evaluate: modality validation failed: the data needs vision but model "
                                          r".* takes text only"):
        _evaluate(tiny_llm, "vqa_text_only", "dry_run=true")
    with pytest.raises(ConfigError, match=r"predict.perplexity: reference perplexity is not computed on image rows"):
        _evaluate(omni.path, "vqa_ppl", "dry_run=true", "predict.perplexity=true")
    # the step itself refuses too (a caller that skips the flow's check)
    with pytest.raises(InputError, match="modality validation failed"):
        from nexus_core.runner import run_step

        run_step(run_predict, PredictConfig(perplexity=False), name="t_vqa_text",
                 inputs={"model": raw_ref(tiny_llm), "dataset": raw_ref(VQA)})
