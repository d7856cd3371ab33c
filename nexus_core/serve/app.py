"""OpenAI-compatible HTTP API over local models: what litellm, the teacher stage and the judge call.

    app = create_app({"tiny": "data/processed/models/tiny_base_v1"}, api_key_hashes=[hash_api_key(k)])
    with serve_in_thread(app) as base_url:   # http://127.0.0.1:PORT/v1
        litellm.completion(model="openai/tiny", api_base=base_url, api_key=k, messages=[...])

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``stream`` as SSE,
``logprobs``/``top_logprobs``, ``n``, ``stop``, ``seed``), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus). Errors are OpenAI-shaped JSON bodies with a 4xx status; the server
stays up. API keys are only ever held as sha256 hex digests.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nexus_core.serve.engine import Engine, GenRequest, Sampling


def hash_api_key(key: str) -> str:
    """The sha256 hex digest under which an API key is stored (the key itself never is)."""
    return hashlib.sha256(key.encode()).hexdigest()


class APIError(Exception):
    """An error answered as an OpenAI-style JSON body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Common(BaseModel):
    # Unknown OpenAI fields (user, presence_penalty, ...) are accepted and ignored, like vLLM does.
    model_config = ConfigDict(extra="allow")

    model: str = Field(description="Served model name")
    max_tokens: int | None = Field(default=None, ge=1, description="Most new tokens per choice")
    temperature: float = Field(default=1.0, ge=0, le=2, description="Sampling temperature; 0 is greedy")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass")
    n: int = Field(default=1, ge=1, le=16, description="Choices per prompt")
    stop: str | list[str] | None = Field(default=None, description="Stop strings (not included in the output)")
    seed: int | None = Field(default=None, description="Seed for reproducible sampling")
    stream: bool = Field(default=False, description="Answer as server-sent events")
    stream_options: dict[str, Any] | None = Field(default=None, description="include_usage: send a final usage chunk")
    ignore_eos: bool = Field(default=False, description="vLLM extension: keep generating past EOS up to max_tokens")


class ChatRequest(_Common):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[dict[str, Any]] = Field(min_length=1, description="Chat messages (role, content)")
    logprobs: bool = Field(default=False, description="Return log-probabilities of the chosen tokens")
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="Alternatives per token (needs logprobs)")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Newer name of max_tokens")


class CompletionRequest(_Common):
    """Body of ``POST /v1/completions``."""

    prompt: str | list[str] | list[int] = Field(description="Prompt text, texts, or token ids")
    logprobs: int | None = Field(default=None, ge=0, le=20, description="Alternatives per token (legacy API)")
    echo: bool = Field(default=False, description="Not supported; must be false")


class Metrics:
    """Prometheus metrics in a registry of this app's own (several apps may live in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("nexus_serve_requests", "HTTP requests", ["endpoint", "model", "status"],
                                registry=self.registry)
        self.prompt_tokens = Counter("nexus_serve_prompt_tokens", "Prompt tokens", ["model"], registry=self.registry)
        self.completion_tokens = Counter("nexus_serve_completion_tokens", "Generated tokens", ["model"],
                                         registry=self.registry)
        self.latency = Histogram("nexus_serve_request_seconds", "Request latency", ["endpoint", "model"],
                                 registry=self.registry)
        self.ttft = Histogram("nexus_serve_time_to_first_token_seconds", "Time to first token", ["model"],
                              registry=self.registry)
        self.batch_rows = Histogram("nexus_serve_batch_rows", "Rows per generate batch", ["model"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.queue = Gauge("nexus_serve_queue_depth", "Requests waiting for a batch", ["model"],
                           registry=self.registry)


def create_app(models: dict[str, str], *, api_key_hashes: list[str] | None = None, max_batch_size: int = 16,
               batch_wait_s: float = 0.005, default_max_tokens: int = 256, dtype: str = "float32",
               draft_models: dict[str, str] | None = None, device: str | None = None) -> FastAPI:
    """An OpenAI-compatible FastAPI app serving ``models`` (served name → local HF model or adapter dir).

    Models load now, so a bad directory fails here with an ``InputError`` naming it. With
    ``api_key_hashes`` (sha256 hex digests, see :func:`hash_api_key`) every ``/v1`` call needs
    ``Authorization: Bearer <key>`` whose digest is listed; ``/health`` and ``/metrics`` stay open.
    ``draft_models`` (served name → smaller model dir with the same tokenizer) turns on speculative
    decoding for that model's single greedy requests. ``device`` defaults to CUDA when available
    (int8 CPU variants stay on the CPU).
    """
    metrics = Metrics()
    engines: dict[str, Engine] = {}
    for name, path in models.items():
        engines[name] = Engine(name, path, max_batch_size=max_batch_size, batch_wait_s=batch_wait_s, dtype=dtype,
                               on_batch=lambda rows, toks, n=name: metrics.batch_rows.labels(n).observe(rows),
                               draft_path=(draft_models or {}).get(name), device=device)
    hashes = [h.lower() for h in (api_key_hashes or [])]
    app = FastAPI(title="Nexus OpenAI-compatible server", docs_url=None, redoc_url=None)
    app.state.engines = engines
    app.state.metrics = metrics

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status != 500:  # 500s are counted where they happen, with their model
            metrics.requests.labels(request.url.path, "", str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Response:
        if hashes and request.url.path.startswith("/v1"):
            auth = request.headers.get("authorization", "")
            key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            digest = hash_api_key(key) if key else ""
            if not any(hmac.compare_digest(digest, h) for h in hashes):
                metrics.requests.labels(request.url.path, "", "401").inc()
                return JSONResponse(APIError(401, "invalid or missing API key", "authentication_error",
                                             "invalid_api_key").body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": sorted(engines)}

    @app.get("/metrics")
    async def prom() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        for name, eng in engines.items():
            metrics.queue.labels(name).set(eng.queue_depth())
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": n, "object": "model", "created": e.created, "owned_by": "nexus",
                                            "root": e.path, "max_model_len": e.context_length}
                                           for n, e in engines.items()]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await _parse(request, ChatRequest)
        eng = _engine(engines, body.model)
        try:
            prompts = [eng.chat_prompt(_normalise_messages(body.messages))]
        except APIError:
            raise
        except Exception as exc:  # a template that rejects these messages is the caller's problem
            raise APIError(400, f"messages could not be rendered with the chat template: {exc}",
                           param="messages") from exc
        top = body.top_logprobs or 0
        if top and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        sampling = _sampling(body, eng, prompts, body.max_completion_tokens or body.max_tokens or default_max_tokens,
                             body.logprobs, top)
        return await _respond(request, "chat", body, eng, prompts, sampling, metrics)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _parse(request, CompletionRequest)
        eng = _engine(engines, body.model)
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        p = body.prompt
        if isinstance(p, str):
            prompts = [eng.text_prompt(p)]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        else:
            prompts = [eng.text_prompt(x) for x in p]
        if not prompts or any(not x for x in prompts):
            raise APIError(400, "prompt is empty", param="prompt")
        lp = body.logprobs
        sampling = _sampling(body, eng, prompts, body.max_tokens or 16, lp is not None, lp or 0)
        return await _respond(request, "text", body, eng, prompts, sampling, metrics)

    def close() -> None:
        for eng in engines.values():
            eng.close()

    # Worker threads are daemons; close() stops them early (an app can be served again until then).
    app.state.close = close
    return app


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        data = json.loads(raw or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"malformed JSON body: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
        raise APIError(400, f"invalid request: {problems}") from exc


def _engine(engines: dict[str, Engine], name: str) -> Engine:
    # litellm users sometimes keep the provider prefix ("openai/tiny"): accept it.
    eng = engines.get(name) or engines.get(name.split("/", 1)[-1])
    if eng is None:
        raise APIError(404, f"unknown model {name!r} (served: {', '.join(sorted(engines))})", code="model_not_found",
                       param="model")
    return eng


def _normalise_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise APIError(400, f"messages[{i}]: needs a role", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        out.append({"role": m["role"], "content": content or ""})
    return out


def _sampling(body: _Common, eng: Engine, prompts: list[list[int]], max_tokens: int, logprobs: bool,
              top: int) -> Sampling:
    longest = max(len(p) for p in prompts)
    room = eng.context_length - longest
    if room < 1:
        raise APIError(400, f"prompt is {longest} tokens; the model's context is {eng.context_length}",
                       code="context_length_exceeded", param="messages")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return Sampling(max_tokens=min(max_tokens, room), temperature=body.temperature, top_p=body.top_p,
                    stop=[s for s in stop if s], seed=body.seed, logprobs=logprobs, top_logprobs=top,
                    ignore_eos=body.ignore_eos)


async def _respond(request: Request, kind: str, body: _Common, eng: Engine, prompts: list[list[int]],
                   sampling: Sampling, metrics: Metrics) -> Response:
    endpoint = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    req = GenRequest(prompts=prompts, sampling=sampling, n=body.n, loop=asyncio.get_running_loop(),
                     events=asyncio.Queue())
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    start = time.perf_counter()
    eng.submit(req)
    total = len(prompts) * body.n
    include_usage = bool((body.stream_options or {}).get("include_usage"))

    def done_metrics(prompt_toks: int, completion_toks: int, status: str = "200") -> None:
        metrics.requests.labels(endpoint, eng.name, status).inc()
        metrics.prompt_tokens.labels(eng.name).inc(prompt_toks)
        metrics.completion_tokens.labels(eng.name).inc(completion_toks)
        metrics.latency.labels(endpoint, eng.name).observe(time.perf_counter() - start)

    if body.stream:
        async def sse() -> AsyncIterator[str]:
            remaining, usage, first = total, {}, True
            try:
                if kind == "chat":
                    for i in range(total):
                        yield _sse(_chat_chunk(rid, created, eng.name, i, {"role": "assistant", "content": ""}))
                while remaining:
                    ev = await req.events.get()  # pyright: ignore[reportOptionalMemberAccess] - the engine sets events on submit
                    if ev[0] == "error":
                        yield _sse(APIError(500, ev[1], "server_error").body())
                        break
                    if ev[0] == "token":
                        if first:
                            metrics.ttft.labels(eng.name).observe(time.perf_counter() - start)
                            first = False
                        _, idx, text, lps = ev
                        if kind == "chat":
                            lp = {"content": [_chat_lp(e) for e in lps]} if sampling.logprobs else None
                            yield _sse(_chat_chunk(rid, created, eng.name, idx, {"content": text}, logprobs=lp))
                        else:
                            lp = _text_lp(lps) if sampling.logprobs else None
                            yield _sse(_text_chunk(rid, created, eng.name, idx, text, logprobs=lp))
                    else:
                        _, idx, reason, p_toks, c_toks = ev
                        remaining -= 1
                        usage[idx] = (p_toks, c_toks)
                        if kind == "chat":
                            yield _sse(_chat_chunk(rid, created, eng.name, idx, {}, finish=reason))
                        else:
                            yield _sse(_text_chunk(rid, created, eng.name, idx, "", finish=reason))
                u = _usage(usage, body.n)
                done_metrics(u["prompt_tokens"], u["completion_tokens"])
                if include_usage:
                    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
                    yield _sse({"id": rid, "object": obj, "created": created, "model": eng.name, "choices": [],
                                "usage": u})
                yield "data: [DONE]\n\n"
            finally:
                req.cancelled = True  # client went away or we are done: free the batch rows

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    texts: dict[int, list[str]] = {i: [] for i in range(total)}
    lps: dict[int, list[dict[str, Any]]] = {i: [] for i in range(total)}
    finish: dict[int, str] = {}
    usage: dict[int, tuple[int, int]] = {}
    try:
        while len(finish) < total:
            ev = await req.events.get()  # pyright: ignore[reportOptionalMemberAccess] - the engine sets events on submit
            if ev[0] == "error":
                metrics.requests.labels(endpoint, eng.name, "500").inc()
                raise APIError(500, ev[1], "server_error")
            if ev[0] == "token":
                texts[ev[1]].append(ev[2])
                lps[ev[1]].extend(ev[3])
            else:
                finish[ev[1]] = ev[2]
                usage[ev[1]] = (ev[3], ev[4])
    finally:
        req.cancelled = True
    u = _usage(usage, body.n)
    done_metrics(u["prompt_tokens"], u["completion_tokens"])
    if kind == "chat":
        choices = [{"index": i, "finish_reason": finish[i], "message": {"role": "assistant", "content": "".join(texts[i])},
                    "logprobs": {"content": [_chat_lp(e) for e in lps[i]]} if sampling.logprobs else None}
                   for i in range(total)]
        obj = "chat.completion"
    else:
        choices = [{"index": i, "finish_reason": finish[i], "text": "".join(texts[i]),
                    "logprobs": _text_lp(lps[i]) if sampling.logprobs else None} for i in range(total)]
        obj = "text_completion"
    return JSONResponse({"id": rid, "object": obj, "created": created, "model": eng.name, "choices": choices,
                         "usage": u, "system_fingerprint": "nexus"})


def _usage(usage: dict[int, tuple[int, int]], n: int) -> dict[str, int]:
    # A prompt is counted once however many choices it has.
    prompt = sum(p for i, (p, _) in usage.items() if i % n == 0)
    completion = sum(c for _, c in usage.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _chat_chunk(rid: str, created: int, model: str, idx: int, delta: dict[str, Any], finish: str | None = None,
                logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": idx, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}


def _text_chunk(rid: str, created: int, model: str, idx: int, text: str, finish: str | None = None,
                logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": idx, "text": text, "finish_reason": finish, "logprobs": logprobs}]}


def _chat_lp(e: dict[str, Any]) -> dict[str, Any]:
    def one(x: dict[str, Any]) -> dict[str, Any]:
        return {"token": x["token"], "logprob": x["logprob"], "bytes": list(x["token"].encode())}

    return {**one(e), "top_logprobs": [one(t) for t in e["top_logprobs"]]}


def _text_lp(entries: list[dict[str, Any]]) -> dict[str, Any]:
    offsets, pos = [], 0
    for e in entries:
        offsets.append(pos)
        pos += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}
