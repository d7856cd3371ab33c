"""Rule and verifier rewards for GRPO, in trl's reward-function shape:
``f(prompts, completions, **dataset_columns) -> list[float]``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

RewardFn = Callable[..., list[float]]
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def completion_text(completion: Any) -> str:
    """Text of a completion, standard (str) or conversational (list of messages)."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if m.get("role") == "assistant")


def extract_answer(text: str) -> str:
    """The final answer: after the last ``Answer:``, else the last number, else the stripped text."""
    if "Answer:" in text:
        return text.rsplit("Answer:", 1)[1].strip().rstrip(".")
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else text.strip()


def exact_match(prompts: list[Any], completions: list[Any], answer: list[Any] | None = None,
                **_: Any) -> list[float]:
    """1.0 when the extracted answer equals the row's ``answer`` column (normalised), else 0.0."""
    if answer is None:
        raise ValueError("exact_match reward needs an 'answer' column in the dataset")
    return [float(extract_answer(completion_text(c)).lower() == str(a).strip().lower())
            for c, a in zip(completions, answer, strict=True)]


def format_reward(pattern: str) -> RewardFn:
    """1.0 when the completion matches ``pattern`` (regex, DOTALL), else 0.0."""
    rx = re.compile(pattern, re.DOTALL)

    def reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        return [float(bool(rx.search(completion_text(c)))) for c in completions]

    reward.__name__ = "format"
    return reward


def length_penalty(max_chars: int) -> RewardFn:
    """0 up to ``max_chars`` characters, falling linearly to -1 at twice that."""
    def reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        return [-min(1.0, max(0, len(completion_text(c)) - max_chars) / max_chars) for c in completions]

    reward.__name__ = "length"
    return reward
