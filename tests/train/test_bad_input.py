"""Bad input stops a stage with one clear message before any compute starts: the step contracts
(checked by the runner, and by dry runs for every stage up front) and the stages' own row-level checks."""

from __future__ import annotations

import pytest

from nexus_core.artifacts import ArtifactRef, raw_ref
from nexus_core.config import load_config
from nexus_core.context import StepContext
from nexus_core.contract import input_problems
from nexus_core.errors import ConfigError, InputError, StepError
from nexus_core.models.tiny import TinyLLMConfig, build_tiny_llm
from nexus_core.runner import run_step
from nexus_core.settings import nexus_home
from nexus_core.train.cpt import run_cpt
from nexus_core.train.dpo import DPOConfig, run_dpo
from nexus_core.train.grpo import GRPOConfig, run_grpo
from nexus_core.train.kd import KDConfig, run_kd
from nexus_core.train.orpo import run_orpo
from nexus_core.train.sft import SFTConfig, run_sft
from tests.train.conftest import QA, _write_jsonl, teacher_logprobs


def _work_dirs() -> set[str]:
    root = nexus_home() / "work" / "train"
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


def test_missing_columns_are_named(tiny_model, refs, tmp_path):
    before = _work_dirs()
    with pytest.raises(InputError, match=r"dpo: input 'data' \(.*sft\.jsonl\): needs a table with column\(s\) "
                                         r"chosen/rejected; has: input, output, meta"):
        run_step(run_dpo, DPOConfig(), name="t_bad_dpo", inputs={"model": tiny_model, "data": refs["sft"]})
    assert _work_dirs() == before  # the contract stopped it before the runner made a work dir
    # What only the step can check (which columns the configured rewards need): stopped before training.
    ctx = StepContext.detached()
    with pytest.raises(InputError, match="reward 'exact_match' needs column answer"):
        run_grpo(GRPOConfig(), inputs={"model": tiny_model, "data": refs["prefs"]}, out_uri=str(tmp_path / "o"),
                 ctx=ctx)
    assert not any(ctx.work_dir.iterdir())  # no checkpoints, no launch spec


def test_missing_base_model_path(refs, tmp_path):
    ghost = ArtifactRef(uri=str(tmp_path / "nope"), kind="model", name="nope", version=0, digest="0")
    with pytest.raises(InputError, match=r"sft: input 'model' \(.*nope\): does not exist"):
        run_step(run_sft, SFTConfig(), name="t_ghost", inputs={"model": ghost, "data": refs["sft"]})


def test_contracts_accept_every_documented_layout_and_name_what_is_missing(tiny_model, refs, tmp_path):
    def table(name: str, **row: str) -> ArtifactRef:
        return raw_ref(_write_jsonl(tmp_path / f"{name}.jsonl", [row]))

    # SFT: the plain layouts, and capability data (reasoning rows: question/reasoning_content/answer).
    for data in (table("msgs", messages="[]"), table("pc", prompt="q", completion="a"), table("txt", text="t"),
                 table("reasoning", question="q", reasoning_content="r", answer="a")):
        assert input_problems(run_sft, {"model": tiny_model, "data": data}) == []
    assert input_problems(run_sft, {"model": tiny_model, "data": table("q", question="q")}) != []
    # KD: teacher collection rows (user_prompt/response) as well as SFT pairs; the teacher is optional.
    assert input_problems(run_kd, {"model": tiny_model, "data": table("coll", user_prompt="q", response="a")}) == []
    assert input_problems(run_kd, {"model": tiny_model, "data": refs["sft"], "teacher": None}) == []
    # ORPO needs the prompt as well as the pair; GRPO a prompt; CPT's text column is config (the step checks it).
    assert input_problems(run_orpo, {"model": tiny_model, "data": table("pair", chosen="a", rejected="b")}) == [
        f"orpo: input 'data' ({tmp_path / 'pair.jsonl'}): needs a table with column(s) prompt/chosen/rejected or "
        "input/chosen/rejected; has: chosen, rejected"]
    assert input_problems(run_grpo, {"model": tiny_model, "data": refs["sft"]}) == []
    assert input_problems(run_cpt, {"model": tiny_model, "data": refs["sft"]}) == []
    # Both missing inputs are named at once, before anything loads.
    missing = input_problems(run_sft, {})
    assert [p.split(" (")[0] for p in missing] == ["sft: missing input 'model'", "sft: missing input 'data'"]
    assert "messages or input/output or prompt/completion or text or tool_calls" in missing[1]


def test_qlora_on_cpu_is_refused_and_qlora_with_full_is_invalid(tiny_model, refs, tmp_path):
    with pytest.raises(StepError, match="needs a CUDA GPU"):
        run_step(run_sft, SFTConfig(finetune="qlora", max_steps=1), name="t_qlora",
                 inputs={"model": tiny_model, "data": refs["sft"]})
    with pytest.raises(ConfigError, match="cannot be combined with finetune=full"):
        load_config(None, SFTConfig, ["finetune=full", "load_in_4bit=true"])


def test_kd_mismatched_tokenizers(tiny_model, refs, tmp_path):
    other = raw_ref(build_tiny_llm(tmp_path / "other", ["zebra quokka axolotl " * 30],
                                   TinyLLMConfig(vocab_size=300, hidden_size=16, intermediate_size=32)))
    with pytest.raises(InputError, match="different tokenizers"):
        run_kd(KDConfig(source="model"), inputs={"model": tiny_model, "data": refs["sft"], "teacher": other},
               out_uri=str(tmp_path / "o"), ctx=StepContext.detached())
    rows = [{"user_prompt": q, "response": a, "logprobs_json": teacher_logprobs(other.path, q, a)} for q, a in QA[:2]]
    data = raw_ref(_write_jsonl(tmp_path / "c.jsonl", rows))
    with pytest.raises(InputError, match="teacher tokens are not tokens of the student's tokenizer"):
        run_kd(KDConfig(source="logprobs"), inputs={"model": tiny_model, "data": data}, out_uri=str(tmp_path / "o"),
               ctx=StepContext.detached())
