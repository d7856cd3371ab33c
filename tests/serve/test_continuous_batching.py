"""Continuous batching as a client sees it: the official ``openai`` client against the app under uvicorn."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from pathlib import Path

import openai
import pytest

from nexus_core.serve import serve_in_thread
from nexus_core.serve.app import create_app

LONG = "What is the capital of France?"
SHORT = "Name a primary colour."


def _wait_for(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_short_request_joins_a_long_many_row_generation(tiny_llm: Path) -> None:
    """16 rows × 300 tokens on an 8-row batch; a 2-token request sent meanwhile takes a slot at once
    (a row of the long request is preempted and later recomputed) and returns within a few steps;
    every row still gets exactly the tokens it gets alone."""
    app = create_app({"tiny": str(tiny_llm)}, max_batch_size=8)
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        greedy = {"model": "tiny", "temperature": 0, "extra_body": {"ignore_eos": True}}
        long_alone = client.completions.create(prompt=LONG, max_tokens=300, **greedy).choices[0].text
        short_alone = client.completions.create(prompt=SHORT, max_tokens=2, **greedy).choices[0].text

        stamps: list[float] = []  # arrival of each chunk of choice 0
        texts: dict[int, list[str]] = {}
        done = threading.Event()

        def long_run() -> None:
            for chunk in client.completions.create(prompt=LONG, max_tokens=300, n=16, stream=True, **greedy):
                for c in chunk.choices:
                    texts.setdefault(c.index, []).append(c.text)
                    if c.index == 0 and c.text:
                        stamps.append(time.perf_counter())
            done.set()

        runner = threading.Thread(target=long_run)
        runner.start()
        _wait_for(lambda: len(stamps) >= 30)
        t0 = time.perf_counter()
        short = client.completions.create(prompt=SHORT, max_tokens=2, **greedy)
        latency = time.perf_counter() - t0
        progress = len(stamps)
        runner.join(timeout=120)
        assert done.is_set()
    app.state.close()
    step = statistics.median(b - a for a, b in zip(stamps[:30], stamps[1:30], strict=False))
    assert short.choices[0].text == short_alone
    assert progress < 150, "the long request was mostly done before the short one returned"
    # prefill + 2 decoding steps + HTTP: a few steps, not the 2 × 300 steps the long request still needs
    assert latency < max(15 * step, 0.3), f"short request took {latency:.3f}s, a step {step:.4f}s"
    assert len(texts) == 16
    assert all("".join(t) == long_alone for t in texts.values())


def test_streaming_client_that_leaves_frees_its_rows(tiny_llm: Path) -> None:
    app = create_app({"tiny": str(tiny_llm)}, max_batch_size=8)
    eng = app.state.engines["tiny"]
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": LONG}],
                                                max_tokens=400, n=8, stream=True, extra_body={"ignore_eos": True})
        for i, _ in enumerate(stream):
            if i == 20:
                break
        assert eng.running_rows() == 8
        stream.close()
        _wait_for(lambda: eng.running_rows() == 0, timeout=5)
    app.state.close()


def test_a_failing_sequence_fails_only_its_request(tiny_llm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A row whose sampling raises, and a prompt whose prefill raises in a joint prefill, each fail their own
    request (500); the requests batched with them finish."""
    app = create_app({"tiny": str(tiny_llm)}, batch_wait_s=0.05)
    eng = app.state.engines["tiny"]
    pick, prefill = eng._pick, eng._prefill

    def bad_pick(logits, row):
        if row.req.sampling.seed == 13:
            raise RuntimeError("broken sampler")
        return pick(logits, row)

    def bad_prefill(rows):
        if any(3 in r.prompt for r in rows):
            raise RuntimeError("broken prefill")
        return prefill(rows)

    monkeypatch.setattr(eng, "_pick", bad_pick)
    monkeypatch.setattr(eng, "_prefill", bad_prefill)
    with serve_in_thread(app) as url:
        client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)

        async def one(prompt: str | list[int], seed: int) -> int | str:
            try:
                r = await client.completions.create(model="tiny", prompt=prompt, max_tokens=8, seed=seed,
                                                    extra_body={"ignore_eos": True})
            except openai.InternalServerError as exc:
                return exc.status_code
            return r.choices[0].text

        async def burst() -> list[int | str]:
            return await asyncio.gather(one(SHORT, 1), one(SHORT, 13), one([5, 3, 9], 2), one(LONG, 4))

        results = asyncio.run(burst())
    app.state.close()
    assert results[1] == 500 and results[2] == 500
    assert isinstance(results[0], str) and isinstance(results[3], str)
