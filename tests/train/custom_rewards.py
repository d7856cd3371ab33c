"""A reward function named by import path in the GRPO test (``tests.train.custom_rewards:brevity``)."""

from __future__ import annotations

from typing import Any

from nexus_core.train.rewards import completion_text


def brevity(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    """1 for an empty completion, falling to 0 at 32 characters."""
    return [max(0.0, 1.0 - len(completion_text(c)) / 32) for c in completions]
