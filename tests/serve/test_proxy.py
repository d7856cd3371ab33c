"""The engine-agnostic front (`nexus serve --engine vllm` puts it before vLLM) in front of a real
OpenAI-compatible upstream: our own embedded `nexus serve`, as a child process started the way vLLM is
(start_upstream: own process group, /health awaited), reached with an internal key only the front holds.
Engine death and start-up failures use a few-line stdlib server, so they cost no model load."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from nexus_core.errors import NexusError
from nexus_core.serve import serve_in_thread
from nexus_core.serve.app import hash_api_key
from nexus_core.serve.proxy import Upstream, create_proxy_app, start_upstream
from nexus_core.serve.vllm import free_port
from tests.serve.helpers import wait_for

pytestmark = pytest.mark.integration  # one `nexus serve` child for the module (a fresh torch import)

CLIENT_KEY, INTERNAL_KEY = "client-key", "internal-key"
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}


@pytest.fixture(scope="module")
def upstream(tiny_llm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    port = free_port()
    log = tmp_path_factory.mktemp("upstream") / "serve.log"
    argv = [sys.executable, "-m", "flows.cli", "serve", f"tiny={tiny_llm}", "--port", str(port),
            "--api-key-env", "UPSTREAM_KEYS"]
    env = {**os.environ, "UPSTREAM_KEYS": INTERNAL_KEY, "OMP_NUM_THREADS": "1"}
    up = start_upstream("tiny", argv, f"http://127.0.0.1:{port}/v1", env=env, startup_timeout_s=180, log_path=log)
    yield up
    up.stop()
    assert up.proc is not None and up.proc.poll() is not None


@pytest.fixture(scope="module")
def front(upstream: Upstream) -> Iterator[str]:
    app = create_proxy_app([upstream], api_key_hashes=[hash_api_key(CLIENT_KEY)], upstream_api_key=INTERNAL_KEY,
                           max_body_bytes=64 * 1024, max_in_flight=1, max_queue=0)
    with serve_in_thread(app) as url:
        yield url


def _client(url: str, key: str = CLIENT_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "one two"}], "max_tokens": 8, "temperature": 0,
        "ignore_eos": True}


def test_auth_is_enforced_at_the_front(front: str, upstream: Upstream) -> None:
    assert httpx.post(f"{front}/chat/completions", json=CHAT).status_code == 401
    assert httpx.post(f"{front}/chat/completions", json=CHAT, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.get(f"{front}/models").status_code == 401
    # the client's key is not the engine's: only the front can call it
    assert httpx.post(f"{upstream.base_url}/chat/completions", json=CHAT, headers=AUTH).status_code == 401
    r = httpx.post(f"{front}/chat/completions", json=CHAT, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    models = httpx.get(f"{front}/models", headers=AUTH).json()["data"]
    assert [m["id"] for m in models] == ["tiny"] and "/" not in str(models)
    health = httpx.get(f"{front.removesuffix('/v1')}/health")
    assert health.status_code == 200 and health.json()["models"] == ["tiny"]


def test_streaming_is_relayed(front: str) -> None:
    client = _client(front)
    plain = client.chat.completions.create(model="tiny", messages=CHAT["messages"], max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(model="openai/tiny", messages=CHAT["messages"], max_tokens=8,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True},
                                                 stream_options={"include_usage": True}))
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) >= 2, "the stream arrived in one piece"
    assert "".join(texts) == plain.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    assert chunks[0].model == "tiny"  # a provider-prefixed name is forwarded as the served name


def test_engine_errors_keep_their_status(front: str) -> None:
    client = _client(front)
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):  # the engine's own 400
        client.completions.create(model="tiny", prompt=[5, 6, 10**6], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model="tiny", messages=CHAT["messages"],
                                       response_format={"type": "json_object"})
    with pytest.raises(openai.NotFoundError, match="unknown model"):  # the front's own 404
        client.completions.create(model="other", prompt="x", max_tokens=1)


def test_limits_apply_at_the_front(front: str, upstream: Upstream) -> None:
    big = httpx.post(f"{front}/completions", headers=AUTH, content=b'{"prompt": "' + b"x" * 70_000 + b'"}')
    assert big.status_code == 413
    bad = httpx.post(f"{front}/completions", headers=AUTH, content=b'{"model": "tiny", "prompt": [')
    assert bad.status_code == 400 and "malformed JSON" in bad.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="sequences; at most 256"):
        _client(front).completions.create(model="tiny", prompt=["a"] * 20, n=16, max_tokens=1)
    # max_in_flight=1, max_queue=0: a second request while one generates gets 429 with Retry-After
    long = {"model": "tiny", "prompt": "one", "max_tokens": 400, "n": 8, "temperature": 0, "ignore_eos": True}
    results: list[int] = []
    worker = threading.Thread(target=lambda: results.append(
        httpx.post(f"{front}/completions", json=long, headers=AUTH, timeout=120).status_code))
    worker.start()
    wait_for(lambda: upstream.in_flight == 1)
    second = httpx.post(f"{front}/completions", json={**long, "max_tokens": 1}, headers=AUTH)
    worker.join()
    assert second.status_code == 429 and second.headers["retry-after"] == "1"
    assert results == [200] and upstream.in_flight == 0


def _upstream_count(upstream: Upstream, status: str) -> float:
    text = httpx.get(f"{upstream.root}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("nexus_serve_requests_total") and f'status="{status}"' in line)


def test_timeouts_and_disconnects_reach_the_engine(upstream: Upstream) -> None:
    """A request the front gives up on (timeout, or its client left) is closed at the engine, which
    stops generating for it: the embedded engine counts a closed non-streaming request as 499 and never
    finishes (200) any of them, though each would take it about a second."""
    ok, gone = _upstream_count(upstream, "200"), _upstream_count(upstream, "499")
    long = {"model": "tiny", "prompt": "one", "max_tokens": 400, "n": 8, "temperature": 0, "ignore_eos": True}
    app = create_proxy_app([upstream], upstream_api_key=INTERNAL_KEY, request_timeout_s=0.3)
    with serve_in_thread(app) as url:
        r = httpx.post(f"{url}/completions", json=long, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        with httpx.stream("POST", f"{url}/completions", json={**long, "stream": True}, timeout=60) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert s.status_code == 200 and "request_timeout" in events[-1]
    app = create_proxy_app([upstream], upstream_api_key=INTERNAL_KEY)
    with serve_in_thread(app) as url:
        with pytest.raises(httpx.ReadTimeout):  # the client leaves a non-streaming request
            httpx.post(f"{url}/completions", json=long, timeout=0.3)
        wait_for(lambda: _upstream_count(upstream, "499") == gone + 2)
        time.sleep(2.0)  # longer than any of the three would have taken to finish
    assert _upstream_count(upstream, "200") == ok and upstream.in_flight == 0


FAKE_ENGINE = textwrap.dedent("""
    import http.server, json, subprocess, sys
    helper = subprocess.Popen(["sleep", "300"])  # an engine's worker process
    print("helper", helper.pid, flush=True)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self._send(200, {"status": "ok"})
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self._send(200, {"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": "hi"}]})
        def _send(self, status, obj):
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) is gone for our purposes
    return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()


@pytest.mark.parametrize("stop", ["engine dies", "server stops"])
def test_engine_process_death_and_stop(tmp_path: Path, stop: str) -> None:
    script = tmp_path / "engine.py"
    script.write_text(FAKE_ENGINE)
    port = free_port()
    up = start_upstream("m", [sys.executable, str(script), str(port)], f"http://127.0.0.1:{port}/v1",
                        startup_timeout_s=30, log_path=tmp_path / "engine.log")
    helper = int((tmp_path / "engine.log").read_text().split()[1])
    try:
        with serve_in_thread(create_proxy_app([up])) as url:
            assert httpx.post(f"{url}/completions", json={"model": "m", "prompt": "x"}).json()["choices"][0]["text"] == "hi"
            if stop == "engine dies":
                assert up.proc is not None
                os.kill(up.proc.pid, signal.SIGKILL)
                up.proc.wait(timeout=10)
                r = httpx.post(f"{url}/completions", json={"model": "m", "prompt": "x"})
                assert r.status_code == 503 and "exited with code -9" in r.json()["error"]["message"]
                health = httpx.get(f"{url.removesuffix('/v1')}/health")
                assert health.status_code == 503 and "exited" in health.json()["problems"]["m"]
    finally:
        up.stop(timeout_s=5)
    # the engine's own workers go with it (the process group is ended, not just its leader)
    wait_for(lambda: not _pid_alive(helper), timeout=10)


def test_unreachable_engine_is_502() -> None:
    up = Upstream("m", f"http://127.0.0.1:{free_port()}/v1")  # nothing listens there
    with serve_in_thread(create_proxy_app([up])) as url:
        r = httpx.post(f"{url}/completions", json={"model": "m", "prompt": "x"})
        assert r.status_code == 502 and r.json()["error"]["code"] == "engine_unreachable"
        assert httpx.get(f"{url.removesuffix('/v1')}/health").status_code == 503


def test_start_up_failures_are_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    crash = [sys.executable, "-c", "print('CUDA out of memory'); raise SystemExit(3)"]
    with pytest.raises(NexusError, match=r"exited with code 3 during start-up(.|\n)*CUDA out of memory"):
        start_upstream("m", crash, "http://127.0.0.1:9/v1", startup_timeout_s=30, log_path=tmp_path / "a.log")
    hang = [sys.executable, "-c", "import time; time.sleep(300)"]
    procs: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def recording_popen(*a, **k):  # noqa: ANN002, ANN003, ANN202
        procs.append(real_popen(*a, **k))
        return procs[-1]

    monkeypatch.setattr(subprocess, "Popen", recording_popen)
    with pytest.raises(NexusError, match=r"did not answer .*/health within 1s"):
        start_upstream("m", hang, f"http://127.0.0.1:{free_port()}/v1", startup_timeout_s=1)
    assert procs and procs[0].poll() is not None  # the engine that never came up was stopped
