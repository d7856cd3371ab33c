"""The OpenAI-compatible server, end to end: a real tiny model, real uvicorn on loopback, real litellm."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from nexus_core.errors import InputError
from nexus_core.models.tiny import TinyLLMConfig, build_tiny_llm
from nexus_core.serve import serve_in_thread
from nexus_core.serve.app import create_app, hash_api_key

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "models learn from data", "hello world again"] * 20
KEY = "sk-test-123"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llm(tmp_path_factory.mktemp("tiny") / "model", TEXTS, TinyLLMConfig(vocab_size=300))


@pytest.fixture(scope="module")
def server(tiny_model: Path):
    app = create_app({"tiny": str(tiny_model)}, api_key_hashes=[hash_api_key(KEY)])
    with serve_in_thread(app) as url:
        yield url
    app.state.close()


def test_litellm_chat_non_stream_with_logprobs(server: str) -> None:
    import litellm

    resp = litellm.completion(model="openai/tiny", api_base=server, api_key=KEY, max_tokens=8, temperature=0,
                              messages=[{"role": "user", "content": "the cat"}], logprobs=True, top_logprobs=3)
    choice = resp.choices[0]
    assert choice.finish_reason in {"stop", "length"}
    assert isinstance(choice.message.content, str)
    content = choice.logprobs["content"] if isinstance(choice.logprobs, dict) else choice.logprobs.content
    assert 1 <= len(content) <= 8
    first = content[0] if isinstance(content[0], dict) else content[0].model_dump()
    assert first["logprob"] <= 0 and len(first["top_logprobs"]) == 3
    # greedy: the chosen token is the most likely one
    assert first["top_logprobs"][0]["logprob"] == pytest.approx(first["logprob"])
    assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens >= 1


def test_litellm_chat_stream_matches_non_stream(server: str) -> None:
    import litellm

    msgs = [{"role": "user", "content": "a dog ran"}]
    full = litellm.completion(model="openai/tiny", api_base=server, api_key=KEY, max_tokens=10, temperature=0,
                              messages=msgs)
    chunks = list(litellm.completion(model="openai/tiny", api_base=server, api_key=KEY, max_tokens=10,
                                     temperature=0, messages=msgs, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) >= 2
    assert streamed == full.choices[0].message.content


def test_litellm_text_completion_and_seeded_sampling(server: str) -> None:
    import litellm

    kw = dict(model="openai/tiny", api_base=server, api_key=KEY, max_tokens=6, temperature=1.0, seed=7)
    a = litellm.text_completion(prompt="hello", **kw)
    b = litellm.text_completion(prompt="hello", **kw)
    assert a.choices[0].text == b.choices[0].text


def test_bad_key_missing_key_and_open_health(server: str) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    bad = httpx.post(f"{server}/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
    assert httpx.post(f"{server}/chat/completions", json=body).status_code == 401
    root = server.removesuffix("/v1")
    assert httpx.get(f"{root}/health").json()["models"] == ["tiny"]


def test_litellm_rejects_bad_key(server: str) -> None:
    import litellm

    with pytest.raises(litellm.AuthenticationError):
        litellm.completion(model="openai/tiny", api_base=server, api_key="wrong", max_tokens=2,
                           messages=[{"role": "user", "content": "hi"}], num_retries=0)


def test_bad_requests_are_4xx_and_server_stays_up(server: str) -> None:
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{server}/chat/completions", content=b"{not json", headers=h)
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/chat/completions", headers=h,
                   json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/chat/completions", headers=h, json={"model": "tiny", "messages": []})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/completions", headers=h, json={"model": "tiny", "prompt": "x", "temperature": 9})
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/completions", headers=h, json={"model": "tiny", "prompt": "the cat " * 400})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    # still serving
    ok = httpx.post(f"{server}/completions", headers=h, json={"model": "tiny", "prompt": "the", "max_tokens": 3,
                                                                "logprobs": 2, "n": 2})
    assert ok.status_code == 200
    data = ok.json()
    assert [c["index"] for c in data["choices"]] == [0, 1]
    lp = data["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) >= 1
    models = httpx.get(f"{server}/models", headers=h).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]


def test_concurrent_requests_are_batched_exactly_and_metrics_exported(server: str) -> None:
    h = {"Authorization": f"Bearer {KEY}"}
    prompts = ["the cat", "a dog ran in the park and then the cat sat on the mat", "hello", "models learn"] * 2

    def body(p: str) -> dict:
        return {"model": "tiny", "prompt": p, "max_tokens": 5, "temperature": 0, "ignore_eos": True, "logprobs": 1}

    alone = [httpx.post(f"{server}/completions", json=body(p), headers=h, timeout=60).json()["choices"][0]
             for p in prompts[:4]]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*[client.post(f"{server}/completions", json=body(p), headers=h)
                                          for p in prompts])

    together = [r.json()["choices"][0] for r in asyncio.run(burst())]
    for single, batched in zip(alone * 2, together, strict=True):
        # left padding + per-row positions: a row's tokens do not depend on its batch mates
        assert batched["text"] == single["text"]
        assert batched["logprobs"]["token_logprobs"] == pytest.approx(single["logprobs"]["token_logprobs"], abs=1e-4)
        assert len(batched["logprobs"]["tokens"]) == 5  # ignore_eos: always max_tokens
    prom = httpx.get(server.removesuffix("/v1") + "/metrics").text
    value = {line.split()[0]: float(line.split()[1]) for line in prom.splitlines() if line and line[0] != "#"}
    # the mean batch is > 1 row only if some concurrent requests shared one generate call
    assert value['nexus_serve_batch_rows_sum{model="tiny"}'] > value['nexus_serve_batch_rows_count{model="tiny"}']
    assert value['nexus_serve_requests_total{endpoint="/v1/completions",model="tiny",status="200"}'] >= 12


def test_stream_raw_sse_with_usage(server: str) -> None:
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}, "logprobs": True}
    with httpx.stream("POST", f"{server}/chat/completions", json=body, headers=h) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[-1]["usage"]["completion_tokens"] >= 1
    finishes = [c["finish_reason"] for e in events for c in e["choices"] if c.get("finish_reason")]
    assert finishes and finishes[0] in {"stop", "length"}


def test_model_dir_without_weights_fails_fast(tmp_path: Path, tiny_model: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_model / "config.json").read_text())
    with pytest.raises(InputError, match="without weights"):
        create_app({"x": str(broken)})
    with pytest.raises(InputError, match="does not exist"):
        create_app({"x": str(tmp_path / "missing")})
