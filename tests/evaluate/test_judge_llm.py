"""The LLM judge through litellm: against the project's own OpenAI-compatible server (a real tiny model),
against a scripted server injecting malformed verdicts (re-asked once; coverage through to the gates),
and against an unreachable endpoint."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import polars as pl
import pytest

from nexus_core.artifacts import ArtifactRef
from nexus_core.context import StepContext
from nexus_core.errors import ConfigError
from nexus_core.evaluate.judge import JudgeConfig, run_judge
from nexus_core.evaluate.rubric import JudgeSettings, JudgeUnreachable
from nexus_core.io import read_table, write_parquet
from nexus_core.models.tiny import TinyLLMConfig, build_tiny_llm
from tests.support.openai_stub import Reply, StubServer, chat_completion

REPO = Path(__file__).resolve().parents[2]
DIMS = ["plausibility", "falsifiability", "method_rigour", "reproducibility", "teacher_agreement"]


@pytest.fixture
def predictions(tmp_path: Path) -> ArtifactRef:
    d = tmp_path / "preds"
    d.mkdir()
    write_parquet(pl.DataFrame({
        "row_id": ["a", "b", "c"], "input": ["Why does soil respire?"] * 3,
        "reference": ["1. Measure CO2.\n2. Compare.\n3. Repeat."] * 3,
        "prediction": ["ANSWER-GOOD", "ANSWER-PROSE", "ANSWER-OUT-OF-RANGE"],
    }), d / "data.parquet")
    return ArtifactRef(uri=str(d), kind="dataset", name="preds", version=1, digest="x", rows=3)


def _cfg(url: str, **kw) -> JudgeConfig:
    settings = JudgeSettings(model="openai/judge", api_base=url, max_retries=2, backoff_s=0.01, timeout_s=20,
                             max_tokens=24, cache=False, **kw)
    return JudgeConfig(kind="llm", rubric=str(REPO / "configs/eval/rubric.json"), llm=settings)


def scripted(body: dict, n: int) -> Reply:
    student = body["messages"][1]["content"]  # the first user message: the same on a re-ask
    verdict = {d: 4 for d in DIMS} | {"rationale": "sound"}
    if "ANSWER-PROSE" in student:
        return Reply(body=chat_completion("The answer looks plausible to me, 4/5 overall."))
    if "ANSWER-OUT-OF-RANGE" in student:
        return Reply(body=chat_completion(json.dumps(verdict | {"method_rigour": 7})))
    return Reply(body=chat_completion("```json\n" + json.dumps(verdict) + "\n```"))


def test_malformed_verdicts_are_rows_with_reasons(tmp_path, predictions):
    with StubServer(scripted) as stub:
        result = run_judge(_cfg(stub.url), inputs={"predictions": predictions}, out_uri=str(tmp_path),
                           ctx=StepContext.detached())
        assert len(stub.requests) == 3 + 2  # the two unusable verdicts re-asked once each
        system = stub.requests[0]["messages"][0]["content"]
        reasks = [b for b in stub.requests if len(b["messages"]) == 4]
    assert all(d in system for d in DIMS)  # the rubric reaches the judge
    assert all(b["response_format"] == {"type": "json_object"} for b in stub.requests)  # JSON mode
    assert {b["messages"][2]["role"] for b in reasks} == {"assistant"}
    assert any("fails schema at method_rigour" in b["messages"][3]["content"] for b in reasks)
    assert (result.ok, result.unparseable, result.recovered, result.failed) == (1, 2, 0, 0)
    assert result.coverage == pytest.approx(1 / 3) and result.dimensions == DIMS
    assert result.judge_kind == "llm" and result.cost.tokens_in == 50
    df = read_table(tmp_path / "data.parquet").sort("row_id")
    assert df["status"].to_list() == ["ok", "unparseable", "unparseable"]
    assert df["judge_reasked"].to_list() == [False, True, True]
    assert df["plausibility"].to_list() == [4, None, None]
    assert df["reason"][1].startswith("no JSON object in verdict") and "; re-ask: no JSON object" in df["reason"][1]
    assert df["reason"][2].startswith("verdict fails schema at method_rigour")
    assert df["raw_verdict"][1].startswith("The answer looks plausible")  # kept for review
    assert set(df["judge_kind"]) == {"llm"}


def test_unreachable_judge_is_named_after_retries(tmp_path, predictions):
    with StubServer(lambda body, n: Reply(status=503, body={"error": {"message": "overloaded"}})) as stub:
        cfg = _cfg(stub.url)
        with pytest.raises(JudgeUnreachable) as err:
            run_judge(cfg, inputs={"predictions": predictions}, out_uri=str(tmp_path), ctx=StepContext.detached())
        assert len(stub.requests) == 3 * 3  # every row tried 1 + max_retries times
    assert "judge model 'openai/judge'" in str(err.value) and stub.url in str(err.value)
    assert "after 3 attempt(s)" in str(err.value)

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(JudgeUnreachable, match=r"judge model 'openai/judge' at http://127\.0\.0\.1:\d+/v1 unreachable"):
        run_judge(_cfg(dead), inputs={"predictions": predictions}, out_uri=str(tmp_path / "b"),
                  ctx=StepContext.detached())


def test_judge_cost_cap_on_an_unpriced_model_is_refused_before_any_call(tmp_path, predictions):
    with StubServer(scripted) as stub:
        with pytest.raises(ConfigError, match=r"judge\.max_cost_usd: litellm has no price for openai/judge"):
            run_judge(_cfg(stub.url, max_cost_usd=0.5), inputs={"predictions": predictions}, out_uri=str(tmp_path),
                      ctx=StepContext.detached())
        assert stub.requests == []


def test_judge_against_the_projects_own_server(tmp_path, predictions):
    from nexus_core.serve import serve_in_thread
    from nexus_core.serve.app import create_app

    # tokenizer trained on the rubric text itself: judge prompts stay short in tokens, so the test stays fast
    texts = [(REPO / "configs/eval/rubric.json").read_text(), '{"plausibility": 4, "rationale": "ok"}'] * 5
    model = build_tiny_llm(tmp_path / "judge_model", texts,
                           TinyLLMConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048))
    app = create_app({"judge": str(model)})
    try:
        with serve_in_thread(app) as url:
            result = run_judge(_cfg(url), inputs={"predictions": predictions}, out_uri=str(tmp_path / "out"),
                               ctx=StepContext.detached())
    finally:
        app.state.close()
    df = read_table(tmp_path / "out" / "data.parquet")
    # a random-weight judge cannot write a schema-valid verdict: every row is kept, with the server's answer
    # judged unusable (no JSON / empty content) — never "unreachable", since the server did answer
    assert df.height == 3 and result.ok == 0
    assert set(df["status"]) <= {"unparseable", "failed"}
    for reason in df["reason"].to_list():
        assert reason.startswith(("no JSON object", "verdict", "empty verdict")) or "malformed response" in reason
    assert result.judge == "openai/judge" and set(df["judge_kind"]) == {"llm"}
    # the server refuses response_format (it cannot constrain decoding): the rows are asked again without it
    assert result.json_mode == "json_object (refused by the server: none)"
    assert not any("response_format" in r for r in df["reason"].to_list())


def test_judge_key_covers_the_rubric_and_an_llm_judges_recorded_answers(tmp_path):
    from nexus_core.cachekey import step_key

    rubric = tmp_path / "rubric.json"
    rubric.write_text((REPO / "configs/eval/rubric.json").read_text())
    recorded = tmp_path / "recorded.jsonl"
    recorded.write_text("")
    llm = JudgeConfig(kind="llm", rubric=str(rubric), llm=JudgeSettings(recorded_cache=[str(recorded)]))
    heuristic = llm.model_copy(update={"kind": "heuristic"})
    before = {c.kind: step_key(run_judge, c, {}) for c in (llm, heuristic)}
    recorded.write_text('{"key": "k", "response": {}}\n')
    after_recorded = {c.kind: step_key(run_judge, c, {}) for c in (llm, heuristic)}
    assert after_recorded["llm"] != before["llm"]
    assert after_recorded["heuristic"] == before["heuristic"]  # the heuristic never asks a model
    rubric.write_text(rubric.read_text().replace("scientifically plausible", "credible"))
    assert step_key(run_judge, heuristic, {}) != before["heuristic"]


def _eight(tmp_path: Path) -> ArtifactRef:
    d = tmp_path / "preds8"
    d.mkdir(exist_ok=True)
    write_parquet(pl.DataFrame({
        "row_id": [f"r{i}" for i in range(8)], "input": [f"Question {i}: why?" for i in range(8)],
        "reference": ["1. Measure.\n2. Compare.\n3. Repeat."] * 8,
        "prediction": [f"1. Measure {i}.\n2. Control.\n3. Compare rates." for i in range(8)],
    }), d / "data.parquet")
    return ArtifactRef(uri=str(d), kind="dataset", name="preds8", version=1, digest="y", rows=8)


def _one_in_eight(recover: bool):
    """Prose for 7 rows of 8 (row r0 gets a verdict); with ``recover`` a re-ask gets a verdict too."""
    verdict = json.dumps({d: 5 for d in DIMS} | {"rationale": "good"})

    def handler(body: dict, n: int) -> Reply:
        first_question = "Question 0:" in body["messages"][1]["content"]
        reasked = len(body["messages"]) > 2
        if first_question or (recover and reasked):
            return Reply(body=chat_completion(f"Verdict: {verdict} {{end}}"))  # trailing braces: still parsed
        return Reply(body=chat_completion("A careful answer; I would rate it highly overall."))
    return handler


def test_a_judge_usable_on_one_row_in_eight_fails_its_judged_gates(tmp_path):
    """Real HTTP through litellm to a stub judge answering prose for 7 rows of 8: coverage 0.125,
    unparseable 7 (re-asked, still prose); the judged gates fail on coverage, not on the one high score."""
    from nexus_core.evaluate.gates import GatesConfig, run_gates

    with StubServer(_one_in_eight(recover=False)) as stub:
        judged = run_judge(_cfg(stub.url), inputs={"predictions": _eight(tmp_path)}, out_uri=str(tmp_path / "j"),
                           ctx=StepContext.detached())
        assert len(stub.requests) == 8 + 7
    assert (judged.ok, judged.unparseable, judged.recovered, judged.coverage) == (1, 7, 0, 0.125)
    assert judged.metrics["llm_judge.coverage"] == 0.125 and judged.metrics["llm_judge.unparseable"] == 7
    ref = ArtifactRef(uri=str(tmp_path / "j"), kind="dataset", name="j", version=1, digest="z", rows=8)
    (tmp_path / "g").mkdir()
    gates = run_gates(GatesConfig(), inputs={"judged": ref}, out_uri=str(tmp_path / "g"), ctx=StepContext.detached())
    assert not gates.passed
    assert gates.failed_gates == ["plausibility_median", "falsifiability_median", "teacher_agreement_top500"]
    assert gates.values["plausibility_median"] == 5.0  # the one verdict was high: coverage is what fails it
    assert set(gates.coverage.values()) == {0.125, 1.0}  # methodology is rule-counted on every row

    with StubServer(_one_in_eight(recover=True)) as stub:
        again = run_judge(_cfg(stub.url), inputs={"predictions": _eight(tmp_path)}, out_uri=str(tmp_path / "k"),
                          ctx=StepContext.detached())
    assert (again.ok, again.unparseable, again.recovered, again.coverage) == (8, 7, 7, 1.0)
