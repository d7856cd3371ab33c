"""Capability detection/formatting, the dataset organizer, and every YAML under configs/train/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.common import load_flow_config
from flows.llm_train import LLMTrainConfig
from nexus_core.errors import ConfigError
from nexus_core.io import read_table
from nexus_core.train.capabilities import detect_capability, organize, to_messages
from nexus_core.train.data import sft_records

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("keys", "capability"), [
    ({"input", "tool_calls", "tools"}, "tools"),
    ({"input", "thinking", "output"}, "thinking"),
    ({"question", "reasoning_content", "answer"}, "reasoning"),
    ({"question", "rationale", "answer"}, "cot"),
    ({"prompt", "output", "safety_category"}, "safety"),
    ({"input", "output", "over_refusal"}, "anti_refusal"),
    ({"input", "output"}, None),
])
def test_detect_capability(keys, capability):
    assert detect_capability(keys) == capability


def test_capability_rows_render_as_chat():
    tool = to_messages({"input": "rate of plot 3?", "tools": [{"name": "get_rate"}],
                        "tool_calls": [{"name": "get_rate", "arguments": {"plot": 3}}]}, "tools")
    assert tool[0]["role"] == "system" and "get_rate" in tool[0]["content"]
    assert tool[-1]["content"] == '<tool_call>{"arguments": {"plot": 3}, "name": "get_rate"}</tool_call>'
    think = to_messages({"input": "q", "thinking": "because", "output": "a"}, "thinking")
    assert think[-1] == {"role": "assistant", "content": "<think>because</think>\na"}
    cot = to_messages({"question": "q", "rationale": "r", "answer": "4"}, "cot")
    assert cot == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r\nAnswer: 4"}]


TOOL_ROW = {"input": "rate of plot 3?", "output": "",
            "tools": json.dumps([{"type": "function", "function": {"name": "get_rate", "description": "Soil rate",
                                  "parameters": {"type": "object", "properties": {"plot": {"type": "integer"}}}}}]),
            "tool_calls": json.dumps([{"type": "function",
                                       "function": {"name": "get_rate", "arguments": '{"plot": 3}'}}])}


def test_tool_rows_render_through_the_templates_own_tool_format(tiny_model):
    import polars as pl

    from nexus_core.models.io import load_tokenizer
    from nexus_core.train.chat import encode_chat, supports_tools, template_file

    (record,) = sft_records(pl.DataFrame([TOOL_ROW]), "tools.jsonl")
    assert record["tools"][0]["function"]["name"] == "get_rate"  # passed to apply_chat_template(tools=...)
    assert record["messages"][-1]["tool_calls"] == [
        {"type": "function", "function": {"name": "get_rate", "arguments": {"plot": 3}}}]
    tok = load_tokenizer(tiny_model.path)
    tok.chat_template = template_file("qwen2.5").read_text()
    assert supports_tools(tok)
    enc = encode_chat(tok, record["messages"], 2048, tools=record["tools"])
    text = tok.decode(enc["input_ids"])
    assert "# Tools" in text and '"description": "Soil rate"' in text  # Qwen2.5's <tools> system block
    assert '<tool_call>\n{"name": "get_rate", "arguments": {"plot": 3}}\n</tool_call>' in text
    loss = tok.decode([t for t, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m])
    assert '"arguments": {"plot": 3}' in loss and "Soil rate" not in loss  # the call is learned, the tools are not

    tok.chat_template = template_file("chatml").read_text()  # no tool format: the text form, not dropped
    assert not supports_tools(tok)
    text = tok.decode(encode_chat(tok, record["messages"], 2048, tools=record["tools"])["input_ids"])
    assert "You can call these tools" in text and "Soil rate" in text
    assert '<tool_call>{"arguments": {"plot": 3}, "name": "get_rate"}</tool_call>' in text


def test_sft_records_use_capability_format_for_raw_capability_data():
    df = read_table(REPO / "data/raw/train/reasoning.jsonl")
    rows = sft_records(df, "reasoning.jsonl")
    assert rows[0]["messages"][-1]["content"].startswith("<think>")


def test_organize_files_dataset_by_capability(tmp_path):
    src = tmp_path / "calls.jsonl"
    src.write_text(json.dumps({"input": "x", "tool_calls": []}) + "\n")
    dest = organize(src, root=tmp_path / "data")
    assert dest == tmp_path / "data/raw/datasets/tools/calls.jsonl"
    assert dest.read_text() == src.read_text()


@pytest.mark.parametrize("path", sorted((REPO / "configs/train").glob("*.yaml")), ids=lambda p: p.name)
def test_every_train_yaml_validates(path):
    cfg = load_flow_config(LLMTrainConfig, str(path))
    assert cfg.name
    assert cfg.stages or path.name == "base.yaml"
    for stage in cfg.stages:  # every dataset is named here, or (lifecycle sections) passed in by the caller
        assert stage.dataset in cfg.datasets or path.name.startswith("lifecycle")


def test_bad_queue_is_rejected_with_the_key():
    with pytest.raises(ConfigError, match=r"stages\[0\]\.train\.sft.*unknown key|stages.0.train"):
        load_flow_config(LLMTrainConfig, None, ["stages=[{name: a, dataset: d, train: {method: sft, lr: 1}}]"])
    with pytest.raises(ConfigError, match="kd with source=model needs a teacher"):
        load_flow_config(LLMTrainConfig, None, ["stages=[{name: a, dataset: d, train: {method: kd}}]"])


def test_cli_dry_run_flag_becomes_the_dry_run_override():
    from flows.cli import build_parser

    args = build_parser().parse_args(["run", "llm_train", "configs/train/tiny.yaml", "quick=true", "--dry-run"])
    assert args.dry_run and args.overrides == ["quick=true"]


def test_every_training_recipe_is_in_the_recipes_readme():
    table = (REPO / "configs" / "train" / "README.md").read_text()
    missing = [p.name for p in sorted((REPO / "configs" / "train").glob("*.yaml")) if f"`{p.name}`" not in table]
    assert not missing, f"configs/train/README.md does not document: {missing}"
