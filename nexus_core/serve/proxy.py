"""Our front in front of another OpenAI-compatible server (vLLM, or any engine): auth, limits, relaying.

    upstream = start_upstream("tiny", argv, base_url="http://127.0.0.1:PORT/v1", env={...})
    app = create_proxy_app([upstream], api_key_hashes=[hash_api_key(k)], upstream_api_key=internal_key)

The front knows nothing about the engine behind it. It answers ``/v1/models`` (names only, never the
upstream's paths), ``/health`` (503 unless every upstream answers its own ``/health``) and ``/metrics``
itself, and forwards ``POST /v1/chat/completions`` and ``/v1/completions`` to the upstream that serves
the body's ``model``. Before forwarding it applies the same checks as the embedded server: the API key
(sha256 digests; the upstream is called with a key of its own, never the client's), the body limit
(413, read in chunks), the body timeout (408), malformed or too deeply nested JSON (400), an unknown
model (404), prompts × n over ``max_request_rows`` (400), and more than ``max_in_flight + max_queue``
requests in flight for one model (429 with ``Retry-After``; the engine queues the ones past its batch).
Everything else (parameters, token ids, ``response_format``, tools) is the engine's to accept or
refuse: its status and body are relayed as they are, and SSE streams are relayed chunk by chunk.
An upstream that cannot be reached answers 502, one whose process has exited 503, a generation past
``request_timeout_s`` 504 (an error event mid-stream). A client that disconnects closes the upstream
request, which an engine such as vLLM takes as an abort.

:func:`start_upstream` runs an engine as a child process in its own process group, waits for its
``/health`` with a timeout, and :meth:`Upstream.stop` ends the group (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from nexus_core.errors import NexusError
from nexus_core.serve.app import APIError, Metrics, _AuthMiddleware, _Limits, _read_body, decode_json_object


@dataclass
class Upstream:
    """An OpenAI-compatible server the front forwards ``name``'s requests to; ``proc`` when we started it."""

    name: str
    base_url: str  # ends in /v1
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    in_flight: int = field(default=0, repr=False)

    @property
    def root(self) -> str:
        """The server's root URL (where ``/health`` lives)."""
        return self.base_url.removesuffix("/").removesuffix("/v1")

    def exited(self) -> str | None:
        """Why the upstream process is gone (``None`` while it runs, or when it is not ours)."""
        if self.proc is None or self.proc.poll() is None:
            return None
        return f"the {self.name!r} engine process exited with code {self.proc.returncode}"

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the process's log file, when it writes one."""
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> None:
        """End the process group: SIGTERM, then SIGKILL after ``timeout_s`` (engines spawn workers of their own)."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                # the leader is gone; make sure none of its workers outlive it
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                break
            except subprocess.TimeoutExpired:
                continue


def start_upstream(name: str, argv: list[str], base_url: str, *, env: dict[str, str] | None = None,
                   startup_timeout_s: float = 600.0, log_path: Path | None = None) -> Upstream:
    """Start ``argv`` (a server that will answer at ``base_url``) and wait until its ``/health`` says 200.

    Its output goes to ``log_path`` (or to ours when ``None``). A process that exits during start-up,
    or does not answer within ``startup_timeout_s``, raises a :class:`NexusError` (and is stopped).
    """
    import httpx

    out = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115 - the child holds it
    try:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        if out is not None:
            out.close()
    up = Upstream(name, base_url, proc, log_path)
    deadline = time.monotonic() + startup_timeout_s
    while True:
        if up.exited():
            tail = up.log_tail()
            up.stop()
            raise NexusError(f"{up.exited()} during start-up" + (f"; its last output:\n{tail}" if tail else ""))
        try:
            if httpx.get(f"{up.root}/health", timeout=2.0).status_code == 200:
                return up
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            up.stop()
            raise NexusError(f"the {name!r} engine did not answer {up.root}/health within {startup_timeout_s:g}s")
        time.sleep(0.25)


def create_proxy_app(upstreams: list[Upstream], *, api_key_hashes: list[str] | None = None,
                     upstream_api_key: str | None = None, max_body_bytes: int = 8 * 2**20,
                     body_timeout_s: float = 30.0, request_timeout_s: float = 600.0, max_in_flight: int = 16,
                     max_queue: int = 256, max_request_rows: int = 256) -> FastAPI:
    """A FastAPI app that checks and forwards requests to ``upstreams`` (one per served model name).

    ``max_in_flight`` is what the engine decodes at once (its batch: ``--max-num-seqs`` for vLLM);
    ``max_queue`` more may wait in the engine's queue before the front answers 429.
    """
    import httpx

    by_name = {u.name: u for u in upstreams}
    metrics = Metrics()
    hashes = [h.lower() for h in (api_key_hashes or [])]
    limits = _Limits(max_body_bytes, body_timeout_s, request_timeout_s, max_queue, max_request_rows)
    clients: dict[int, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        for c in list(clients.values()):
            await c.aclose()
        clients.clear()

    app = FastAPI(title="Nexus OpenAI-compatible front", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.upstreams = by_name
    app.state.metrics = metrics

    def client() -> httpx.AsyncClient:
        # One pooled client per event loop (an app may be served from a thread's loop in tests).
        loop = id(asyncio.get_running_loop())
        if loop not in clients:
            clients[loop] = httpx.AsyncClient(timeout=httpx.Timeout(request_timeout_s, connect=5.0),
                                              limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        return clients[loop]

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        metrics.requests.labels(request.url.path, "", str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    app.add_middleware(_AuthMiddleware, hashes=hashes, metrics=metrics)

    @app.get("/health")
    async def health() -> JSONResponse:
        problems = {}
        for name, up in by_name.items():
            why = up.exited()
            if why is None:
                try:
                    r = await client().get(f"{up.root}/health", timeout=5.0)
                    why = None if r.status_code == 200 else f"its /health answered {r.status_code}"
                except httpx.HTTPError as exc:
                    why = f"its /health could not be reached ({type(exc).__name__})"
            if why:
                problems[name] = why
        status = 503 if problems else 200
        return JSONResponse({"status": "unavailable" if problems else "ok", "models": sorted(by_name),
                             **({"problems": problems} if problems else {})}, status_code=status)

    @app.get("/metrics")
    async def prom() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        for name, up in by_name.items():
            metrics.queue.labels(name).set(max(0, up.in_flight - max_in_flight))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        # Our names only: an engine's listing would show where the weights live on this machine.
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "nexus"}
                                           for n in by_name]}

    async def forward(request: Request, endpoint: str) -> Response:
        raw = await _read_body(request, limits)
        data = decode_json_object(raw) if len(raw) < 64 * 1024 else await run_in_threadpool(decode_json_object, raw)
        name = data.get("model")
        up = by_name.get(name) if isinstance(name, str) else None
        if up is None and isinstance(name, str):  # litellm users sometimes keep the provider prefix
            up = by_name.get(name.split("/", 1)[-1])
        if up is None:
            raise APIError(404, f"unknown model {name!r} (served: {', '.join(sorted(by_name))})",
                           code="model_not_found", param="model")
        _check_rows(data, limits)
        if up.in_flight >= max_in_flight + max_queue:
            raise APIError(429, f"{up.in_flight - max_in_flight} requests are waiting for {up.name!r}; retry later",
                           "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        if why := up.exited():
            raise APIError(503, f"{why}; the server cannot answer for {up.name!r}", "server_error",
                           code="engine_unavailable")
        if name != up.name:
            data["model"] = up.name
            raw = json.dumps(data).encode()
        headers = {"content-type": "application/json", "accept": request.headers.get("accept", "*/*")}
        if upstream_api_key:
            headers["authorization"] = f"Bearer {upstream_api_key}"
        start = time.perf_counter()
        deadline = time.monotonic() + request_timeout_s
        up.in_flight += 1
        released = False

        def release(status: int | None) -> None:
            nonlocal released
            if not released:
                released = True
                up.in_flight -= 1
                if status is not None:  # None: an APIError, counted by its handler
                    metrics.requests.labels(endpoint, up.name, str(status)).inc()
                    metrics.latency.labels(endpoint, up.name).observe(time.perf_counter() - start)

        try:
            upstream_req = client().build_request("POST", f"{up.base_url}{endpoint.removeprefix('/v1')}",
                                                  content=raw, headers=headers)
            resp = await _send(request, client(), upstream_req, deadline, up, request_timeout_s)
        except BaseException as exc:
            release(None if isinstance(exc, APIError) else 499)
            raise
        if resp is None:  # the client left before the engine answered: the upstream request is closed
            release(499)
            return Response(status_code=499)
        relay = {k: v for k, v in resp.headers.items() if k.lower() in ("content-type", "retry-after")}
        if resp.headers.get("content-type", "").startswith("text/event-stream"):
            async def relay_stream() -> AsyncIterator[bytes]:
                try:
                    async for chunk in _until(resp.aiter_raw(), deadline):
                        yield chunk
                except TimeoutError:
                    yield _sse_error(504, f"generation took longer than {request_timeout_s:g}s", "timeout_error",
                                     "request_timeout")
                except httpx.HTTPError as exc:
                    why = up.exited() or f"the engine broke off the stream ({type(exc).__name__})"
                    yield _sse_error(502, why, "server_error", "engine_unavailable")
                finally:
                    await resp.aclose()  # a client that left ends here too: the engine sees the abort
                    release(resp.status_code)

            return StreamingResponse(relay_stream(), status_code=resp.status_code,
                                     headers={**relay, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                body = await resp.aread()
        except TimeoutError:
            release(None)
            raise APIError(504, f"generation took longer than {request_timeout_s:g}s", "timeout_error",
                           code="request_timeout") from None
        except httpx.HTTPError as exc:
            release(None)
            raise _unreachable(up, exc) from None
        finally:
            await resp.aclose()
        release(resp.status_code)
        return Response(body, status_code=resp.status_code, headers=relay)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await forward(request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await forward(request, "/v1/completions")

    return app


async def _send(request: Request, client: Any, upstream_req: Any, deadline: float, up: Upstream,
                timeout_s: float) -> Any:
    """The upstream's response (headers read, body not), or ``None`` when the client disconnected first.

    An engine answers a non-streaming request only when the generation is done: watch the client
    meanwhile, and cancel (closing the upstream connection) if it goes away.
    """
    import httpx

    task = asyncio.ensure_future(client.send(upstream_req, stream=True))
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise APIError(504, f"generation took longer than {timeout_s:g}s", "timeout_error",
                               code="request_timeout")
            done, _ = await asyncio.wait({task}, timeout=min(left, 0.25))
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    except httpx.HTTPError as exc:
        raise _unreachable(up, exc) from None
    finally:
        if not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass


async def _until(chunks: AsyncIterator[bytes], deadline: float) -> AsyncIterator[bytes]:
    it = chunks.__aiter__()
    while True:
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                chunk = await it.__anext__()
        except StopAsyncIteration:
            return
        yield chunk


def _unreachable(up: Upstream, exc: Exception) -> APIError:
    if why := up.exited():
        return APIError(503, f"{why}; the server cannot answer for {up.name!r}", "server_error",
                        code="engine_unavailable")
    return APIError(502, f"the engine for {up.name!r} could not be reached ({type(exc).__name__})", "server_error",
                    code="engine_unreachable")


def _sse_error(status: int, message: str, type_: str, code: str) -> bytes:
    return f"data: {json.dumps(APIError(status, message, type_, code).body())}\n\n".encode()


def _check_rows(data: dict[str, Any], limits: _Limits) -> None:
    n = data.get("n", 1)
    prompt = data.get("prompt")
    prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
    if isinstance(n, int) and prompts * n > limits.max_request_rows:
        raise APIError(400, f"{prompts} prompts × n={n} = {prompts * n} sequences; at most "
                            f"{limits.max_request_rows} per request", param="n")
