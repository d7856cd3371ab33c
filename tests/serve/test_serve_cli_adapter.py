"""`nexus serve` as a real process, and serving a peft adapter directory."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from nexus_core.models.tiny import TinyLLMConfig, build_tiny_llm
from nexus_core.serve import serve_in_thread
from nexus_core.serve.app import create_app

TEXTS = ["one two three four", "five six seven eight", "the quick brown fox"] * 20


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llm(tmp_path_factory.mktemp("tiny") / "model", TEXTS, TinyLLMConfig(vocab_size=300))


def test_serves_a_peft_adapter_dir(tmp_path: Path, tiny_model: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)  # no tokenizer here: the server falls back to the base's
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").exists()
    app = create_app({"lora": str(adapter)})
    with serve_in_thread(app) as url:
        r = httpx.post(f"{url}/completions", json={"model": "lora", "prompt": "one two", "max_tokens": 3}, timeout=60)
    app.state.close()
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a fresh interpreter imports torch + transformers
def test_nexus_serve_subcommand_with_api_key_env(tiny_model: Path) -> None:
    port = _free_port()
    env = {**os.environ, "MY_KEYS": "k1,k2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", f"tiny={tiny_model}", "--port", str(port),
                             "--api-key-env", "MY_KEYS", "--draft", f"tiny={tiny_model}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        body = {"model": "tiny", "messages": [{"role": "user", "content": "one"}], "max_tokens": 2}
        assert httpx.post(f"{base}/v1/chat/completions", json=body,
                          headers={"Authorization": "Bearer k2"}, timeout=60).status_code == 200
        assert httpx.post(f"{base}/v1/chat/completions", json=body,
                          headers={"Authorization": "Bearer k3"}).status_code == 401
        # an authenticated 64 MB body: 413, and the server process's memory stays flat
        rss = [_rss_mb(proc.pid)]
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                rss.append(_rss_mb(proc.pid))
                time.sleep(0.005)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        piece = b"x" * 2**16
        r = httpx.post(f"{base}/v1/completions", content=(piece for _ in range(1024)), timeout=60,
                       headers={"Authorization": "Bearer k1", "Content-Type": "application/json"})
        done.set()
        watcher.join()
        assert r.status_code == 413
        assert max(rss) - rss[0] < 200, f"server RSS grew {max(rss) - rss[0]:.0f} MB"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_speculative_decoding_with_a_draft_model_matches_greedy(tmp_path: Path, tiny_model: Path) -> None:
    from nexus_core.compress.common import save_model
    from nexus_core.compress.prune import drop_layers
    from nexus_core.models.io import load_causal_lm

    model, tok = load_causal_lm(tiny_model, int8=False)
    drop_layers(model, [1])  # a smaller draft with the same tokenizer
    save_model(model, tok, tmp_path / "draft")
    body = {"model": "tiny", "prompt": "one two three", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    plain = create_app({"tiny": str(tiny_model)})
    spec = create_app({"tiny": str(tiny_model)}, draft_models={"tiny": str(tmp_path / "draft")})
    assert spec.state.engines["tiny"].draft is not None
    answers = []
    for app in (plain, spec):
        with serve_in_thread(app) as url:
            answers.append(httpx.post(f"{url}/completions", json=body, timeout=60).json()["choices"][0]["text"])
        app.state.close()
    assert answers[0] == answers[1]  # greedy speculative decoding is exact
