"""Fixtures of the training tests: a tiny base model and small datasets as raw files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nexus_core.artifacts import ArtifactRef, raw_ref

QA = [
    ("What is two plus two?", "Four."),
    ("Name a primary colour.", "Red."),
    ("What gas do plants absorb?", "Carbon dioxide."),
    ("Which planet is largest?", "Jupiter."),
    ("What is ice made of?", "Frozen water."),
    ("How many legs has a spider?", "Eight."),
    ("What is the capital of France?", "Paris."),
    ("Which metal is liquid at room temperature?", "Mercury."),
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def train_files(tmp_path_factory) -> dict[str, Path]:
    """Raw dataset files for each method family."""
    root = tmp_path_factory.mktemp("train-data")
    sft = [{"input": q, "output": a, "meta": {"domain": "trivia"}} for q, a in QA]
    prefs = [{"prompt": q, "chosen": a, "rejected": "I do not know."} for q, a in QA]
    math = [{"prompt": f"What is {i} plus {i}? Answer with a number.", "answer": str(2 * i)} for i in range(8)]
    text = [{"text": f"{q} {a} " * 4} for q, a in QA]
    return {
        "sft": _write_jsonl(root / "sft.jsonl", sft),
        "prefs": _write_jsonl(root / "prefs.jsonl", prefs),
        "math": _write_jsonl(root / "math.jsonl", math),
        "text": _write_jsonl(root / "text.jsonl", text),
    }


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> ArtifactRef:
    """A tiny Llama with a BPE tokenizer trained on the test texts, as a raw ref."""
    from nexus_core.models.tiny import TinyLLMConfig, build_tiny_llm

    texts = [f"{q} {a}" for q, a in QA] * 4 + ["I do not know. <think> </think> Answer: 0 1 2 3 4 5 6 7 8 9"]
    out = tmp_path_factory.mktemp("tiny-base") / "model"
    build_tiny_llm(out, texts, TinyLLMConfig(vocab_size=320, hidden_size=32, intermediate_size=64,
                                             num_attention_heads=4, num_key_value_heads=2))
    return raw_ref(out)


@pytest.fixture(scope="session")
def refs(train_files) -> dict[str, ArtifactRef]:
    """ArtifactRefs of the raw dataset files."""
    return {k: raw_ref(v) for k, v in train_files.items()}


def teacher_logprobs(model_path: Path, prompt: str, response: str, k: int = 4) -> str:
    """What an OpenAI-compatible server reports for ``response``: per token its text, logprob and top-k."""
    import torch

    from nexus_core.models.io import load_causal_lm

    model, tok = load_causal_lm(model_path)
    prompt_ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    prompt_ids = list(prompt_ids["input_ids"] if isinstance(prompt_ids, dict) else prompt_ids)
    resp = tok(response, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt_ids + resp])).logits[0], -1)
    out = []
    for j, tid in enumerate(resp):
        row = logp[len(prompt_ids) + j - 1]
        top = torch.topk(row, k)
        out.append({"token": tok.decode([tid]), "logprob": float(row[tid]),
                    "top_logprobs": [{"token": tok.decode([int(i)]), "logprob": float(v)}
                                     for v, i in zip(top.values, top.indices, strict=True)]})
    return json.dumps(out)
