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
