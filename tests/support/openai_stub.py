"""A scripted OpenAI-compatible HTTP server for tests that must inject faults (429, 5xx, timeouts,
malformed bodies) that a healthy real server never produces. Real HTTP on loopback, real litellm
client on the other side; only the answers are scripted.

    def handler(body: dict, n: int) -> Reply: ...   # n = 0-based index of this request
    with StubServer(handler) as stub:
        litellm.completion(model="openai/stub", api_base=stub.url, api_key="x", messages=[...])
        stub.requests  # every JSON body received
        stub.prompts()  # Counter: how many times each user message was asked

A careless provider echoes the request's headers in its error bodies (``Authorization`` included):
``StubServer(handler, echo_headers=lambda body, n: n % 2 == 0)`` answers the requests it picks with
``echo_status`` (default 401) and such a body, the rest with ``handler``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """What the stub answers: status, a JSON-able body or raw text, extra headers, a delay."""

    status: int = 200
    body: dict[str, Any] | str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


def chat_completion(content: str, model: str = "stub", prompt_tokens: int = 10, completion_tokens: int = 20,
                    logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A well-formed ``/v1/chat/completions`` body."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": content}}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    return {"id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def echo_handler(body: dict[str, Any], n: int) -> Reply:
    """Default: answer with the last user message reversed-in-words, well formed."""
    last = body.get("messages", [{}])[-1].get("content", "")
    return Reply(body=chat_completion(f"Answer to: {last}", model=body.get("model", "stub")))


def _header_echo(status: int, headers: dict[str, str]) -> Reply:
    """An error body that repeats every request header, the way some proxies and providers do."""
    auth = headers.get("Authorization") or headers.get("authorization") or ""
    return Reply(status=status, body={"error": {
        "message": f"Request refused (Authorization: {auth}); headers received: {headers}",
        "type": "server_error" if status >= 500 else "authentication_error", "headers": headers, "received_key": auth.removeprefix("Bearer ")}})


class _QuietServer(ThreadingHTTPServer):
    """A client that went away (killed, timed out) resets its connection: not worth a traceback."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)


class StubServer:
    """Threaded HTTP server on 127.0.0.1 with a random port; ``url`` ends in ``/v1``."""

    def __init__(self, handler: Callable[[dict[str, Any], int], Reply] = echo_handler,
                 echo_headers: Callable[[dict[str, Any], int], bool] | None = None, echo_status: int = 401):
        self.handler = handler
        self.echo_headers = echo_headers
        self.echo_status = echo_status
        self.requests: list[dict[str, Any]] = []
        self.auth: list[str | None] = []  # each request's Authorization header, in order
        self._lock = threading.Lock()
        stub = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections, as with real servers
            disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms ACK stall

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                if self.path.rstrip("/").endswith("/models"):
                    self._send(Reply(body={"object": "list", "data": [{"id": "stub", "object": "model"}]}))
                else:
                    self._send(Reply(status=404, body={"error": {"message": "not found"}}))

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    self._send(Reply(status=400, body={"error": {"message": "malformed JSON"}}))
                    return
                with stub._lock:
                    n = len(stub.requests)
                    stub.requests.append(body)
                    stub.auth.append(self.headers.get("Authorization"))
                if stub.echo_headers is not None and stub.echo_headers(body, n):
                    self._send(_header_echo(stub.echo_status, dict(self.headers.items())))
                    return
                self._send(stub.handler(body, n))

            def _send(self, reply: Reply) -> None:
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                data = reply.body if isinstance(reply.body, str) else json.dumps(reply.body or {})
                payload = data.encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and went away: expected in timeout tests

        self._server = _QuietServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def prompts(self) -> Counter[str]:
        """How many requests carried each prompt (the last user message's content), so far."""
        with self._lock:
            bodies = list(self.requests)
        out: Counter[str] = Counter()
        for body in bodies:
            users = [m for m in body.get("messages") or [] if m.get("role") == "user"]
            out[users[-1].get("content", "") if users else ""] += 1
        return out

    @property
    def url(self) -> str:
        """Base URL for litellm's ``api_base`` (``http://127.0.0.1:PORT/v1``)."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> StubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()


def record_teacher(handler: Callable[[dict[str, Any], int], Reply], flow_module: str, flow_name: str,
                   config_class: str, config: str, out: str) -> int:
    """Run a tiny flow (``flows.<flow_module>.<flow_name>`` with ``config``) online against the stub
    ``handler`` and write its response cache as JSONL to ``out``: the recorded teacher that keeps the
    tiny preset offline and deterministic."""
    import importlib
    import json
    import os
    import sqlite3
    import tempfile
    from pathlib import Path

    tmp = Path(tempfile.mkdtemp(prefix="nexus-record-"))
    os.environ["NEXUS_HOME"], os.environ["NEXUS_DATA"] = str(tmp / "home"), str(tmp / "data")
    from nexus_core.settings import configure_environment

    configure_environment()
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180), StubServer(handler) as stub:
        from flows.common import load_flow_config

        module = importlib.import_module(flow_module)
        cfg = load_flow_config(getattr(module, config_class), config,
                               ["teacher.offline=false", f"teacher.api_base={stub.url}", "teacher.recorded_cache=[]"])
        result = getattr(module, flow_name)(cfg)
    conn = sqlite3.connect(tmp / "home" / "llm_cache.sqlite")
    rows = conn.execute("SELECT key, model, response FROM responses ORDER BY key").fetchall()
    with open(out, "w", encoding="utf-8") as fh:
        for key, model, response in rows:
            resp = json.loads(response)
            for volatile in ("id", "created", "system_fingerprint"):
                resp.pop(volatile, None)
            fh.write(json.dumps({"key": key, "model": model, "response": resp}, sort_keys=True) + "\n")
    print(f"recorded {len(rows)} responses to {out}; summary {result.summary}")
    return len(rows)
