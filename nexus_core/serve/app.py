"""OpenAI-compatible HTTP API over local models: what litellm, the teacher stage and the judge call.

    app = create_app({"tiny": "data/processed/models/tiny_base_v1"}, api_key_hashes=[hash_api_key(k)])
    with serve_in_thread(app) as base_url:   # http://127.0.0.1:PORT/v1
        litellm.completion(model="openai/tiny", api_base=base_url, api_key=k, messages=[...])

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``stream`` as SSE,
``logprobs``/``top_logprobs``, ``n``, ``stop``, ``seed``), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus); with a tts model, ``POST /v1/audio/speech`` and chat answers with audio
(:mod:`nexus_core.serve.speech`); with image models, ``POST /v1/images/generations``
(:mod:`nexus_core.serve.images`). Errors are OpenAI-shaped JSON bodies with a 4xx status; the server
stays up. API keys are only ever held as sha256 hex digests.

Limits (each a ``create_app`` argument; ``nexus serve`` flags): a request body over ``max_body_bytes``
gets 413 (its ``Content-Length`` is checked first, then the body is read in chunks and never held
past the limit), a body not received within ``body_timeout_s`` 408, a generation past
``request_timeout_s`` 504 (its rows leave the batch), more than ``max_queue`` requests waiting for a
batch slot 429 with ``Retry-After``, more than ``max_request_rows`` rows (prompts × n) 400. Every
request is checked on its own before it reaches the batch (token ids inside the vocabulary, prompt
plus ``max_tokens`` inside the context, parameters in range, no nesting deeper than JSON allows), so
a bad request gets its 4xx and its batch mates are not touched. Parsing, chat templating and
tokenising run in worker threads, never on the event loop. ``response_format`` (other than text) and
``tools`` are refused with 400: this server does not constrain decoding or call tools. A client
that disconnects cancels its generation, streaming or not.

Media in chat content parts: ``image_url`` (``data:image/...;base64`` URIs; files under ``media_root``
and http(s) URLs when enabled, see :mod:`nexus_core.serve.media`) for a model that takes images,
``input_audio`` (``{"data": <base64 WAV>, "format": "wav"}``, PCM, resampled to the encoder's rate,
at most its window long) for a model that takes audio; other models, bad base64, another format
or an undecodable clip get a 400 naming the part.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from nexus_core.serve.engine import Engine, GenRequest, Sampling
from nexus_core.train.audio import AudioSpec

if TYPE_CHECKING:
    from nexus_core.serve.media import ImageSources
    from nexus_core.serve.speech import ChatAudio


def hash_api_key(key: str) -> str:
    """The sha256 hex digest under which an API key is stored (the key itself never is)."""
    return hashlib.sha256(key.encode()).hexdigest()


class APIError(Exception):
    """An error answered as an OpenAI-style JSON body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers

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
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1, description="Seed for reproducible sampling")
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
    best_of: int | None = Field(default=None, ge=1, le=1, description="Not supported beyond 1")
    suffix: str | None = Field(default=None, max_length=0, description="Not supported; must be empty")
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


MAX_STOP = 16  # stop strings per request
MAX_PROMPTS = 256  # prompts in one completions request


def create_app(models: dict[str, str], *, api_key_hashes: list[str] | None = None, max_batch_size: int = 16,
               batch_wait_s: float = 0.005, default_max_tokens: int = 256, dtype: str = "float32",
               draft_models: dict[str, str] | None = None, device: str | None = None,
               image_models: dict[str, str] | None = None,
               max_body_bytes: int = 8 * 2**20, body_timeout_s: float = 30.0, request_timeout_s: float = 600.0,
               max_queue: int = 256, max_request_rows: int = 256, tts: dict[str, str] | None = None,
               tts_voices: dict[str, int | None] | None = None, media_root: str | None = None,
               allow_image_urls: bool = False, allow_private_image_urls: bool = False,
               max_image_bytes: int = 8 * 2**20, image_url_timeout_s: float = 10.0) -> FastAPI:
    """An OpenAI-compatible FastAPI app serving ``models`` (served name → local HF model or adapter dir).

    Models load now, so a bad directory fails here with an ``InputError`` naming it. ``image_models``
    (served name → an image_gen projector artifact) adds ``/v1/images/generations``. With
    ``api_key_hashes`` (sha256 hex digests, see :func:`hash_api_key`) every ``/v1`` call needs
    ``Authorization: Bearer <key>`` whose digest is listed; ``/health`` and ``/metrics`` stay open.
    ``draft_models`` (served name → smaller model dir with the same tokenizer) turns on speculative
    decoding for single greedy requests on an idle engine. ``device`` defaults to CUDA when available
    (int8 CPU variants stay on the CPU). ``max_batch_size`` is the most rows decoded together; the
    other limits are described in the module docstring. ``tts`` (served name → VITS dir or hub id, at most
    one) adds speech out (``/v1/audio/speech``, chat ``modalities: ["text", "audio"]``; see
    :mod:`nexus_core.serve.speech`), ``tts_voices`` maps voice names to its speaker ids. ``image_url`` parts
    may also name files under ``media_root`` and, with ``allow_image_urls``, http(s) URLs (public addresses
    only unless ``allow_private_image_urls``), at most ``max_image_bytes`` each (:mod:`nexus_core.serve.media`).
    """
    from pathlib import Path

    from nexus_core.serve.images import add_image_route, describe, load_image_models
    from nexus_core.serve.media import ImageSources
    from nexus_core.serve.speech import add_speech_route, chat_audio, load_tts

    metrics = Metrics()
    sources = ImageSources(media_root=None if media_root is None else Path(media_root), allow_urls=allow_image_urls,
                           allow_private=allow_private_image_urls, max_bytes=max_image_bytes,
                           timeout_s=image_url_timeout_s)
    tts_model = load_tts(tts, tts_voices, device)
    image = load_image_models(image_models, device, dtype)
    engines: dict[str, Engine] = {}
    for name, path in models.items():
        engines[name] = Engine(name, path, max_batch_size=max_batch_size, batch_wait_s=batch_wait_s, dtype=dtype,
                               on_batch=lambda rows, toks, n=name: metrics.batch_rows.labels(n).observe(rows),
                               draft_path=(draft_models or {}).get(name), device=device)
    hashes = [h.lower() for h in (api_key_hashes or [])]
    app = FastAPI(title="Nexus OpenAI-compatible server", docs_url=None, redoc_url=None)
    app.state.engines = engines
    app.state.metrics = metrics
    app.state.tts = tts_model
    app.state.image_models = image
    limits = _Limits(max_body_bytes, body_timeout_s, request_timeout_s, max_queue, max_request_rows)
    add_speech_route(app, tts_model, lambda request, model: _parse(request, model, limits), metrics)
    add_image_route(app, image, lambda request, model: _parse(request, model, limits), metrics, request_timeout_s)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status != 500:  # 500s are counted where they happen, with their model
            metrics.requests.labels(request.url.path, "", str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    # A plain ASGI middleware (not BaseHTTPMiddleware): the endpoint sees the client's own receive
    # channel, so a disconnect reaches it and cancels the generation.
    app.add_middleware(_AuthMiddleware, hashes=hashes, metrics=metrics)

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
        # Names only: where a model lives on this machine is none of the client's business.
        return {"object": "list", "data": [{"id": n, "object": "model", "created": e.created, "owned_by": "nexus",
                                            "max_model_len": e.context_length}
                                           for n, e in engines.items()] + describe(image)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await _parse(request, ChatRequest, limits)
        eng = _engine(engines, body.model)
        _refuse_unsupported(body)
        speech = chat_audio(body.model_extra or {}, tts_model)
        _check_queue(eng, limits)
        _check_rows(1, body.n, limits)
        top = body.top_logprobs or 0
        if top and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        # in a worker thread: image parts may be files to read or URLs to fetch
        messages, images = await run_in_threadpool(_normalise_messages, body.messages, eng.vision, eng.audio, sources)
        _check_text_length(eng, sum(len(_text_of(m["content"])) for m in messages), "messages")
        pixels = clips = None
        try:
            if images and eng.audio:  # an audio model's media are its clips
                ids, clips = await run_in_threadpool(eng.audio_chat_prompt, messages, images)
                prompts = [ids]
            elif images:
                ids, pixels = await run_in_threadpool(eng.image_chat_prompt, messages, images)
                prompts = [ids]
            else:
                prompts = [await run_in_threadpool(eng.chat_prompt, [{**m, "content": _text_of(m["content"])}
                                                                     for m in messages])]
        except Exception as exc:  # a template that rejects these messages is the caller's problem
            raise APIError(400, f"messages could not be rendered with the chat template: {exc}",
                           param="messages") from exc
        sampling = _sampling(body, eng, prompts, body.max_completion_tokens or body.max_tokens or default_max_tokens,
                             body.logprobs, top)
        return await _respond(request, "chat", body, eng, prompts, sampling, metrics, limits, pixels, clips, speech)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _parse(request, CompletionRequest, limits)
        eng = _engine(engines, body.model)
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        _refuse_unsupported(body)
        _check_queue(eng, limits)
        p = body.prompt
        if isinstance(p, str):
            texts: list[str] | None = [p]
        elif p and all(isinstance(x, int) for x in p):
            texts = None
        else:
            texts = list(p)  # pyright: ignore[reportAssignmentType] - a list of strings here
        if texts is not None and len(texts) > MAX_PROMPTS:
            raise APIError(400, f"{len(texts)} prompts; at most {MAX_PROMPTS} per request", param="prompt")
        _check_rows(1 if texts is None else len(texts), body.n, limits)
        prompts: list[list[int]]
        if texts is None:
            ids = [int(t) for t in p]
            prompts = [ids]
            bad = [t for t in ids if not 0 <= t < eng.vocab_size]
            if bad:
                raise APIError(400, f"prompt holds token ids outside the vocabulary [0, {eng.vocab_size}): "
                                    f"{bad[:5]}", param="prompt", code="invalid_token_id")
        else:
            for t in texts:
                _check_text_length(eng, len(t), "prompt")
            prompts = await run_in_threadpool(lambda: [eng.text_prompt(t) for t in texts])
        if not prompts or any(not x for x in prompts):
            raise APIError(400, "prompt is empty", param="prompt")
        lp = body.logprobs
        sampling = _sampling(body, eng, prompts, body.max_tokens or 16, lp is not None, lp or 0)
        return await _respond(request, "text", body, eng, prompts, sampling, metrics, limits)

    def close() -> None:
        for eng in engines.values():
            eng.close()

    # Worker threads are daemons; close() stops them early (an app can be served again until then).
    app.state.close = close
    return app


class _Limits:
    def __init__(self, max_body_bytes: int, body_timeout_s: float, request_timeout_s: float, max_queue: int,
                 max_request_rows: int):
        self.max_body_bytes, self.body_timeout_s = max_body_bytes, body_timeout_s
        self.request_timeout_s, self.max_queue, self.max_request_rows = request_timeout_s, max_queue, max_request_rows


class _AuthMiddleware:
    """Bearer-key check on ``/v1`` paths against sha256 digests (plain ASGI)."""

    def __init__(self, app: Any, hashes: list[str], metrics: Metrics):
        self.app, self.hashes, self.metrics = app, hashes, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.hashes and scope["path"].startswith("/v1"):
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            digest = hash_api_key(key) if key else ""
            if not any(hmac.compare_digest(digest, h) for h in self.hashes):
                self.metrics.requests.labels(scope["path"], "", "401").inc()
                resp = JSONResponse(APIError(401, "invalid or missing API key", "authentication_error",
                                             "invalid_api_key").body(), status_code=401)
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


# The rest of a refused body is not read: close the connection after the answer instead of keeping it.
_CLOSE = {"Connection": "close"}


async def _read_body(request: Request, limits: _Limits) -> bytes:
    """The body, read in chunks and refused (413) as soon as it passes the limit; 408 if it is too slow."""
    limit = limits.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is {int(declared)} bytes; the limit is {limit}", code="body_too_large",
                       headers=_CLOSE)
    buf = bytearray()
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            async for chunk in request.stream():
                if len(buf) + len(chunk) > limit:
                    raise APIError(413, f"request body is over the limit of {limit} bytes", code="body_too_large",
                                   headers=_CLOSE)
                buf += chunk
    except TimeoutError:
        raise APIError(408, f"request body not received within {limits.body_timeout_s:g}s",
                       code="request_timeout", headers=_CLOSE) from None
    except ClientDisconnect:
        raise APIError(400, "client disconnected while sending the body") from None
    return bytes(buf)


def decode_json_object(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or a 400 saying why not (malformed, too deeply nested, not an object)."""
    try:
        data = json.loads(raw or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"malformed JSON body: {exc}", code="invalid_json") from exc
    except RecursionError:
        raise APIError(400, "JSON body is nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    return data


def _decode_json(raw: bytes, model: type[BaseModel]) -> Any:
    data = decode_json_object(raw)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}"
                             for e in exc.errors()[:10])
        raise APIError(400, f"invalid request: {problems}") from exc
    except RecursionError:
        raise APIError(400, "JSON body is nested too deeply", code="invalid_json") from None


async def _parse(request: Request, model: type[BaseModel], limits: _Limits) -> Any:
    raw = await _read_body(request, limits)
    if len(raw) < 64 * 1024:  # small bodies: a thread hop costs more than the parse
        return _decode_json(raw, model)
    return await run_in_threadpool(_decode_json, raw, model)


def _refuse_unsupported(body: _Common) -> None:
    """Fields the OpenAI API defines that this server cannot honour: 400, never silently ignored."""
    extra = body.model_extra or {}
    fmt = extra.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise APIError(400, "response_format is not supported by this server (no constrained decoding); "
                            "omit it or use {\"type\": \"text\"}", param="response_format")
    for key in ("tools", "functions"):
        if extra.get(key):
            raise APIError(400, f"{key} are not supported by this server (no tool calling)", param=key)
    for key in ("tool_choice", "function_call"):
        if extra.get(key) not in (None, "none"):
            raise APIError(400, f"{key} is not supported by this server (no tool calling)", param=key)


def _check_queue(eng: Engine, limits: _Limits) -> None:
    waiting = eng.queue_depth()
    if waiting >= limits.max_queue:
        # Rough wait: the queue drains about a batch per request time; one second is a fair first retry.
        raise APIError(429, f"{waiting} requests are waiting for {eng.name!r}; retry later", "rate_limit_error",
                       code="queue_full", headers={"Retry-After": "1"})


def _check_rows(prompts: int, n: int, limits: _Limits) -> None:
    if prompts * n > limits.max_request_rows:
        raise APIError(400, f"{prompts} prompts × n={n} = {prompts * n} sequences; at most "
                            f"{limits.max_request_rows} per request", param="n")


def _check_text_length(eng: Engine, chars: int, param: str) -> None:
    # No token is longer than max_token_chars characters, so this text has at least chars / that many
    # tokens: refuse what cannot fit without paying for tokenising it.
    if chars / eng.max_token_chars > eng.context_length:
        raise APIError(400, f"{param} is at least {chars // eng.max_token_chars} tokens; the model's context is "
                            f"{eng.context_length}", code="context_length_exceeded", param=param)


def _engine(engines: dict[str, Engine], name: str) -> Engine:
    # litellm users sometimes keep the provider prefix ("openai/tiny"): accept it.
    eng = engines.get(name) or engines.get(name.split("/", 1)[-1])
    if eng is None:
        raise APIError(404, f"unknown model {name!r} (served: {', '.join(sorted(engines))})", code="model_not_found",
                       param="model")
    return eng


def _normalise_messages(messages: list[dict[str, Any]], vision: bool = False, audio: AudioSpec | None = None,
                        sources: ImageSources | None = None) -> tuple[list[dict[str, Any]], list[Any]]:
    """Messages with string content, or (for a model that takes images) text and image parts; and the
    images of the ``image_url`` parts (read as ``sources`` allows), decoded, in order. For a model that takes
    audio (``audio``: its clips' spec), ``input_audio`` parts likewise, their clips decoded in the list.
    Other parts are dropped."""
    out, images = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}]: needs a role", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: text, and images for a model that takes them
            parts: list[dict[str, Any]] = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image_url":
                    if not vision:
                        raise APIError(400, f"messages[{i}].content[{j}]: this model takes text only (no vision "
                                            f"encoder); image parts are refused", param="messages")
                    images.append(_image_part(part.get("image_url"), f"messages[{i}].content[{j}]", sources))
                    parts.append({"type": "image"})
                elif kind == "input_audio":
                    if audio is None:
                        raise APIError(400, f"messages[{i}].content[{j}]: this model takes no audio (no audio "
                                            f"encoder); input_audio parts are refused", param="messages")
                    images.append(_input_audio(part.get("input_audio"), audio, f"messages[{i}].content[{j}]"))
                    parts.append({"type": "audio"})
                elif isinstance(part, dict) and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
            content = parts if images and (vision or audio) else "".join(p.get("text", "") for p in parts)
        if content is not None and not isinstance(content, str | list):
            raise APIError(400, f"messages[{i}].content: must be a string or a list of content parts",
                           param="messages")
        out.append({"role": m["role"], "content": content or ""})
    return out, images


def _text_of(content: str | list[dict[str, Any]]) -> str:
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def _image_part(value: Any, where: str, sources: ImageSources | None = None) -> Any:
    """The upright PIL image of an ``image_url`` part (data URI; file or URL as ``sources`` allows)."""
    from nexus_core.serve.media import ImageSources, MediaError, load_image

    try:
        return load_image(value, sources or ImageSources())
    except MediaError as exc:
        raise APIError(400, f"{where}: {exc}", param="messages") from exc


def _input_audio(value: Any, spec: AudioSpec, where: str) -> Any:
    """The samples of an ``input_audio`` part (``{"data": <base64>, "format": "wav"}``) at the model's rate."""
    import base64
    import binascii

    from nexus_core.train.audio import load_audio

    if not isinstance(value, dict) or not isinstance(value.get("data"), str):
        raise APIError(400, f"{where}: input_audio must be {{\"data\": <base64>, \"format\": \"wav\"}}",
                       param="messages")
    if value.get("format") != "wav":
        raise APIError(400, f"{where}: input_audio format {value.get('format')!r} is not supported; this server "
                            f"decodes PCM WAV only (format: wav)", param="messages")
    try:
        raw = base64.b64decode(value["data"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise APIError(400, f"{where}: input_audio data is not valid base64", param="messages") from exc
    try:
        return load_audio(raw, spec)
    except ValueError as exc:
        raise APIError(400, f"{where}: the audio {exc}", param="messages") from exc


def _sampling(body: _Common, eng: Engine, prompts: list[list[int]], max_tokens: int, logprobs: bool,
              top: int) -> Sampling:
    longest = max(len(p) for p in prompts)
    room = eng.context_length - longest
    if room < 1:
        raise APIError(400, f"prompt is {longest} tokens; the model's context is {eng.context_length}",
                       code="context_length_exceeded", param="messages")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP or any(len(s) > 256 for s in stop):
        raise APIError(400, f"at most {MAX_STOP} stop strings of at most 256 characters", param="stop")
    return Sampling(max_tokens=min(max_tokens, room), temperature=body.temperature, top_p=body.top_p,
                    stop=[s for s in stop if s], seed=body.seed, logprobs=logprobs, top_logprobs=top,
                    ignore_eos=body.ignore_eos)


async def _next_event(request: Request, req: GenRequest, deadline: float, poll_disconnect: bool) -> tuple:
    """The engine's next event for ``req``; cancels it and raises when the client left or time ran out."""
    events: asyncio.Queue = req.events  # pyright: ignore[reportAssignmentType] - set before submit
    while True:
        now = time.monotonic()
        if now >= deadline:
            req.cancelled = True
            raise _Timeout
        # Events may arrive every few milliseconds: look at the connection on a clock, not on silence.
        if poll_disconnect and now - req.checked_at >= 0.25:
            req.checked_at = now
            if await request.is_disconnected():
                req.cancelled = True
                raise _Disconnected
        try:
            return await asyncio.wait_for(events.get(), timeout=min(deadline - now, 0.25))
        except TimeoutError:
            continue


class _Timeout(Exception):
    pass


class _Disconnected(Exception):
    pass


async def _respond(request: Request, kind: str, body: _Common, eng: Engine, prompts: list[list[int]],
                   sampling: Sampling, metrics: Metrics, limits: _Limits, pixel_values: Any = None,
                   audio_features: Any = None, speech: ChatAudio | None = None) -> Response:
    endpoint = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    req = GenRequest(prompts=prompts, sampling=sampling, n=body.n, loop=asyncio.get_running_loop(),
                     events=asyncio.Queue(), pixel_values=pixel_values, audio_features=audio_features)
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    start = time.perf_counter()
    deadline = time.monotonic() + limits.request_timeout_s
    eng.submit(req)
    total = len(prompts) * body.n
    include_usage = bool((body.stream_options or {}).get("include_usage"))

    def done_metrics(prompt_toks: int, completion_toks: int, status: str = "200") -> None:
        metrics.requests.labels(endpoint, eng.name, status).inc()
        metrics.prompt_tokens.labels(eng.name).inc(prompt_toks)
        metrics.completion_tokens.labels(eng.name).inc(completion_toks)
        metrics.latency.labels(endpoint, eng.name).observe(time.perf_counter() - start)

    if body.stream:
        from nexus_core.serve.speech import AudioStreamer

        async def sse() -> AsyncIterator[str]:
            remaining, usage, first = total, {}, True
            # Sentences are spoken while the text streams on; their audio comes back as events.
            speaking = AudioStreamer(speech, total, req.events, created) if speech else None
            try:
                if kind == "chat":
                    for i in range(total):
                        yield _sse(_chat_chunk(rid, created, eng.name, i, {"role": "assistant", "content": ""}))
                while remaining:
                    # starlette cancels this generator when the client disconnects (finally: cancelled)
                    try:
                        ev = await _next_event(request, req, deadline, poll_disconnect=False)
                    except _Timeout:
                        metrics.requests.labels(endpoint, eng.name, "504").inc()
                        yield _sse(APIError(504, f"generation took longer than {limits.request_timeout_s:g}s",
                                            "timeout_error", code="request_timeout").body())
                        break
                    if ev[0] == "error":
                        metrics.requests.labels(endpoint, eng.name, "500").inc()
                        yield _sse(APIError(500, ev[1], "server_error").body())
                        break
                    if ev[0] == "audio":
                        yield _sse(_chat_chunk(rid, created, eng.name, ev[1], {"audio": ev[2]}))
                        continue
                    if speaking and ev[0] == "done":  # its finish chunk follows its last audio ("spoken")
                        speaking.finish(ev)
                        continue
                    if ev[0] == "token":
                        if first:
                            metrics.ttft.labels(eng.name).observe(time.perf_counter() - start)
                            first = False
                        _, idx, text, lps = ev
                        if kind == "chat":
                            lp = {"content": [_chat_lp(e) for e in lps]} if sampling.logprobs else None
                            yield _sse(_chat_chunk(rid, created, eng.name, idx, {"content": text}, logprobs=lp))
                            if speaking:
                                speaking.feed(idx, text)
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
                if not remaining:
                    u = _usage(usage, body.n)
                    done_metrics(u["prompt_tokens"], u["completion_tokens"])
                    if include_usage:
                        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
                        yield _sse({"id": rid, "object": obj, "created": created, "model": eng.name, "choices": [],
                                    "usage": u})
                yield "data: [DONE]\n\n"
            finally:
                req.cancelled = True  # client went away or we are done: free the batch rows
                if speaking:
                    speaking.close()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    texts: dict[int, list[str]] = {i: [] for i in range(total)}
    lps: dict[int, list[dict[str, Any]]] = {i: [] for i in range(total)}
    finish: dict[int, str] = {}
    usage: dict[int, tuple[int, int]] = {}
    try:
        while len(finish) < total:
            try:
                ev = await _next_event(request, req, deadline, poll_disconnect=True)
            except _Timeout:  # counted by the APIError handler
                raise APIError(504, f"generation took longer than {limits.request_timeout_s:g}s", "timeout_error",
                               code="request_timeout") from None
            except _Disconnected:
                metrics.requests.labels(endpoint, eng.name, "499").inc()  # nginx's "client closed request"
                return Response(status_code=499)
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
        if speech:  # the whole answer spoken, off the event loop
            for c in choices:
                c["message"]["audio"] = await run_in_threadpool(speech.render, c["message"]["content"], created)
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
