"""Capability recipes as datasets + chat formats.

A raw dataset's capability is detected from its keys and each row is rendered as chat ``messages``
that any chat template can carry:

- ``tools``      — ``tool_calls`` / ``tools`` keys: the tools and the assistant's structured tool calls,
  rendered by the model's own chat template (``apply_chat_template(tools=…)``, :func:`to_chat`) when
  it has a tool format, else as text: a system message listing the tools and ``<tool_call>{json}</tool_call>``
  (:func:`tools_as_text`, also what :func:`to_messages` gives)
- ``thinking``   — ``thinking`` / ``think``: ``<think>…</think>`` before the answer
- ``reasoning``  — ``reasoning`` / ``reasoning_content``: same rendering as thinking
- ``cot``        — ``rationale`` / ``chain_of_thought`` / ``cot``: the rationale, then ``Answer: …``
- ``safety``     — ``safety_category`` / ``harm_category``: refusal-style safe completions
- ``anti_refusal`` — ``over_refusal`` / ``refusal_original``: helpful answers to benign prompts once refused

:func:`organize` files a raw dataset under ``<data root>/raw/datasets/<capability>/``
(:mod:`nexus_core.train.organize`, ``nexus data organize DIR`` for a whole folder).
"""

from __future__ import annotations

import json
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


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def tool_calls_of(row: dict[str, Any]) -> list[dict[str, Any]]:
    """A row's tool calls as ``{"name", "arguments": dict}`` (OpenAI ``{"function": {...}}`` entries and
    JSON-string arguments unwrapped: templates render ``arguments | tojson``)."""
    calls = []
    for call in _json(row.get("tool_calls")) or []:
        fn = call.get("function", call)
        calls.append({"name": fn.get("name"), "arguments": _json(fn.get("arguments")) or {}})
    return calls


def _structured(message: dict[str, Any]) -> dict[str, Any]:
    """A message with its tool calls (if any) in the shape chat templates expect."""
    if not message.get("tool_calls"):
        return {k: v for k, v in message.items() if k != "tool_calls"}
    return message | {"tool_calls": [{"type": "function", "function": c} for c in tool_calls_of(message)]}


def tools_of(row: dict[str, Any]) -> list[Any] | None:
    """The tool definitions a row offers (``tools`` or ``functions``), or None."""
    tools = _json(row.get("tools") or row.get("functions"))
    return list(tools) if tools else None


def to_chat(row: dict[str, Any], capability: str | None) -> tuple[list[dict[str, Any]], list[Any] | None]:
    """One raw row as chat messages plus the tools to pass to ``apply_chat_template(tools=…)``: tool
    rows keep their calls structured (``tool_calls`` on the assistant message, for the model's own tool
    template); every other capability as :func:`to_messages`, without tools."""
    if capability != "tools":
        return to_messages(row, capability), None
    msgs = [_structured(m) for m in _prompt_messages(row)]
    calls, answer = tool_calls_of(row), _first(row, "output", "answer", "response", "completion")
    if calls or answer is not None:  # rows with `messages` may already end with the assistant's turn
        msgs.append(_structured({"role": "assistant", "content": answer or "", "tool_calls": row.get("tool_calls")}))
    return msgs, tools_of(row)


def tools_as_text(messages: list[dict[str, Any]], tools: list[Any] | None) -> list[dict[str, Any]]:
    """Messages for a chat template without a tool format: the tools as a system message, each
    assistant tool call as ``<tool_call>{json}</tool_call>`` before its text."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [c.get("function", c) for c in m["tool_calls"]]
            rendered = "".join(f"<tool_call>{json.dumps(c, sort_keys=True)}</tool_call>" for c in calls)
            m = {k: v for k, v in m.items() if k != "tool_calls"} | {"content": rendered + (m.get("content") or "")}
        out.append(m)
    if tools:
        out.insert(0, {"role": "system", "content": f"You can call these tools:\n{json.dumps(tools)}"})
    return out


def _prompt_messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    if row.get("messages"):
        msgs = json.loads(row["messages"]) if isinstance(row["messages"], str) else list(row["messages"])
    else:
        msgs = [{"role": "user", "content": _first(row, "input", "prompt", "question", "instruction") or ""}]
    if row.get("system"):
        msgs.insert(0, {"role": "system", "content": row["system"]})
    return msgs


def to_messages(row: dict[str, Any], capability: str | None) -> list[dict[str, Any]]:
    """Render one raw row of a capability dataset as chat messages (text only: tool calls as
    :func:`tools_as_text`)."""
    if capability == "tools":
        return tools_as_text(*to_chat(row, capability))
    msgs = _prompt_messages(row)
    answer = _first(row, "output", "answer", "response", "completion")
    if capability in ("thinking", "reasoning"):
        thought = _first(row, "thinking", "think", "reasoning", "reasoning_content")
        msgs.append({"role": "assistant", "content": f"<think>{thought}</think>\n{answer or ''}"})
    elif capability == "cot":
        rationale = _first(row, "rationale", "chain_of_thought", "cot")
        msgs.append({"role": "assistant", "content": f"{rationale}\nAnswer: {answer or ''}"})
    elif answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def organize(path: str | Path, root: Path | None = None) -> Path:
    """Copy a raw dataset file to ``<root>/raw/datasets/<capability>/`` and return it; never overwrites,
    and an unknown or unreadable file raises InputError (:func:`nexus_core.train.organize.organize_file`)."""
    from nexus_core.train.organize import organize_file

    return organize_file(path, (root or data_root()) / "raw" / "datasets")
