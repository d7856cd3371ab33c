"""Helpers the compress steps share: texts, sizes, saving, perplexity.

Works on decoder-only HF models with the Llama layout (``model.model.layers[i].self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``): Llama, Qwen2, Mistral and the tiny presets. Heavy imports stay inside.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from nexus_core.artifacts import ArtifactRef
from nexus_core.errors import InputError


def load_rows(ref: ArtifactRef) -> Any:
    """The rows of a dataset input: an artifact's table, or a raw table file (``data/raw/…/x.jsonl``)."""
    from nexus_core.io import load_table, read_table

    return read_table(ref.path) if ref.path.is_file() else load_table(ref)


def load_texts(ref: ArtifactRef, column: str | None = None, limit: int | None = None) -> list[str]:
    """Texts of a dataset artifact: ``column``, else ``text``, else ``input``+``output``, else ``prompt``+``completion``."""
    df = load_rows(ref)
    if column:
        if column not in df.columns:
            raise InputError(f"{ref.uri}: missing column {column!r} (columns: {', '.join(df.columns)})")
        texts = [str(x) for x in df[column].drop_nulls().to_list()]
    elif "text" in df.columns:
        texts = [str(x) for x in df["text"].drop_nulls().to_list()]
    elif {"input", "output"} <= set(df.columns):
        texts = [f"{a}\n{b}" for a, b in zip(df["input"].to_list(), df["output"].to_list(), strict=True) if a and b]
    elif {"prompt", "completion"} <= set(df.columns):
        texts = [f"{a}{b}" for a, b in zip(df["prompt"].to_list(), df["completion"].to_list(), strict=True) if a and b]
    else:
        raise InputError(f"{ref.uri}: no text column (need text, input/output or prompt/completion)")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InputError(f"{ref.uri}: no non-empty texts")
    return texts[:limit] if limit else texts


def count_params(model: Any) -> int:
    """Number of parameters (tied weights counted once), int8-packed Linear weights included."""
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        # Quantized Linears keep their weights in packed params, invisible to .parameters().
        if ".quantized" in type(m).__module__ and callable(getattr(m, "weight", None)):
            total += m.weight().numel() + (m.bias().numel() if callable(getattr(m, "bias", None))
                                           and m.bias() is not None else 0)
    return total


def dir_bytes(path: str | Path, pattern: str = "*") -> int:
    """Bytes of files under ``path`` matching ``pattern`` (recursively)."""
    return sum(f.stat().st_size for f in Path(path).rglob(pattern) if f.is_file())


def shipped_bytes(path: str | Path) -> int:
    """Bytes of every file of an artifact directory except its ``manifest.json`` (weights, config,
    tokenizer, ``quantized/``, notes): what a copy of the model moves."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.name != "manifest.json")


def save_model(model: Any, tokenizer: Any, out: str | Path) -> None:
    """Save an HF model dir (safetensors + tokenizer) so ``from_pretrained(out)`` works."""
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def perplexity(model: Any, tokenizer: Any, texts: list[str], max_length: int = 256) -> float:
    """Token-level perplexity over ``texts`` (each truncated to ``max_length``)."""
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
            if ids.shape[1] < 2:
                continue
            out = model(input_ids=ids, labels=ids)
            n = ids.shape[1] - 1
            nll += float(out.loss) * n
            count += n
    if not count:
        raise InputError("perplexity: every text is shorter than two tokens")
    return math.exp(min(nll / count, 50.0))


def text_hash(text: str) -> str:
    """Row identity for overlap checks: sha256 of the text with surrounding whitespace stripped."""
    import hashlib

    return hashlib.sha256(text.strip().encode()).hexdigest()


def overlap(heldout: ArtifactRef, others: dict[str, tuple[ArtifactRef, str | None]],
            column: str | None = None) -> dict[str, int]:
    """Held-out rows (by :func:`text_hash` of the texts the steps read) also found in each of ``others``
    (``label -> (dataset, its text column or None)``): ``label -> count``, zero counts left out. Every
    row of each other dataset counts, not just the rows a step used."""
    held = {text_hash(t) for t in load_texts(heldout, column)}
    found = {}
    for label, (ref, col) in others.items():
        n = len(held & {text_hash(t) for t in load_texts(ref, col)})
        if n:
            found[label] = n
    return found
