"""KD wired to what distill writes: teacher top-k logprobs asked for through litellm, carried to the SFT
package (matching each row's final answer), and trained from by configs/train/kd.yaml.

The end-to-end test is a user's run: the project's own OpenAI-compatible server hosts a tiny teacher,
the distill flow (configs/distill/kd_teacher.yaml) collects from it over HTTP with logprobs on, and the
llm_train flow (configs/train/kd.yaml, unchanged dataset name) distils a tiny student from the package.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

from nexus_core.artifacts import raw_ref, read_manifest
from nexus_core.distill.collect import CollectConfig, run_teacher_collect
from nexus_core.distill.package import PackageConfig, run_sft_package
from nexus_core.distill.prompts import TeacherConfig
from nexus_core.distill.regenerate import RegenerateConfig, run_regenerate
from nexus_core.errors import StepError
from nexus_core.runner import run_step
from tests.support.distill_teacher import write_teacher_inputs
from tests.support.openai_stub import Reply, StubServer, chat_completion
from tests.train.conftest import QA

# Any word is an action verb; answers of 5 characters or fewer ("Four.", "Red.") are rejected.
RULES = """min_chars: 5
action_verbs: [""]
citation_patterns: []
format_patterns: []
falsifiable_patterns: []
methodology_patterns: []
falsifiable_templates: []
methodology_templates: []
"""


def _lp(text: str) -> list[dict]:
    return [{"token": w, "logprob": -0.5, "top_logprobs": [{"token": w, "logprob": -0.5}, {"token": "x", "logprob": -1.5}]}
            for w in text.split()]


def _answer(with_logprobs: Callable[[str], bool]) -> Callable[[dict, int], Reply]:
    """Echo-style answers; logprobs when asked and ``with_logprobs(prompt)``."""
    def handler(body: dict, n: int) -> Reply:
        content = "Answer to " + body["messages"][-1]["content"]
        lp = _lp(content) if body.get("logprobs") and with_logprobs(body["messages"][-1]["content"]) else None
        return Reply(body=chat_completion(content, logprobs=lp))
    return handler


def test_collect_asks_for_logprobs_counts_rows_without_and_refuses_a_teacher_with_none(tmp_path, data_root):
    ti = raw_ref(write_teacher_inputs(tmp_path / "ti", [f"question {i}" for i in range(6)]))
    with StubServer(_answer(lambda prompt: prompt != "question 2")) as stub:
        cfg = CollectConfig(teacher=TeacherConfig(model="openai/t", api_base=stub.url, top_logprobs=2), batch_size=3)
        res = run_step(run_teacher_collect, cfg, name="lp", inputs={"teacher_inputs": ti})
        assert {(b["logprobs"], b["top_logprobs"]) for b in stub.requests} == {(True, 2)}
    df = pl.read_parquet(res.ref.path / "data.parquet").sort("row_id")
    assert res.ok == 6 and res.missing_logprobs == 1 and read_manifest(res.ref.uri).metrics["missing_logprobs"] == 1
    assert df["logprobs_json"].is_null().to_list() == [False, False, True, False, False, False]
    second = json.loads(df["logprobs_json"][0])[0]["top_logprobs"][1]
    assert (second["token"], second["logprob"]) == ("x", -1.5)
    with StubServer(_answer(lambda prompt: False)) as stub:  # a provider that ignores logprobs
        cfg = CollectConfig(teacher=TeacherConfig(model="openai/nolp", api_base=stub.url, top_logprobs=2), batch_size=3)
        with pytest.raises(StepError, match=r"openai/nolp: teacher.top_logprobs is 2 but none of the 3 answered"):
            run_step(run_teacher_collect, cfg, name="nolp", inputs={"teacher_inputs": ti})
        assert len(stub.requests) == 3  # stopped after the first batch, not at the end of the run


def test_package_keeps_the_logprobs_of_each_final_answer(tmp_path, data_root, repo):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    n = 3
    reviewed = pl.DataFrame({
        "row_id": ["kept", "edited", "rejected"], "domain": ["d"] * n, "template_name": ["t"] * n,
        "template_hash": ["h"] * n, "system_prompt": ["s"] * n, "user_prompt": ["p1", "p2", "p3"],
        "response": ["first answer", "second answer", "bad"], "logprobs_json": [json.dumps(_lp(x)) for x in
                                                                                ("first answer", "second answer", "bad")],
        "decision": ["accept", "accept", "reject"], "decision_source": ["auto", "human", "auto"],
        "reviewed_output": ["first answer", "a reviewer's answer", "bad"], "review_reason": [None, None, "too_short"]})
    (tmp_path / "rev").mkdir()
    reviewed.write_parquet(tmp_path / "rev" / "data.parquet")
    with StubServer(_answer(lambda prompt: True)) as stub:
        cfg = RegenerateConfig(max_rounds=1, rules=str(rules), prompts_dir=str(repo / "configs/distill/prompts"),
                               teacher=TeacherConfig(model="openai/t", api_base=stub.url, top_logprobs=2))
        regen = run_step(run_regenerate, cfg, name="regen", inputs={"reviewed": raw_ref(tmp_path / "rev")})
    sft = run_step(run_sft_package, PackageConfig(), name="pkg", inputs={"regenerated": regen.ref})
    out = {r["meta"]["row_id"]: r for r in pl.read_parquet(sft.ref.path / "data.parquet").to_dicts()}
    assert out["kept"]["logprobs_json"] == reviewed["logprobs_json"][0]
    assert out["edited"]["output"] == "a reviewer's answer" and out["edited"]["logprobs_json"] is None
    rescued = out["rejected"]
    assert rescued["meta"]["origin"] == "regenerated"
    assert [e["token"] for e in json.loads(rescued["logprobs_json"])] == rescued["output"].split()
    assert read_manifest(sft.ref.uri).metrics["rows_with_logprobs"] == 2
    # without logprobs asked for, the package keeps its plain layout
    plain = regen.ref.path / "data.parquet"
    (tmp_path / "plain").mkdir()
    pl.read_parquet(plain).with_columns(final_logprobs_json=pl.lit(None, pl.Utf8)).write_parquet(
        tmp_path / "plain" / "data.parquet")
    sft2 = run_step(run_sft_package, PackageConfig(), name="pkg2", inputs={"regenerated": raw_ref(tmp_path / "plain")})
    assert pl.read_parquet(sft2.ref.path / "data.parquet").columns == ["input", "output", "meta"]


@pytest.fixture(scope="module")
def teacher(tiny_llm: Path, tmp_path_factory) -> Path:
    """The tiny model after it learned the QA answers (a random one samples byte soup that no tokenizer
    segments the way it was generated, which the kd stage rightly refuses)."""
    from nexus_core.train.sft import SFTConfig, run_sft

    qa = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    qa.write_text("".join(json.dumps({"input": q, "output": a}) + "\n" for q, a in QA))
    res = run_step(run_sft, SFTConfig(finetune="full", max_steps=100, batch_size=8, learning_rate=1e-2,
                                      checkpoint={"save_steps": 100}),
                   name="kd_test_teacher", inputs={"model": raw_ref(tiny_llm), "data": raw_ref(qa)})
    return res.ref.path


@pytest.mark.integration
def test_distill_flow_with_logprobs_from_our_server_then_kd_recipe(prefect_harness, data_root, tmp_path, repo,
                                                                    tiny_llm, teacher):
    from flows.common import load_flow_config
    from flows.distill import DistillConfig, distill
    from flows.llm_train import LLMTrainConfig, llm_train
    from nexus_core.serve import serve_in_thread
    from nexus_core.serve.app import create_app

    raw = tmp_path / "qa.jsonl"
    raw.write_text("".join(json.dumps({"title": q, "abstract": "", "domain": "trivia", "text": q}) + "\n"
                           for q, _ in QA))
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "qa.yaml").write_text('system: ""\nuser: "{text}"\n')
    (tmp_path / "rules.yaml").write_text(RULES)
    app = create_app({"teacher": str(teacher)})
    with serve_in_thread(app) as url:
        cfg = load_flow_config(DistillConfig, str(repo / "configs/distill/kd_teacher.yaml"), [
            f"sources=[{raw}]", "inputs.templates=[qa]", f"inputs.prompts_dir={prompts}", f"teacher.api_base={url}",
            "teacher.temperature=0", "teacher.max_tokens=16", "teacher.top_logprobs=3",
            f"filters.rules={tmp_path / 'rules.yaml'}", "regenerate.max_rounds=0"])
        got = distill(cfg)
    app.state.close()
    assert got.collected_ok == 8 and got.filter_kept == 6 and got.sft_rows == 6  # "Four." and "Red." filtered out
    rows = pl.read_parquet(got.sft.path / "data.parquet").to_dicts()
    answers = dict(QA)
    for r in rows:
        assert r["output"] == answers[r["input"]]  # the teacher learned its answers
        entries = json.loads(r["logprobs_json"])
        assert "".join(e["token"] for e in entries) == r["output"] + "<|im_end|>"  # end of turn included
        assert all(len(e["top_logprobs"]) == 3 and e["logprob"] <= 0 for e in entries)
    train_cfg = load_flow_config(LLMTrainConfig, str(repo / "configs/train/kd.yaml"), [
        f"base_model={tiny_llm}", "quick=true", "quick_steps=2", "register_models=false"])
    trained = llm_train(train_cfg)
    kd = read_manifest(trained.artifacts["kd"].uri)
    assert kd.inputs["data"].digest == got.sft.digest  # kd.yaml's dataset name is what distill wrote
    assert kd.result["steps"] == 2 and math.isfinite(kd.metrics["train_loss"]) and kd.metrics["param_delta"] > 0
