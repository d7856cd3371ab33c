"""The litellm client over real HTTP on loopback: faults injected by the stub, a real tiny model served."""

from __future__ import annotations

import threading
import time

import pytest

from nexus_core.errors import ConfigError
from nexus_core.llm.client import LLMClient, LLMConfig, ResponseCache, check_model
from tests.support.openai_stub import Reply, StubServer, chat_completion

MSG = [{"role": "user", "content": "State a hypothesis."}]


def _client(url: str, tmp_path, **kw) -> LLMClient:
    cfg = LLMConfig(model="openai/stub", api_base=url, backoff_s=0.01, max_backoff_s=2, **kw)
    return LLMClient(cfg, ResponseCache(tmp_path / "cache.sqlite"))


def test_429_retry_after_is_honoured_then_5xx_retried(tmp_path):
    def handler(body, n):
        if n == 0:
            return Reply(status=429, body={"error": {"message": "slow down"}}, headers={"Retry-After": "0.4"})
        if n == 1:
            return Reply(status=503, body={"error": {"message": "overloaded"}})
        return Reply(body=chat_completion("ok answer"))

    with StubServer(handler) as stub:
        [c] = _client(stub.url, tmp_path, max_retries=3).map_sync([MSG])
    assert c.status == "ok" and c.content == "ok answer"
    assert c.attempts == 3 and len(stub.requests) == 3
    assert c.waits[0] == pytest.approx(0.4)  # the server's Retry-After, not our backoff
    assert c.waits[1] < 0.4


def test_timeout_and_malformed_bodies_become_failed_rows(tmp_path):
    def handler(body, n):
        text = body["messages"][-1]["content"]
        if text == "slow":
            return Reply(body=chat_completion("late"), delay_s=1.5)
        if text == "garbage":
            return Reply(body="{not json")
        return Reply(body={"choices": []})

    with StubServer(handler) as stub:
        out = _client(stub.url, tmp_path, max_retries=1, timeout_s=0.3).map_sync(
            [[{"role": "user", "content": t}] for t in ("slow", "garbage", "empty")])
    assert [c.status for c in out] == ["failed", "failed", "failed"]
    assert "Timeout" in out[0].error
    assert all(c.attempts == 2 for c in out)  # one retry each, then kept as data
    assert all(c.error for c in out)


def test_cache_resumes_offline_names_miss_and_cost_cap(tmp_path):
    with StubServer() as stub:
        client = _client(stub.url, tmp_path)
        first = client.map_sync([MSG])[0]
        client.cache.close()
        again = _client(stub.url, tmp_path).map_sync([MSG, [{"role": "user", "content": "new"}]])
    assert first.status == "ok" and not first.cached
    assert again[0].cached and again[0].content == first.content
    assert len(stub.requests) == 2  # the cached prompt was not asked again
    offline = LLMClient(LLMConfig(model="openai/stub", offline=True), ResponseCache(tmp_path / "cache.sqlite"))
    hit, miss = offline.map_sync([MSG, [{"role": "user", "content": "never asked"}]])
    assert hit.status == "ok" and miss.status == "failed" and miss.error.startswith("offline: no cached response")
    capped = LLMClient(LLMConfig(model="openai/stub", api_base="http://127.0.0.1:9/v1", max_cost_usd=0.0),
                       ResponseCache(tmp_path / "c2.sqlite"))
    [skip] = capped.map_sync([MSG])
    assert skip.status == "skipped" and "cost cap" in skip.error


def test_concurrency_is_bounded(tmp_path):
    live, peak, lock = [0], [0], threading.Lock()

    def handler(body, n):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.05)
        with lock:
            live[0] -= 1
        return Reply(body=chat_completion(f"answer {n}"))

    with StubServer(handler) as stub:
        out = _client(stub.url, tmp_path, max_concurrency=3).map_sync(
            [[{"role": "user", "content": f"q{i}"}] for i in range(12)])
    assert all(c.status == "ok" for c in out)
    assert 1 < peak[0] <= 3


def test_bad_provider_and_missing_key_are_named_not_printed(monkeypatch):
    with pytest.raises(ConfigError, match="teacher.model.*does not know"):
        check_model(LLMConfig(model="nosuchprovider/xyz"))
    monkeypatch.delenv("NEXUS_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match="NEXUS_TEST_KEY is not set"):
        check_model(LLMConfig(model="openrouter/openai/gpt-4o-mini", api_key_env="NEXUS_TEST_KEY"))
    monkeypatch.setenv("NEXUS_TEST_KEY", "sk-secret-value")
    check_model(LLMConfig(model="openrouter/openai/gpt-4o-mini", api_key_env="NEXUS_TEST_KEY"))


def test_real_server_hosting_tiny_model(tmp_path, data_root):
    """litellm → the project's own OpenAI-compatible server → a tiny Llama loaded with from_pretrained."""
    from nexus_core.models.tiny import TinyLLMConfig, build_tiny_llm
    from nexus_core.serve import serve_in_thread
    from nexus_core.serve.app import create_app

    model_dir = tmp_path / "tiny"
    build_tiny_llm(model_dir, ["Soil respiration rises after rewetting.", "We measure and compare samples."] * 20,
                   TinyLLMConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1))
    with serve_in_thread(create_app({"teacher": str(model_dir)})) as url:
        client = LLMClient(LLMConfig(model="openai/teacher", api_base=url, max_tokens=8, top_logprobs=2),
                           ResponseCache(tmp_path / "live.sqlite"))
        out = client.map_sync([MSG, [{"role": "user", "content": "Another prompt"}]])
    assert [c.status for c in out] == ["ok", "ok"], [c.error for c in out]
    assert out[0].completion_tokens > 0 and out[0].prompt_tokens > 0
    assert out[0].logprobs and "top_logprobs" in out[0].logprobs[0]


def test_map_sync_again_in_a_new_event_loop(tmp_path):
    # Regeneration calls map_sync once per round; each call runs its own loop, and a semaphore
    # contended in the first loop used to fail in the second ("bound to a different event loop").
    with StubServer() as stub:
        client = _client(stub.url, tmp_path, max_concurrency=2)
        rounds = [client.map_sync([[{"role": "user", "content": f"round {r} q{i}"}] for i in range(6)])
                  for r in range(2)]
    assert [c.status for out in rounds for c in out] == ["ok"] * 12


def test_cost_cap_without_any_price_is_a_config_error_and_config_prices_are_used(tmp_path):
    unpriced = LLMConfig(model="openai/no-such-priced-model", api_base="http://127.0.0.1:9/v1", max_cost_usd=1.0)
    with pytest.raises(ConfigError, match=r"max_cost_usd: litellm has no price for openai/no-such-priced-model"):
        check_model(unpriced)
    with pytest.raises(ConfigError, match="set both or neither"):
        check_model(unpriced.model_copy(update={"input_usd_per_mtok": 1.0}))
    priced = unpriced.model_copy(update={"input_usd_per_mtok": 2.0, "output_usd_per_mtok": 8.0})
    check_model(priced)  # a cap with prices from the config is fine
    with StubServer(lambda body, n: Reply(body=chat_completion("ok", prompt_tokens=1000, completion_tokens=500))) as stub:
        client = LLMClient(priced.model_copy(update={"api_base": stub.url}), ResponseCache(enabled=False))
        [c] = client.map_sync([MSG])
    assert c.cost_usd == pytest.approx((1000 * 2.0 + 500 * 8.0) / 1e6) and client.spent_usd == c.cost_usd
