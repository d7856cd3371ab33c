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
from tests.serve.helpers import one_torch_thread, wait_for  # noqa: F401 - one_torch_thread: autouse fixture

LONG = "What is the capital of France?"
SHORT = "Name a primary colour."


def test_short_request_joins_a_long_many_row_generation(tiny_llm: Path) -> None:
    """16 rows × 200 tokens on an 8-row batch; a 2-token request sent meanwhile takes a slot at once
    (a row of the long request is preempted and later recomputed) and returns within a few steps;
    every row still gets exactly the tokens it gets alone."""
    app = create_app({"tiny": str(tiny_llm)}, max_batch_size=8)
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        greedy = {"model": "tiny", "temperature": 0, "extra_body": {"ignore_eos": True}}
        long_alone = client.completions.create(prompt=LONG, max_tokens=200, **greedy).choices[0].text
        short_alone = client.completions.create(prompt=SHORT, max_tokens=2, **greedy).choices[0].text

        stamps: list[float] = []  # arrival of each chunk of choice 0
        texts: dict[int, list[str]] = {}
        done = threading.Event()

        def long_run() -> None:
            for chunk in client.completions.create(prompt=LONG, max_tokens=200, n=16, stream=True, **greedy):
                for c in chunk.choices:
                    texts.setdefault(c.index, []).append(c.text)
                    if c.index == 0 and c.text:
                        stamps.append(time.perf_counter())
            done.set()

        runner = threading.Thread(target=long_run)
        runner.start()
        wait_for(lambda: len(stamps) >= 30)
        t0 = time.perf_counter()
        short = client.completions.create(prompt=SHORT, max_tokens=2, **greedy)
        latency = time.perf_counter() - t0
        progress = len(stamps)
        runner.join(timeout=120)
        assert done.is_set()
    app.state.close()
    step = statistics.median(b - a for a, b in zip(stamps[:30], stamps[1:30], strict=False))
    assert short.choices[0].text == short_alone
    assert progress < 100, "the long request was mostly done before the short one returned"
    # prefill + 2 decoding steps + HTTP: a few steps, not the 2 × 200 steps the long request still needs
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
        wait_for(lambda: eng.running_rows() == 0, timeout=5)
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


def test_speculative_decoding_streams_and_yields_to_new_requests(tiny_llm: Path, tmp_path: Path) -> None:
    """A lone greedy request with a draft model streams its tokens; a request arriving meanwhile stops the
    speculation, both go on in the batch, and the long answer is still exactly the plain greedy one."""
    from nexus_core.compress.common import save_model
    from nexus_core.compress.prune import drop_layers
    from nexus_core.models.io import load_causal_lm

    model, tok = load_causal_lm(tiny_llm, int8=False)
    drop_layers(model, [1])  # a smaller draft with the same tokenizer
    save_model(model, tok, tmp_path / "draft")
    greedy = {"model": "tiny", "temperature": 0, "extra_body": {"ignore_eos": True}}
    plain = create_app({"tiny": str(tiny_llm)})
    with serve_in_thread(plain) as url:
        expected = openai.OpenAI(base_url=url, api_key="x").completions.create(prompt=LONG, max_tokens=300,
                                                                                **greedy).choices[0].text
    plain.state.close()
    app = create_app({"tiny": str(tiny_llm)}, draft_models={"tiny": str(tmp_path / "draft")})
    eng = app.state.engines["tiny"]
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=120)
        pieces: list[str] = []
        short: list[str] = []
        for chunk in client.completions.create(prompt=LONG, max_tokens=300, stream=True, **greedy):
            pieces.extend(c.text for c in chunk.choices)
            if len(pieces) == 5:  # speculating now (nothing else is running): another client arrives
                assert eng.running_rows() == 0
                short.append(client.completions.create(prompt=SHORT, max_tokens=2, **greedy).choices[0].text)
                wait_for(lambda: eng.running_rows() == 1)  # the long row was handed over to the batch, goes on
    app.state.close()
    assert len([p for p in pieces if p]) > 5 and "".join(pieces) == expected
    assert len(short) == 1 and short[0]


def test_sliding_window_model_is_served_within_its_window_exactly(tiny_llm: Path, tmp_path: Path) -> None:
    """transformers keeps only a sliding layer's last window - 1 keys, which a left-padded batch cache cannot
    follow: such a model's context is capped to its window, where its batched tokens equal ``generate``'s."""
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_llm)
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             sliding_window=24, eos_token_id=tok.eos_token_id,
                                             bos_token_id=tok.bos_token_id))
    model.save_pretrained(tmp_path / "mistral")
    tok.save_pretrained(tmp_path / "mistral")
    app = create_app({"m": str(tmp_path / "mistral")})
    assert app.state.engines["m"].context_length == 23
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]
    with serve_in_thread(app) as url:
        client = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)

        async def both() -> list:
            return await asyncio.gather(*[client.completions.create(model="m", prompt=p, max_tokens=100, temperature=0,
                                                                    extra_body={"ignore_eos": True}) for p in prompts])

        answers = asyncio.run(both())
    app.state.close()
    for p, a in zip(prompts, answers, strict=True):
        n = 23 - len(p)  # max_tokens is clamped to what the window leaves
        ref = model.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=tok.eos_token_id)
        assert a.usage.completion_tokens == n
        assert a.choices[0].text == tok.decode(ref[0, len(p):], skip_special_tokens=True)
