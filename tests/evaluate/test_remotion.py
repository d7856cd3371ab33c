"""remotion-explainer: the TSX parse + structure checks on good and broken code (line/col of syntax errors),
every shipped composition passing them, the remotion_parse_rate metric and its gate, the render step's skip
without Node/Remotion, the recipes (dry runs) and the Remotion eval through the evaluate flow on a tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import pytest

from flows.common import load_flow_config
from nexus_core.artifacts import ArtifactRef
from nexus_core.context import StepContext
from nexus_core.errors import InputError
from nexus_core.evaluate import metrics as M
from nexus_core.evaluate.gates import Gate, GatesConfig, run_gates
from nexus_core.evaluate.metrics import normalize_text
from nexus_core.evaluate.remotion import (
    RemotionConfig,
    check_tsx,
    extract_code,
    remotion_available,
    render_tsx,
)
from nexus_core.evaluate.score import ScoreConfig, run_score
from nexus_core.io import read_table, write_parquet

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "data/raw/train/remotion_explainer.jsonl"
HELDOUT = REPO / "data/raw/eval/remotion_heldout.jsonl"

GOOD = """import React from 'react';
import {AbsoluteFill, interpolate, useCurrentFrame} from 'remotion';

export const compositionConfig = {id: 'Fade', durationInFrames: 60, fps: 30, width: 640, height: 360};

export const Fade: React.FC<{title: string}> = ({title}) => {
  const frame = useCurrentFrame();
  const opacity = interpolate(frame, [0, 30], [0, 1], {extrapolateRight: 'clamp'});
  return <AbsoluteFill style={{opacity}}><h1>{title} é</h1></AbsoluteFill>;
};
"""


def _broken(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new, 1)


def test_a_good_composition_passes_every_check():
    res = check_tsx(GOOD)
    assert res.ok and res.parses and res.problems == [] and res.error is None
    assert res.component == "Fade" and res.duration_in_frames == 60


@pytest.mark.parametrize(("code", "line", "col", "message"), [
    # a missing `}` closing the component body: the brace left open is named
    (_broken("</AbsoluteFill>;\n};\n", "</AbsoluteFill>;\n"), 6, 61, "'{' is not closed by the end of the code"),
    # a mismatched JSX closing tag (the grammar accepts it; tsc does not); col counts characters: é is 2 bytes
    (_broken("</h1>", "</h2>"), 9, 55, "closing tag </h2> does not match <h1>"),
    (_broken("const opacity =", "const opacity"), 8, 16, "missing ';'"),
    (_broken("{id: ", "{id "), 4, 35, "unexpected 'id'"),
    # a stray `)`: tree-sitter recovers a little later on the same line
    (_broken("[0, 1], {", "[0, 1]), {"), 8, 82, "unexpected '}'"),
    (_broken("import React", "imprt React"), 1, 1, "unexpected 'imprt'"),
])
def test_syntax_errors_are_reported_with_line_and_col(code, line, col, message):
    res = check_tsx(code)
    assert not res.ok and not res.parses
    assert res.error == f"line {line}, col {col}: {message}"
    assert (res.line, res.col) == (line, col) and res.problems == [f"syntax: {res.error}"]


def test_col_counts_characters_not_bytes():
    ascii_err = check_tsx("const s = 'eee'; const t = (1 + ;\n")
    utf8_err = check_tsx("const s = 'ééé'; const t = (1 + ;\n")
    assert (ascii_err.line, ascii_err.col) == (utf8_err.line, utf8_err.col) == (1, 26)  # bytes: 29


@pytest.mark.parametrize(("code", "problems"), [
    (_broken("from 'remotion'", "from 'remotion-lite'"),
     ["imports_remotion: no import from 'remotion'",
      "uses_current_frame: useCurrentFrame is not imported from 'remotion'"]),
    (_broken("export const Fade", "const Fade"), ["exports_component: no exported component"]),
    (_broken("const frame = useCurrentFrame();", "const frame = 12;"),
     ["uses_current_frame: useCurrentFrame() is never called"]),
    (_broken("export const compositionConfig", "const compositionConfig"),
     ["composition_config: no exported `compositionConfig`"]),
    (_broken("durationInFrames: 60", "durationInFrames: 0"),
     ["composition_config: durationInFrames is '0', not a positive integer literal"]),
    (_broken("durationInFrames: 60, ", ""), ["composition_config: `compositionConfig` has no durationInFrames"]),
    (_broken("AbsoluteFill, interpolate, ", "AbsoluteFill, "),
     ["remotion_names_imported: interpolate used but not imported"]),
])
def test_structural_checks_name_what_is_missing(code, problems):
    res = check_tsx(code)
    assert res.parses and not res.ok
    assert len(res.problems) == len(problems) and all(got.startswith(want) for got, want in
                                                      zip(res.problems, problems, strict=True)), res.problems
    # each check can be turned off: the same code then passes
    names = {p.split(":")[0] for p in problems}
    assert check_tsx(code, [c for c in RemotionConfig().checks if c not in names]).ok


def test_default_export_and_fenced_answers():
    code = GOOD.replace("export const Fade: React.FC<{title: string}> =", "const Fade: React.FC<{title: string}> =")
    default = check_tsx(code + "export default Fade;\n")
    assert default.ok and (default.component, default.default_export) == ("Fade", True)
    assert not check_tsx(GOOD).default_export
    assert check_tsx(code + "export default function Scene() { return null; }\n").ok
    answer = f"Here is the scene:\n```tsx\n{GOOD}```\nRender it with the Remotion CLI."
    assert extract_code(answer) == GOOD and check_tsx(extract_code(answer)).ok
    assert not check_tsx(answer).parses  # the prose around it is not TSX
    assert not check_tsx("   ").parses and check_tsx("").error == "line 1, col 1: empty code"


def test_rate_by_hand():
    assert M.remotion_parse_rate([True, False, True, None]) == pytest.approx(2 / 3)
    assert math.isnan(M.remotion_parse_rate([]))


def _preds(tmp_path: Path, rows: list[dict], name: str = "preds") -> ArtifactRef:
    d = tmp_path / name
    d.mkdir()
    write_parquet(pl.DataFrame(rows), d / "data.parquet")
    return ArtifactRef(uri=str(d), kind="dataset", name=name, version=1, digest="x")


def test_score_step_checks_writes_records_and_gate_reads_the_rate(tmp_path):
    preds = _preds(tmp_path, [
        {"row_id": "a", "input": "fade in a title", "prediction": f"```tsx\n{GOOD}```"},
        {"row_id": "b", "input": "broken", "prediction": _broken("[0, 1], {", "[0, 1]), {")},
        {"row_id": "c", "input": "no frame", "prediction": _broken("const frame = useCurrentFrame();", "")},
        {"row_id": "d", "input": "not a scene", "prediction": "const answer = 42;"},
    ])
    out = tmp_path / "scores"
    out.mkdir()
    result = run_score(ScoreConfig(metrics=["remotion_parse_rate"]), inputs={"predictions": preds},
                       out_uri=str(out), ctx=StepContext.detached())
    assert result.values == {"remotion_parse_rate": 0.25} and result.remotion_file == "remotion_checks.parquet"
    records = read_table(out / result.remotion_file)
    assert records["row_id"].to_list() == ["a", "b", "c", "d"]
    assert records["remotion_ok"].to_list() == [True, False, False, False]
    assert records["parses"].to_list() == [True, False, True, True]
    assert records["error_line"].to_list() == [None, 8, None, None] and records["error_col"][1] == 82
    assert records["code"][0] == GOOD and records["component"][0] == "Fade"
    assert "uses_current_frame" in records["problems"][2] and "imports_remotion" in records["problems"][3]
    assert records["render"].to_list() == [None] * 4  # rendering is off by default
    assert json.loads((out / "metrics.json").read_text())["remotion_file"] == "remotion_checks.parquet"

    judged = _preds(tmp_path, [{"x": 1}], "judged")
    gates = GatesConfig(gates=[Gate(name="remotion_parses", metric="remotion_parse_rate", stat="value", min=0.8)])
    scores = ArtifactRef(uri=str(out), kind="dataset", name="scores", version=1, digest="x")
    (tmp_path / "g").mkdir()
    verdict = run_gates(gates, inputs={"judged": judged, "scores": scores}, out_uri=str(tmp_path / "g"),
                        ctx=StepContext.detached())
    assert not verdict.passed and verdict.failed_gates == ["remotion_parses"]


def test_score_step_names_a_table_without_predictions(tmp_path):
    cfg = ScoreConfig(metrics=["remotion_parse_rate"])
    bad = _preds(tmp_path, [{"answer": "x"}], "nopred")
    with pytest.raises(InputError, match=r"nopred/data.parquet: remotion_parse_rate needs a prediction column"):
        run_score(cfg, inputs={"predictions": bad}, out_uri=str(tmp_path), ctx=StepContext.detached())
    skipped = run_score(cfg.model_copy(update={"skip_missing": True}), inputs={"predictions": bad},
                        out_uri=str(tmp_path), ctx=StepContext.detached())
    assert "remotion_parse_rate" in skipped.skipped and skipped.remotion_file is None


def test_render_is_skipped_with_the_reason_without_node_or_remotion(tmp_path, monkeypatch):
    assert "no remotion.project_dir" in (remotion_available(None) or "")
    assert "is not a directory" in (remotion_available(tmp_path / "absent") or "")
    # a Node project without remotion installed: npx --no-install cannot find the CLI (when node exists)
    reason = remotion_available(tmp_path)
    assert reason is not None and ("not installed" in reason or "node/npx not on PATH" in reason), reason
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    assert remotion_available(tmp_path) == "node/npx not on PATH"
    status, why = render_tsx(GOOD, tmp_path / "out.mp4", RemotionConfig(render=True, project_dir=str(tmp_path)))
    assert (status, why) == ("skipped", "node/npx not on PATH") and not (tmp_path / "out.mp4").exists()

    preds = _preds(tmp_path, [{"row_id": "a", "prediction": GOOD}, {"row_id": "b", "prediction": "nope"}])
    out = tmp_path / "scores"
    out.mkdir()
    cfg = ScoreConfig(metrics=["remotion_parse_rate"], remotion=RemotionConfig(render=True, project_dir=str(tmp_path)))
    result = run_score(cfg, inputs={"predictions": preds}, out_uri=str(out), ctx=StepContext.detached())
    assert result.values == {"remotion_parse_rate": 0.5}  # a skipped render is not a failure
    assert read_table(out / "remotion_checks.parquet")["render"].to_list() == [
        "skipped: node/npx not on PATH", "not rendered: failed the checks"]


def test_shipped_compositions_all_pass_and_the_eval_set_is_held_out():
    train, heldout = read_table(TRAIN), read_table(HELDOUT)
    assert 16 <= train.height <= 24 and heldout.height >= 6
    assert set(train.columns) == {"input", "output"} and {"row_id", "input", "output"} <= set(heldout.columns)
    for where, table in (("train", train), ("heldout", heldout)):
        for i, code in enumerate(table["output"]):
            res = check_tsx(code)
            assert res.ok, f"{where} row {i}: {res.problems}"
    components = [check_tsx(c).component for c in train["output"]]
    assert len(set(components)) == train.height  # one distinct scene per concept
    assert heldout["row_id"].n_unique() == heldout.height
    trained = {normalize_text(t) for t in train["input"]}
    assert [t for t in heldout["input"] if normalize_text(t) in trained] == []


@pytest.mark.parametrize("recipe", ["remotion_explainer.yaml", "remotion_tiny.yaml"])
def test_recipes_dry_run(recipe, tiny_llm, prefect_harness):
    from flows.llm_train import LLMTrainConfig, llm_train

    overrides = ["dry_run=true"] + ([f"base_model={tiny_llm}"] if recipe == "remotion_explainer.yaml" else [])
    planned = llm_train(load_flow_config(LLMTrainConfig, str(REPO / "configs/train" / recipe), overrides))
    assert planned.dry_run and planned.plan[0].startswith("1. remotion: sft (lora) on remotion"), planned.plan


@pytest.mark.integration
def test_remotion_eval_of_an_untrained_tiny_model(tiny_llm, prefect_harness):
    from flows.evaluate import EvaluateConfig, evaluate

    cfg = load_flow_config(EvaluateConfig, str(REPO / "configs/eval/remotion_tiny.yaml"),
                           [f"model={tiny_llm}", "name=remotion_untrained", "predict.max_new_tokens=16"])
    result = evaluate(cfg)
    assert list(result.artifacts) == ["dataset", "predict", "score", "judge", "gates", "report"]
    records = read_table(result.artifacts["score"].path / "remotion_checks.parquet")
    preds = read_table(result.artifacts["predict"].path / "data.parquet")
    assert records["row_id"].to_list() == preds["row_id"].to_list() == read_table(HELDOUT)["row_id"].to_list()
    assert records["remotion_ok"].to_list() == [check_tsx(extract_code(p)).ok for p in preds["prediction"]]
    assert all(r for r in records["problems"])  # 16 random tokens are never a composition: each says why
    rate = result.summary["metrics"]["remotion_parse_rate"]
    assert rate == pytest.approx(records["remotion_ok"].mean()) == 0.0
    assert result.summary["gate_values"] == {"remotion_parses": rate}
    assert result.summary["gate_passed"] is False and result.summary["failed_gates"] == ["remotion_parses"]
