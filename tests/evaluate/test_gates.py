"""Gates pass and fail on constructed judged tables; a missing column or metric is named."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from nexus_core.artifacts import ArtifactRef, atomic_write_json
from nexus_core.context import StepContext
from nexus_core.errors import InputError
from nexus_core.evaluate.gates import Gate, GatesConfig, run_gates
from nexus_core.io import write_parquet


def _ref(path: Path, name: str) -> ArtifactRef:
    return ArtifactRef(uri=str(path), kind="dataset", name=name, version=1, digest="x")


def _judged(tmp_path: Path, plaus, falsi, steps, agree, name="judged") -> ArtifactRef:
    d = tmp_path / name
    d.mkdir()
    write_parquet(pl.DataFrame({"plausibility": plaus, "falsifiability": falsi,
                                "has_methodology": [s >= 3 for s in steps], "steps_count": steps,
                                "teacher_agreement": agree}, schema_overrides={"plausibility": pl.Int64}),
                  d / "data.parquet")
    return _ref(d, name)


def _run(tmp_path: Path, judged: ArtifactRef, cfg: GatesConfig | None = None, scores: ArtifactRef | None = None):
    out = tmp_path / f"out_{judged.name}"
    out.mkdir(exist_ok=True)
    inputs = {"judged": judged, **({"scores": scores} if scores else {})}
    result = run_gates(cfg or GatesConfig(), inputs=inputs, out_uri=str(out), ctx=StepContext.detached())
    return result, json.loads((out / "gates.json").read_text())


def test_default_gates_pass_on_good_samples(tmp_path):
    # medians 4 and 4; 8/10 with >= 3 steps; agreement mean 3.2
    judged = _judged(tmp_path, [4, 4, 5, 3, 4, 4, 5, 4, 3, 4], [4, 3, 4, 4, 5, 4, 4, 3, 4, 4],
                     [3, 4, 5, 3, 3, 3, 4, 3, 1, 2], [3, 3, 4, 3, 3, 3, 4, 3, 3, 3])
    result, data = _run(tmp_path, judged)
    assert result.passed and data["passed"] and result.failed_gates == []
    assert result.values["methodology_share"] == pytest.approx(0.8)
    assert result.values["teacher_agreement_top500"] == pytest.approx(3.2)


def test_default_gates_fail_just_below_each_threshold(tmp_path):
    # median plausibility 3 (< 3.5), 6/10 methodology (< 0.7); falsifiability and agreement fine
    judged = _judged(tmp_path, [3, 3, 4, 3, 4, 3, 4, 3, 4, 3], [4] * 10, [3, 3, 3, 3, 3, 3, 1, 1, 1, 1], [3] * 10)
    result, _ = _run(tmp_path, judged)
    assert not result.passed
    assert result.failed_gates == ["plausibility_median", "methodology_share"]


def test_unscored_rows_do_not_count_and_no_scores_fails(tmp_path):
    judged = _judged(tmp_path, [None, None], [None, None], [5, 5], [None, None])
    result, data = _run(tmp_path, judged)
    assert not result.passed
    assert {g["gate"]: g["detail"] for g in data["gates"]}["plausibility_median"] == "no usable values"


def test_top_n_ranked_and_metric_gates(tmp_path):
    judged = _judged(tmp_path, [5, 5, 1], [5, 5, 1], [3, 3, 3], [5, 4, 1])
    scores = tmp_path / "scores"
    scores.mkdir()
    atomic_write_json(scores / "metrics.json", {"values": {"perplexity": 12.0}})
    cfg = GatesConfig(gates=[
        Gate(name="agree_top2", column="teacher_agreement", stat="mean", min=4.5, top_n=2, rank_by="plausibility"),
        Gate(name="ppl", metric="perplexity", stat="value", max=20.0),
    ])
    result, _ = _run(tmp_path, judged, cfg, _ref(scores, "scores"))
    assert result.passed and result.values == {"agree_top2": 4.5, "ppl": 12.0}


def test_missing_column_or_metric_is_named(tmp_path):
    judged = _judged(tmp_path, [4], [4], [3], [4])
    cfg = GatesConfig(gates=[Gate(name="rig", column="method_rigour", min=3)])
    with pytest.raises(InputError, match=r"judged/data.parquet: gate 'rig' needs column 'method_rigour'"):
        _run(tmp_path, judged, cfg)
    cfg = GatesConfig(gates=[Gate(name="acc", metric="accuracy", stat="value", min=0.5)])
    with pytest.raises(InputError, match="gate 'acc' needs metric 'accuracy'"):
        _run(tmp_path, judged, cfg)


def test_gate_config_rejects_ambiguous_gates():
    with pytest.raises(ValueError, match="exactly one of column or metric"):
        Gate(name="x", column="a", metric="b", min=1)
    with pytest.raises(ValueError, match="set min or max"):
        Gate(name="x", column="a")


def test_gates_report_n_and_coverage_and_fail_below_min_coverage(tmp_path):
    # 1 row in 8 judged (a high score), every row has a methodology block (rule-counted, not judged)
    judged = _judged(tmp_path, [5] + [None] * 7, [5] + [None] * 7, [3] * 8, [5] + [None] * 7)
    result, data = _run(tmp_path, judged)
    by_gate = {g["gate"]: g for g in data["gates"]}
    assert not result.passed
    assert result.failed_gates == ["plausibility_median", "falsifiability_median", "teacher_agreement_top500"]
    plaus = by_gate["plausibility_median"]
    assert (plaus["value"], plaus["n"], plaus["rows"], plaus["coverage"]) == (5.0, 1, 8, 0.125)
    assert plaus["min_coverage"] == 0.9 and plaus["judged"] is True
    assert plaus["detail"] == "coverage 0.125 < min_coverage 0.9: judged on 1 of 8 rows"
    assert by_gate["methodology_share"]["passed"] and by_gate["methodology_share"]["coverage"] == 1.0
    assert result.coverage["plausibility_median"] == 0.125

    # a gate may ask for less; the section default applies to the others
    lenient = GatesConfig(min_coverage=0.95, gates=[
        Gate(name="plaus", column="plausibility", min=3.5, min_coverage=0.1),
        Gate(name="falsi", column="falsifiability", min=3.5)])
    result, _ = _run(tmp_path, judged, lenient)
    assert result.failed_gates == ["falsi"]
    with pytest.raises(ValueError, match="min_coverage applies to column gates"):
        Gate(name="ppl", metric="perplexity", stat="value", max=2, min_coverage=0.5)


def test_custom_rubric_dimensions_are_gated_by_name_and_defaults_are_refused(tmp_path):
    from nexus_core.evaluate.gates import rubric_problems

    d = tmp_path / "custom"
    d.mkdir()
    write_parquet(pl.DataFrame({"helpfulness": [4, 5, 4, 5, 4, 4, 5, 4, 4, 5]}), d / "data.parquet")
    cfg = GatesConfig(gates=[Gate(name="helpful", column="helpfulness", stat="mean", min=4)])
    result, data = _run(tmp_path, _ref(d, "custom"), cfg)
    assert result.passed and data["gates"][0]["coverage"] == 1.0
    assert rubric_problems(cfg, ["helpfulness"], "'assistant'") == []
    problems = rubric_problems(GatesConfig(), ["helpfulness"], "'assistant'")
    assert problems[0] == ("gates.gates[0] (plausibility_median): reads 'plausibility', which rubric 'assistant' "
                           "does not score (its dimensions: helpfulness)")
    assert len(problems) == 3  # methodology_share reads a rule-counted column every rubric has
