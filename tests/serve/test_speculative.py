"""Speculative decoding that pays: a draft that always agrees verifies many tokens per target pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from nexus_core.serve import serve_in_thread
from nexus_core.serve.app import create_app
from tests.serve.helpers import one_torch_thread  # noqa: F401 - autouse fixture


def test_an_agreeing_draft_verifies_several_tokens_per_target_pass(tiny_llm: Path) -> None:
    """The draft is the target itself (every token accepted). transformers' default confidence cut-off
    (0.4, which a small model's flat distribution never reaches) drafted one token per pass: 32 tokens
    took 16 target passes. Drafting by length (5, then +2 per fully accepted draft) takes a handful."""
    app = create_app({"tiny": str(tiny_llm)}, draft_models={"tiny": str(tiny_llm)})
    eng = app.state.engines["tiny"]
    passes = {"n": 0}
    forward = eng.model.forward

    def counting(*args: Any, **kwargs: Any) -> Any:
        passes["n"] += 1
        return forward(*args, **kwargs)

    body = {"model": "tiny", "prompt": "one two three", "max_tokens": 32, "temperature": 0, "ignore_eos": True}
    with serve_in_thread(app) as url:
        eng.model.forward = counting
        spec = httpx.post(f"{url}/completions", json=body, timeout=60).json()
        eng.model.forward = forward
    app.state.close()
    plain_app = create_app({"tiny": str(tiny_llm)})
    with serve_in_thread(plain_app) as url:
        plain = httpx.post(f"{url}/completions", json=body, timeout=60).json()
    plain_app.state.close()
    assert spec["usage"]["completion_tokens"] == 32
    assert spec["choices"][0]["text"] == plain["choices"][0]["text"]  # exact
    assert passes["n"] <= 8, f"{passes['n']} target passes for 32 tokens"
