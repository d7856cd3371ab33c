"""Bad input fails fast and names the file and what is missing; inputs resolve from paths and specs."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from nexus_core.artifacts import ArtifactRef
from nexus_core.context import StepContext
from nexus_core.contract import check_inputs
from nexus_core.errors import ConfigError, InputError
from nexus_core.evaluate.feedback import FeedbackConfig, run_feedback
from nexus_core.evaluate.predict import PredictConfig, run_predict
from nexus_core.evaluate.score import ScoreConfig, run_score
from nexus_core.io import resolve_ref, write_jsonl, write_parquet
from nexus_core.models.io import resolve_model


def _table(tmp_path: Path, name: str, df: pl.DataFrame) -> ArtifactRef:
    d = tmp_path / name
    d.mkdir()
    write_parquet(df, d / "data.parquet")
    return ArtifactRef(uri=str(d), kind="dataset", name=name, version=1, digest="x", rows=df.height)


def test_predictions_without_metric_columns_are_named(tmp_path):
    preds = _table(tmp_path, "preds", pl.DataFrame({"prediction": ["a"], "reference": ["a"]}))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match=r"preds/data.parquet: metric 'accuracy' needs column\(s\) label, pred_label"):
        run_score(ScoreConfig(metrics=["exact_match", "accuracy"]), inputs={"predictions": preds}, out_uri=str(out),
                  ctx=StepContext.detached())
    result = run_score(ScoreConfig(metrics=["exact_match", "accuracy"], skip_missing=True),
                       inputs={"predictions": preds}, out_uri=str(out), ctx=StepContext.detached())
    assert result.values == {"exact_match": 1.0} and "accuracy" in result.skipped
    with pytest.raises(ValueError, match="unknown metric"):
        ScoreConfig(metrics=["bleu"])


def test_validation_set_without_input_output_is_named(tmp_path):
    data = _table(tmp_path, "val", pl.DataFrame({"question": ["q"], "answer": ["a"]}))
    model = ArtifactRef(uri=str(tmp_path / "nomodel"), kind="model", name="m", version=1, digest="x")
    with pytest.raises(InputError, match=r"val: validation set missing column\(s\) input, output"):
        run_predict(PredictConfig(), inputs={"model": model, "dataset": data}, out_uri=str(tmp_path),
                    ctx=StepContext.detached())
    # through the runner, the contract refuses the same inputs before the model is loaded, naming each problem
    with pytest.raises(InputError) as err:
        check_inputs(run_predict, {"model": model, "dataset": data})
    assert "input 'model'" in str(err.value) and "nomodel): does not exist" in str(err.value)
    assert ("needs a table with column(s) input/output or prompt/completion or image/question/answer or "
            "images/question/answer; has: question, answer") in str(err.value)  # VQA rows need their images
    with pytest.raises(InputError, match="predict: missing input 'dataset'"):
        check_inputs(run_predict, {"model": model})


def test_feedback_needs_judged_columns(tmp_path):
    judged = _table(tmp_path, "judged", pl.DataFrame({"row_id": ["1"], "input": ["x"]}))
    with pytest.raises(InputError, match=r"feedback: input 'judged' \(.*judged\): needs a table with "
                                         r"column\(s\) row_id/input/status; has: row_id, input"):
        check_inputs(run_feedback, {"judged": judged})
    ok = _table(tmp_path, "ok", pl.DataFrame({"row_id": ["1"], "input": ["x"], "status": ["failed"],
                                              "reason": ["timeout"]}))
    check_inputs(run_feedback, {"judged": ok})
    out = tmp_path / "out"
    out.mkdir()
    result = run_feedback(FeedbackConfig(include_unjudged=True), inputs={"judged": ok}, out_uri=str(out),
                          ctx=StepContext.detached())
    assert result.failed_samples == 1  # an unjudged row is fed back when asked for


def test_resolve_ref_paths_and_errors(tmp_path, data_root, tiny_llm):
    assert resolve_model(str(tiny_llm)).kind == "model"
    with pytest.raises(InputError, match="not a Hugging Face model directory"):
        resolve_model(str(tmp_path))
    with pytest.raises(InputError, match="missing.jsonl: no such file or directory"):
        resolve_ref(str(tmp_path / "missing.jsonl"), "dataset")
    with pytest.raises(InputError, match="not a path and not a known artifact"):
        resolve_ref("nosuch@v2", "dataset")
    f = tmp_path / "val.jsonl"
    write_jsonl([{"input": "a", "output": "b"}], f)
    assert resolve_ref(str(f), "dataset").path == f


def test_flow_config_needs_a_dataset():
    from flows.evaluate import EvaluateConfig, evaluate

    with pytest.raises(ConfigError, match="dataset: required"):
        evaluate.fn(EvaluateConfig())


def test_a_custom_rubric_with_the_default_gates_is_refused_before_anything_runs(tmp_path):
    import json

    from flows.evaluate import EvaluateConfig, check_evaluate
    from nexus_core.artifacts import raw_ref

    rubric = tmp_path / "assistant.json"
    rubric.write_text(json.dumps({"name": "assistant", "instructions": "Grade it. Reply in JSON.",
                                  "dimensions": [{"name": "helpfulness", "description": "solves the problem"}]}))
    data = tmp_path / "val.jsonl"
    write_jsonl([{"input": "q", "output": "a"}], data)
    cfg = EvaluateConfig(judge={"kind": "llm", "rubric": str(rubric)})
    with pytest.raises(ConfigError, match=r"gates\.gates\[0\] \(plausibility_median\): reads 'plausibility', "
                                          r"which rubric 'assistant'"):
        check_evaluate(cfg, None, raw_ref(data))
    ok = cfg.model_copy(update={"gates": cfg.gates.model_validate(
        {"gates": [{"name": "helpful", "column": "helpfulness", "stat": "mean", "min": 4}]})})
    assert "judge" in check_evaluate(ok, None, raw_ref(data))
