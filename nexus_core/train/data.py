"""Training datasets: load any dataset artifact (or raw file) and shape it for a trl trainer.

Accepted layouts (checked before any compute; the missing columns are named):

- SFT / KD: ``messages`` | ``input``/``output`` | ``prompt``/``completion`` | ``text``
- DPO / ORPO / reward: ``chosen``/``rejected`` (+ optional ``prompt``)
- GRPO: ``prompt`` or ``input`` (+ ``answer`` for exact-match rewards)
- CPT: ``text``

SFT also accepts capability data (tool calls, reasoning, ...: ``train.capabilities``). The step
contracts declare these layouts (:func:`contract_layouts`), so the runner and dry runs check them
before any work; the stages check them again on the loaded rows (formats whose columns the
contract cannot read cheaply, steps called directly).

String prompts become conversational (chat template) records when ``chat`` is on.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import polars as pl

from nexus_core.artifacts import ArtifactRef
from nexus_core.errors import InputError
from nexus_core.io import load_table, read_table
from nexus_core.train.capabilities import CAPABILITY_KEYS, detect_capability, to_chat

Use = Literal["sft", "preference", "prompt", "text"]

LAYOUTS: dict[Use, list[tuple[str, ...]]] = {
    "sft": [("messages",), ("input", "output"), ("prompt", "completion"), ("text",)],
    "preference": [("chosen", "rejected")],
    "prompt": [("prompt",), ("input",)],
    "text": [("text",)],
}


def contract_layouts(use: Use) -> list[tuple[str, ...]]:
    """The column sets a step contract accepts for ``use``: ``LAYOUTS[use]``, and for SFT also any
    column that marks capability data (what :func:`layout` accepts, as a contract can say it)."""
    if use == "sft":
        return LAYOUTS["sft"] + [(marker,) for _, markers in CAPABILITY_KEYS for marker in markers]
    return LAYOUTS[use]


def need(inputs: dict[str, ArtifactRef], key: str, method: str) -> ArtifactRef:
    """``inputs[key]``, or an InputError naming the missing input."""
    if key not in inputs:
        raise InputError(f"{method}: missing input {key!r} (have: {', '.join(inputs) or 'none'})")
    return inputs[key]


def load_rows(ref: ArtifactRef) -> tuple[pl.DataFrame, str]:
    """The main table of a dataset artifact or raw file, and a name for messages."""
    path = ref.path
    if not path.exists():
        raise InputError(f"{path}: dataset does not exist")
    df = read_table(path) if path.is_file() else load_table(ref)
    if df.height == 0:
        raise InputError(f"{path}: dataset is empty")
    return df, str(path / "data.parquet" if path.is_dir() and (path / "data.parquet").is_file() else path)


def layout(df: pl.DataFrame, use: Use, where: str, method: str) -> tuple[str, ...]:
    """The first accepted column layout ``df`` has for ``use``; InputError naming what is missing."""
    if use == "sft" and detect_capability(df.columns) is not None:
        return ("capability",)  # reasoning/tool/... data is rendered by its capability's chat format
    for cols in LAYOUTS[use]:
        if all(c in df.columns for c in cols):
            return cols
    wanted = " or ".join("/".join(c) for c in LAYOUTS[use])
    raise InputError(f"{where}: method {method!r} needs column(s) {wanted}; has: {', '.join(df.columns)}")


def check_table(inputs: dict[str, ArtifactRef], method: str, use: Use) -> tuple[pl.DataFrame, str]:
    """The row-level check of a stage trained on one table, before any training: ``data`` loads, is
    not empty and has a column layout for ``use``. Returns (rows, name)."""
    df, where = load_rows(need(inputs, "data", method))
    layout(df, use, where, method)
    return df, where


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _as_messages(value: Any) -> list[dict[str, Any]]:
    return json.loads(value) if isinstance(value, str) else list(value)


def sft_records(df: pl.DataFrame, where: str, method: str = "sft", chat: bool = True) -> list[dict[str, Any]]:
    """Records for trl SFTTrainer: conversational prompt/completion, messages, or plain text."""
    cols = layout(df, "sft", where, method)
    rows = df.to_dicts()
    if cols == ("capability",):
        cap = detect_capability(df.columns)  # tool rows also carry their tools (for apply_chat_template)
        return [{"messages": m} | ({"tools": t} if t else {}) for m, t in (to_chat(r, cap) for r in rows)]
    if cols == ("messages",):
        return [{"messages": _as_messages(r["messages"])} for r in rows]
    if cols == ("text",):
        return [{"text": r["text"]} for r in rows if r["text"]]
    p, c = cols
    out = []
    for r in rows:
        if r[p] is None or r[c] is None:
            continue  # rows without a response (failed teacher calls) carry nothing to learn
        out.append({"prompt": _user(r[p]), "completion": _assistant(r[c])} if chat
                   else {"prompt": r[p], "completion": r[c]})
    if not out:
        raise InputError(f"{where}: no usable rows (every {p}/{c} pair has a null)")
    return out


def preference_records(df: pl.DataFrame, where: str, method: str, chat: bool = True) -> list[dict[str, Any]]:
    """Records for DPO/ORPO/reward trainers: prompt (optional) + chosen + rejected. Rows with a null in
    any of them are left out (nothing to learn from); InputError when no row is left."""
    layout(df, "preference", where, method)
    has_prompt = "prompt" in df.columns or "input" in df.columns
    pcol = "prompt" if "prompt" in df.columns else "input"
    out = []
    for r in df.to_dicts():
        if r["chosen"] is None or r["rejected"] is None or (has_prompt and r[pcol] is None):
            continue
        if has_prompt:
            rec = {"prompt": _user(r[pcol]), "chosen": _assistant(r["chosen"]), "rejected": _assistant(r["rejected"])}
            if not chat:
                rec = {"prompt": r[pcol], "chosen": r["chosen"], "rejected": r["rejected"]}
        else:
            rec = {"chosen": r["chosen"], "rejected": r["rejected"]}
        out.append(rec)
    if not out:
        raise InputError(f"{where}: no usable rows (every chosen/rejected pair has a null)")
    return out


def prompt_records(df: pl.DataFrame, where: str, method: str, chat: bool = True) -> list[dict[str, Any]]:
    """Records for GRPO: a prompt plus every other column (rewards read e.g. ``answer``)."""
    (pcol,) = layout(df, "prompt", where, method)
    out = []
    for r in df.to_dicts():
        rest = {k: v for k, v in r.items() if k not in ("prompt", "input") and isinstance(v, str | int | float)}
        out.append({"prompt": _user(r[pcol]) if chat else r[pcol], **rest})
    return out


def to_dataset(records: list[dict[str, Any]]):  # noqa: ANN201 - datasets.Dataset
    """An in-memory HF datasets.Dataset."""
    from datasets import Dataset

    return Dataset.from_list(records)
