"""Predictions evaluate what ships: prompts truncated from the left (the question and generation prompt
survive), INT8 variants run through their INT8 runtime, every variant scored on the same rows."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from nexus_core.artifacts import raw_ref
from nexus_core.context import StepContext
from nexus_core.evaluate.predict import PredictConfig, _prompt_text, encode_prompts, run_predict
from nexus_core.io import read_table, write_parquet
from nexus_core.models.tiny import TinyLLMConfig, build_tiny_llm

TEXTS = [f"note {i}: the cat sat on the mat while a dog ran in the park. Why did the dog run?" for i in range(12)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llm(tmp_path_factory.mktemp("predict") / "model", TEXTS,
                          TinyLLMConfig(vocab_size=300, num_hidden_layers=2))


def test_long_prompts_are_truncated_from_the_left_keeping_question_and_generation_prompt(tiny):
    from nexus_core.models.io import load_tokenizer

    tok = load_tokenizer(tiny)
    cfg = PredictConfig(max_input_tokens=24)
    long_text = " ".join(TEXTS[:6]) + " QUESTION: why did the dog run?"
    prompts = [_prompt_text(tok, cfg, long_text), _prompt_text(tok, cfg, "why?")]
    full = tok(prompts[0], add_special_tokens=False)["input_ids"]
    assert len(full) > 24 and tok.chat_template  # the chat template appends the generation prompt
    enc = encode_prompts(tok, prompts, cfg.max_input_tokens)
    assert enc["input_ids"].shape[1] == 24
    assert enc["input_ids"][0].tolist() == full[-24:]  # the end survives: question + generation prompt
    kept = tok.decode(enc["input_ids"][0])
    assert "why did the dog run?" in kept and kept.rstrip().endswith("assistant") and "note 0" not in kept
    assert enc["attention_mask"][1][0] == 0 and enc["attention_mask"][1][-1] == 1  # short prompt left-padded


def test_an_int8_variant_is_predicted_through_its_int8_runtime_on_the_same_rows(tiny, tmp_path):
    from nexus_core.compress.quantize import QuantizeConfig, run_quantize
    from nexus_core.runner import run_step

    int8 = run_step(run_quantize, QuantizeConfig(method="int8_dynamic"), name="pred_int8",
                    inputs={"model": raw_ref(tiny)}).ref
    data = tmp_path / "val"
    data.mkdir()
    write_parquet(pl.DataFrame({"row_id": [f"r{i}" for i in range(5)], "input": TEXTS[:5],
                                "output": ["Because the cat sat."] * 5}), data / "data.parquet")
    cfg = PredictConfig(max_new_tokens=3, max_rows=4, batch_size=2)
    results, tables = {}, {}
    for name, model in {"base": raw_ref(tiny), "int8": int8}.items():
        out = tmp_path / name
        out.mkdir()
        results[name] = run_predict(cfg, inputs={"model": model, "dataset": raw_ref(data)}, out_uri=str(out),
                                    ctx=StepContext.detached())
        tables[name] = read_table(out / "data.parquet")
    assert {k: r.runtime for k, r in results.items()} == {"base": "float", "int8": "int8"}
    assert len({r.rows_digest for r in results.values()}) == 1  # perplexity and answers from the same rows
    assert all(t["row_id"].to_list() == ["r0", "r1", "r2", "r3"] for t in tables.values())
    # the int8 runtime scores the references (quantization moves them), not the float base's weights
    assert tables["int8"]["ref_nll"].to_list() != tables["base"]["ref_nll"].to_list()
