"""Rubric loading (custom dimensions; bad names / scale named), the strict verdict extractor, JSON mode
choice, heuristic judge features."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nexus_core.errors import ConfigError
from nexus_core.evaluate.rubric import (
    HEURISTIC_LABEL,
    count_ordered_steps,
    heuristic_verdict,
    load_rubric,
    parse_verdict,
    token_f1,
)

REPO = Path(__file__).resolve().parents[2]
RUBRIC = REPO / "configs/eval/rubric.json"


@pytest.fixture
def rubric():
    return load_rubric(RUBRIC)


def test_project_rubric_has_the_five_dimensions(rubric):
    assert rubric.names == ["plausibility", "falsifiability", "method_rigour", "reproducibility", "teacher_agreement"]
    assert rubric.bounds == (1, 5)


def test_custom_dimensions_load_and_bad_names_and_scale_are_named_with_the_file(tmp_path):
    custom = {"name": "assistant", "instructions": "Grade the answer. Reply in JSON.", "scale": "1-10",
              "dimensions": [{"name": "helpfulness", "description": "Solves the user's problem"},
                             {"name": "tone_2", "description": "Polite"}]}
    good = tmp_path / "custom.json"
    good.write_text(json.dumps(custom))
    rubric = load_rubric(good)
    assert rubric.names == ["helpfulness", "tone_2"] and rubric.bounds == (1, 10)
    verdict, reason = parse_verdict('{"helpfulness": 9, "tone_2": 10, "rationale": "x"}', rubric)
    assert reason is None and verdict["helpfulness"] == 9

    data = json.loads(RUBRIC.read_text())
    data["scale"] = "1-7"
    data["dimensions"][2]["name"] = "Elegance!"
    data["dimensions"][3]["name"] = "status"
    bad = tmp_path / "rubric.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        load_rubric(bad)
    msg = str(err.value)
    assert str(bad) in msg
    assert "scale: unknown scale '1-7'" in msg
    assert "dimensions[2].name: 'Elegance!' is not a valid dimension name" in msg
    assert "dimensions[3].name: 'status' is a column the evaluation writes itself" in msg


def test_heuristic_judge_refuses_dimensions_it_has_no_rule_for(tmp_path):
    from nexus_core.evaluate.judge import JudgeConfig
    from nexus_core.evaluate.rubric import judge_items

    path = tmp_path / "custom.json"
    path.write_text(json.dumps({"name": "a", "instructions": "JSON", "dimensions": [
        {"name": "helpfulness", "description": "d"}, {"name": "plausibility", "description": "d"}]}))
    with pytest.raises(ConfigError, match="heuristic judge cannot score 'helpfulness'"):
        judge_items([{"question": "q", "answer": "a", "reference": "r"}], load_rubric(path))
    with pytest.raises(ValueError, match="heuristic judge cannot score 'helpfulness'"):
        JudgeConfig(kind="heuristic", rubric=str(path))
    assert JudgeConfig(kind="llm", rubric=str(path)).kind == "llm"  # an LLM judge scores any dimension


def test_rubric_not_json_or_missing_key(tmp_path):
    bad = tmp_path / "r.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_rubric(bad)
    bad.write_text(json.dumps({"name": "x", "dimensions": []}))
    with pytest.raises(ConfigError, match="instructions"):
        load_rubric(bad)


def test_parse_verdict_accepts_fenced_json_and_rejects_bad_ones(rubric):
    good = {"plausibility": 4, "falsifiability": 5.0, "method_rigour": 3, "reproducibility": 2,
            "teacher_agreement": 1, "rationale": "ok"}
    verdict, reason = parse_verdict(f"Here you go:\n```json\n{json.dumps(good)}\n```", rubric)
    assert reason is None and verdict["falsifiability"] == 5
    assert parse_verdict("I think it is good", rubric) == (None, "no JSON object in verdict: 'I think it is good'")
    _, reason = parse_verdict(json.dumps({**good, "plausibility": 9}), rubric)
    assert reason.startswith("verdict fails schema at plausibility") and "maximum" in reason
    _, reason = parse_verdict(json.dumps({k: v for k, v in good.items() if k != "reproducibility"}), rubric)
    assert "'reproducibility' is a required property" in reason
    assert parse_verdict('{"plausibility": 4,', rubric)[1].startswith("verdict is not valid JSON")
    assert parse_verdict('{"plausibility": 4,}', rubric)[1].startswith("verdict is not valid JSON")
    assert parse_verdict("", rubric) == (None, "empty verdict")


def test_strict_extractor_takes_the_first_balanced_object_that_validates(rubric):
    good = {"plausibility": 4, "falsifiability": 3, "method_rigour": 3, "reproducibility": 2,
            "teacher_agreement": 5, "rationale": "uses {braces} and a } in a string"}
    # trailing braces after a valid verdict: a greedy {.*} swallowed them and rejected the verdict
    verdict, reason = parse_verdict(json.dumps(good) + "\nNote: scores use the {1-5} scale {see rubric}.", rubric)
    assert reason is None and verdict == good
    # leading braces and an earlier object that fails the schema are skipped, not fatal
    text = 'Scale {1-5}. Draft: {"plausibility": 9}. Final:\n```json\n' + json.dumps(good) + "\n```"
    assert parse_verdict(text, rubric) == (good, None)
    # nothing validates: the reason is the first object's schema failure, more useful than a fragment's
    verdict, reason = parse_verdict('{"plausibility": 9} and {oops}', rubric)
    assert verdict is None and reason.startswith("verdict fails schema")


def test_json_mode_follows_what_litellm_says_the_provider_supports(rubric):
    from nexus_core.evaluate.rubric import JudgeSettings, response_format

    hosted = response_format(JudgeSettings(model="openai/gpt-4o-mini"), rubric)
    assert hosted["type"] == "json_schema"
    assert hosted["json_schema"]["schema"]["required"] == rubric.names
    # an OpenAI-compatible server of unknown abilities gets plain JSON mode
    local = JudgeSettings(model="openai/judge", api_base="http://127.0.0.1:1/v1")
    assert response_format(local, rubric) == {"type": "json_object"}
    assert response_format(local.model_copy(update={"json_mode": "off"}), rubric) is None
    assert response_format(local.model_copy(update={"json_mode": "json_schema"}), rubric)["type"] == "json_schema"


def test_heuristic_judge_counts_steps_wording_and_similarity(rubric):
    answer = ("Hypothesis: drought pulses scale with biomass.\n1. Measure respiration in 40 mesocosms.\n"
              "2) Randomise plots into control and treatment.\nStep 3: compare rates at p < 0.05.\n"
              "4. Report the mean and variance.")
    assert count_ordered_steps(answer) == 4
    assert count_ordered_steps("no steps here, just 1 number") == 0
    v = heuristic_verdict(answer, answer, rubric)
    assert v["rationale"].startswith(HEURISTIC_LABEL)
    assert v["teacher_agreement"] == 5 and v["_features"]["steps"] == 4
    assert v["falsifiability"] >= 4  # measure, randomise, control, compare, rates, p <, mean, variance
    weak = heuristic_verdict("maybe", answer, rubric)
    assert all(weak[d] <= 2 for d in rubric.names)
    assert token_f1("a b c", "a b d") == pytest.approx(2 / 3)


def test_judge_items_is_the_shared_entry_point(rubric):
    from nexus_core.evaluate.rubric import judge_items

    rows = judge_items([{"question": "q", "answer": "1. a\n2. b\n3. measure c", "reference": "measure c"}], rubric)
    assert rows[0]["status"] == "ok" and rows[0]["verdict"]["rationale"].startswith(HEURISTIC_LABEL)
    assert set(rubric.names) <= set(rows[0]["verdict"])
    with pytest.raises(ValueError, match="judge kind must be"):
        judge_items([], rubric, kind="oracle")
