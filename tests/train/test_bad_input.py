"""Bad input stops a stage with one clear message before any compute starts."""

from __future__ import annotations

import pytest

from nexus_core.artifacts import ArtifactRef, raw_ref
from nexus_core.config import load_config
from nexus_core.errors import ConfigError, InputError, StepError
from nexus_core.models.tiny import TinyLLMConfig, build_tiny_llm
from nexus_core.runner import run_step
from nexus_core.settings import nexus_home
from nexus_core.train.dpo import DPOConfig, run_dpo
from nexus_core.train.grpo import GRPOConfig, run_grpo
from nexus_core.train.kd import KDConfig, run_kd
from nexus_core.train.sft import SFTConfig, run_sft
from tests.train.conftest import QA, _write_jsonl, teacher_logprobs


def _work_dirs() -> set[str]:
    root = nexus_home() / "work" / "train"
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


def test_missing_columns_are_named(tiny_model, refs):
    before = _work_dirs()
    with pytest.raises(InputError, match=r"sft\.jsonl: method 'dpo' needs column\(s\) chosen/rejected; has: input"):
        run_dpo(DPOConfig(), inputs={"model": tiny_model, "data": refs["sft"]}, out_uri="/nonexistent")
    with pytest.raises(InputError, match="reward 'exact_match' needs column answer"):
        run_grpo(GRPOConfig(), inputs={"model": tiny_model, "data": refs["prefs"]}, out_uri="/nonexistent")
    assert _work_dirs() == before  # nothing started


def test_missing_base_model_path(refs, tmp_path):
    ghost = ArtifactRef(uri=str(tmp_path / "nope"), kind="model", name="nope", version=0, digest="0")
    with pytest.raises(InputError, match="nope: model path does not exist"):
        run_sft(SFTConfig(), inputs={"model": ghost, "data": refs["sft"]}, out_uri=str(tmp_path / "out"))


def test_qlora_on_cpu_is_refused_and_qlora_with_full_is_invalid(tiny_model, refs, tmp_path):
    with pytest.raises(StepError, match="needs a CUDA GPU"):
        run_step(run_sft, SFTConfig(finetune="qlora", max_steps=1), area="train", name="t_qlora", kind="model",
                 inputs={"model": tiny_model, "data": refs["sft"]})
    with pytest.raises(ConfigError, match="cannot be combined with finetune=full"):
        load_config(None, SFTConfig, ["finetune=full", "load_in_4bit=true"])


def test_kd_mismatched_tokenizers(tiny_model, refs, tmp_path):
    other = raw_ref(build_tiny_llm(tmp_path / "other", ["zebra quokka axolotl " * 30],
                                   TinyLLMConfig(vocab_size=300, hidden_size=16, intermediate_size=32)))
    with pytest.raises(InputError, match="different tokenizers"):
        run_kd(KDConfig(source="model"), inputs={"model": tiny_model, "data": refs["sft"], "teacher": other},
               out_uri=str(tmp_path / "o"))
    rows = [{"user_prompt": q, "response": a, "logprobs_json": teacher_logprobs(other.path, q, a)} for q, a in QA[:2]]
    data = raw_ref(_write_jsonl(tmp_path / "c.jsonl", rows))
    with pytest.raises(InputError, match="teacher tokens are not tokens of the student's tokenizer"):
        run_kd(KDConfig(source="logprobs"), inputs={"model": tiny_model, "data": data}, out_uri=str(tmp_path / "o"))
