"""The server under bad clients, as a user meets it: the official ``openai`` client (and raw sockets where a
client misbehaves on purpose) against the app under uvicorn with the same configuration as ``nexus serve``."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from nexus_core.serve import serve_in_thread
from nexus_core.serve.app import create_app
from tests.serve.helpers import one_torch_thread, wait_for  # noqa: F401 - one_torch_thread: autouse fixture


@pytest.fixture(scope="module")
def server(tiny_llm: Path) -> Iterator[str]:
    app = create_app({"tiny": str(tiny_llm)}, body_timeout_s=1.0)
    with serve_in_thread(app, header_timeout_s=1.0) as url:
        yield url
    app.state.close()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)


def test_six_good_requests_and_one_bad_one_concurrently(server: str) -> None:
    """An out-of-vocabulary token id is the bad request's 400; its six batch mates all succeed."""
    client = openai.AsyncOpenAI(base_url=server, api_key="unused", max_retries=0, timeout=60)

    async def good(i: int) -> str:
        if i % 2:
            r = await client.chat.completions.create(model="tiny", max_tokens=6, temperature=0,
                                                     messages=[{"role": "user", "content": f"What is {i}?"}])
            return r.choices[0].finish_reason
        r = await client.completions.create(model="tiny", prompt=f"Name {i}", max_tokens=6, temperature=0)
        return r.choices[0].finish_reason

    async def bad() -> int:
        try:
            await client.completions.create(model="tiny", prompt=[5, 6, 10**6], max_tokens=6)
        except openai.BadRequestError as exc:
            assert "outside the vocabulary" in str(exc)
            return exc.status_code
        return 200

    async def run() -> list:
        return await asyncio.gather(*[good(i) for i in range(3)], bad(), *[good(i) for i in range(3, 6)])

    results = asyncio.run(run())
    assert results[3] == 400
    assert all(r in {"stop", "length"} for k, r in enumerate(results) if k != 3)


def test_bad_parameters_are_4xx_before_batching(server: str) -> None:
    client = _client(server)
    # nesting deeper than the JSON parser allows: 400, not 500
    deep = b'{"model": "tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = httpx.post(f"{server}/completions", content=deep, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_object"})
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    with pytest.raises(openai.BadRequestError, match="sequences; at most 256"):  # prompt × n is capped
        client.completions.create(model="tiny", prompt=["a"] * 20, n=16, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="seed"):
        client.completions.create(model="tiny", prompt="a", seed=2**70, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="context_length_exceeded|context"):
        client.completions.create(model="tiny", prompt="What is two plus two? " * 20_000, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="content"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": {"a": {"b": 1}}}])  # type: ignore[arg-type]
    # plain text response_format is what the server does anyway: accepted
    ok = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                        response_format={"type": "text"})
    assert ok.choices[0].message.content is not None
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"] and "/" not in json.dumps([m.model_dump() for m in models])


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_64mb_body_is_413_without_memory_growth(server: str) -> None:
    size, piece = 64 * 2**20, b"x" * 2**16
    peak, stop = [_rss_mb()], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak.append(_rss_mb())
            time.sleep(0.005)

    def body() -> Iterator[bytes]:
        for _ in range(size // len(piece)):
            yield piece

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    try:
        # declared length: refused from the header; chunked (no length): refused after the first 8 MB
        declared = httpx.post(f"{server}/completions", content=body(), timeout=60,
                              headers={"Content-Length": str(size), "Content-Type": "application/json"})
        chunked = httpx.post(f"{server}/completions", content=body(), timeout=60,
                             headers={"Content-Type": "application/json"})
    finally:
        stop.set()
        watcher.join()
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "body_too_large"
    assert chunked.status_code == 413
    assert time.perf_counter() - t0 < 20
    assert max(peak) - peak[0] < 200, f"RSS grew {max(peak) - peak[0]:.0f} MB"
    # the official client with a 10 MB prompt gets the 413 as an APIStatusError
    with pytest.raises(openai.APIStatusError) as err:
        _client(server).completions.create(model="tiny", prompt="a" * 10 * 2**20, max_tokens=1)
    assert err.value.status_code == 413


def _recv_all(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_idle_and_slow_connections_are_closed(server: str) -> None:
    host, port = server.removeprefix("http://").removesuffix("/v1").split(":")
    t0 = time.perf_counter()
    with socket.create_connection((host, int(port))) as idle, socket.create_connection((host, int(port))) as slow:
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # the head never ends
        assert _recv_all(idle, timeout=10) == b""  # closed by the server, nothing sent
        assert _recv_all(slow, timeout=10) == b""
    assert time.perf_counter() - t0 < 8
    with socket.create_connection((host, int(port))) as trickle:  # a body that never arrives: 408
        trickle.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 1000\r\n\r\n{\"model\": ")
        reply = _recv_all(trickle, timeout=10)
    assert reply.startswith(b"HTTP/1.1 408")
    assert httpx.get(server.removesuffix("/v1") + "/health").status_code == 200


def test_queue_limit_429_with_retry_after_and_disconnect_cancels(tiny_llm: Path) -> None:
    """One row at a time: a 16-row request holds the batch, the next waits, the third gets 429. Clients
    that give up (non-streaming) cancel their generation: the batch and the queue empty."""
    app = create_app({"tiny": str(tiny_llm)}, max_batch_size=1, max_queue=1)
    # 16 rows × 500 tokens one at a time: far more than the clients' 3 s patience on any machine
    long = {"model": "tiny", "prompt": "What is", "max_tokens": 500, "n": 16, "temperature": 0, "ignore_eos": True}
    eng = app.state.engines["tiny"]
    with serve_in_thread(app) as url:
        gave_up: list[str] = []

        def call() -> None:
            try:
                httpx.post(f"{url}/completions", json=long, timeout=3)
            except httpx.TimeoutException:
                gave_up.append("yes")

        running = threading.Thread(target=call)
        running.start()
        wait_for(lambda: eng.running_rows() == 1)
        queued = threading.Thread(target=call)
        queued.start()
        wait_for(lambda: eng.queue_depth() == 1)
        with pytest.raises(openai.RateLimitError) as err:
            _client(url).completions.create(model="tiny", prompt="What", max_tokens=2)
        assert err.value.response.headers["retry-after"] == "1"
        running.join()
        queued.join()
        assert gave_up == ["yes", "yes"]
        wait_for(lambda: eng.running_rows() == 0 and eng.queue_depth() == 0, timeout=5)
        ok = _client(url).completions.create(model="tiny", prompt="What", max_tokens=2)
        assert ok.usage is not None and ok.usage.completion_tokens >= 1
        prom = httpx.get(url.removesuffix("/v1") + "/metrics").text
        assert 'status="499"' in prom and 'status="429"' in prom
    app.state.close()


def test_request_timeout_is_504_and_frees_the_batch(tiny_llm: Path) -> None:
    app = create_app({"tiny": str(tiny_llm)}, max_batch_size=1, request_timeout_s=0.5)
    eng = app.state.engines["tiny"]
    with serve_in_thread(app) as url:
        client = _client(url)
        t0 = time.perf_counter()
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model="tiny", prompt="What is", max_tokens=500, n=16,
                                      extra_body={"ignore_eos": True})
        assert err.value.status_code == 504 and time.perf_counter() - t0 < 5
        stream = client.completions.create(model="tiny", prompt="What is", max_tokens=500, n=16, stream=True,
                                           extra_body={"ignore_eos": True})
        with pytest.raises(openai.APIError, match="longer than 0.5s"):
            for _ in stream:
                pass
        wait_for(lambda: eng.running_rows() == 0, timeout=5)
    app.state.close()


def test_draft_with_another_tokenizer_is_refused_at_start(tiny_llm: Path, tmp_path: Path) -> None:
    from nexus_core.errors import InputError
    from nexus_core.models.tiny import TinyLLMConfig, build_tiny_llm

    other = build_tiny_llm(tmp_path / "other", ["zebra quagga okapi", "entirely different words here"] * 10,
                           TinyLLMConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                         num_key_value_heads=2))
    with pytest.raises(InputError, match="tokenizer differs"):
        create_app({"tiny": str(tiny_llm)}, draft_models={"tiny": str(other)})


def test_health_answers_while_a_large_request_is_tokenised(server: str) -> None:
    """256 prompts of ~6,000 characters (1.5 MB): tokenising takes a while, in a worker thread."""
    from tests.conftest import TINY_TEXTS

    text = (" ".join(TINY_TEXTS) * 20)[:6000]
    result: dict[str, object] = {}

    def big() -> None:
        t0 = time.perf_counter()
        result["status"] = httpx.post(f"{server}/completions", json={"model": "tiny", "prompt": [text] * 256},
                                      timeout=120).status_code
        result["seconds"] = time.perf_counter() - t0

    worker = threading.Thread(target=big)
    worker.start()
    health = []
    with httpx.Client(timeout=30) as http:
        while worker.is_alive():
            t0 = time.perf_counter()
            assert http.get(server.removesuffix("/v1") + "/health").status_code == 200
            health.append(time.perf_counter() - t0)
            time.sleep(0.02)
    worker.join()
    assert result["status"] == 400  # each prompt is longer than the context once tokenised
    assert len(health) >= 3
    assert max(health) < max(0.25, float(result["seconds"]) / 3), (max(health), result["seconds"])  # type: ignore[arg-type]
