"""Capability recipes as datasets + chat formats.

A raw dataset's capability is detected from its keys and each row is rendered as chat ``messages``
that any chat template can carry:

- ``tools``      — ``tool_calls`` / ``tools`` keys: assistant tool calls as ``<tool_call>{json}</tool_call>``
- ``thinking``   — ``thinking`` / ``think``: ``<think>…</think>`` before the answer
- ``reasoning``  — ``reasoning`` / ``reasoning_content``: same rendering as thinking
- ``cot``        — ``rationale`` / ``chain_of_thought`` / ``cot``: the rationale, then ``Answer: …``
- ``safety``     — ``safety_category`` / ``harm_category``: refusal-style safe completions
- ``anti_refusal`` — ``over_refusal`` / ``refusal_original``: helpful answers to benign prompts once refused

:func:`organize` files a raw dataset under ``<data root>/raw/datasets/<capability>/``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nexus_core.settings import data_root

# Order matters: the first match wins (tool data often also carries reasoning, for example).
CAPABILITY_KEYS: list[tuple[str, tuple[str, ...]]] = [
    ("tools", ("tool_calls", "tools", "functions")),
    ("thinking", ("thinking", "think")),
    ("reasoning", ("reasoning", "reasoning_content")),
    ("cot", ("rationale", "chain_of_thought", "cot")),
    ("safety", ("safety_category", "harm_category")),
    ("anti_refusal", ("over_refusal", "refusal_original")),
]


def detect_capability(keys: Iterable[str]) -> str | None:
    """Capability named by a dataset's keys, or None for plain instruction data."""
    keys = set(keys)
    for capability, markers in CAPABILITY_KEYS:
        if keys & set(markers):
            return capability
    return None


def _first(row: dict[str, Any], *names: str) -> Any:
    return next((row[n] for n in names if row.get(n) is not None), None)


def to_messages(row: dict[str, Any], capability: str | None) -> list[dict[str, Any]]:
    """Render one raw row of a capability dataset as chat messages."""
    if row.get("messages"):
        msgs = json.loads(row["messages"]) if isinstance(row["messages"], str) else list(row["messages"])
    else:
        msgs = [{"role": "user", "content": _first(row, "input", "prompt", "question", "instruction") or ""}]
    if row.get("system"):
        msgs.insert(0, {"role": "system", "content": row["system"]})
    answer = _first(row, "output", "answer", "response", "completion")
    if capability == "tools":
        calls = row.get("tool_calls")
        calls = json.loads(calls) if isinstance(calls, str) else calls
        tools = row.get("tools") or row.get("functions")
        if tools:
            spec = tools if isinstance(tools, str) else json.dumps(tools)
            msgs.insert(0, {"role": "system", "content": f"You can call these tools:\n{spec}"})
        rendered = "".join(f"<tool_call>{json.dumps(c, sort_keys=True)}</tool_call>" for c in calls or [])
        msgs.append({"role": "assistant", "content": rendered + (answer or "")})
    elif capability in ("thinking", "reasoning"):
        thought = _first(row, "thinking", "think", "reasoning", "reasoning_content")
        msgs.append({"role": "assistant", "content": f"<think>{thought}</think>\n{answer or ''}"})
    elif capability == "cot":
        rationale = _first(row, "rationale", "chain_of_thought", "cot")
        msgs.append({"role": "assistant", "content": f"{rationale}\nAnswer: {answer or ''}"})
    elif answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def organize(path: str | Path, root: Path | None = None) -> Path:
    """Copy a raw JSONL/Parquet dataset to ``raw/datasets/<capability>/`` (``general`` if none); returns it."""
    from nexus_core.io import read_table

    src = Path(path)
    df = read_table(src)
    capability = detect_capability(df.columns) or "general"
    dest = (root or data_root()) / "raw" / "datasets" / capability / src.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dest)
    return dest
