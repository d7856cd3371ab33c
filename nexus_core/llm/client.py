"""An async LLM client over litellm: bounded concurrency, an rpm limit, retries that honour
``Retry-After``, a persistent response cache, and cost through ``litellm.completion_cost``.

Any litellm provider string works (``openrouter/...``, ``openai/...``, ``anthropic/...``, or
``openai/<name>`` with an ``api_base`` pointing at a local OpenAI-compatible server).

The cache is SQLite under ``NEXUS_HOME`` keyed by sha256(model, messages, sampling params); each
successful response is committed as soon as it arrives, so a killed run resumes where it stopped
and a re-run never pays twice. Read-only *recorded* caches (JSONL files committed with the project)
can sit behind it; ``offline=True`` serves only from these caches and reports each miss.

Used by teacher collection and regeneration (distill) and by the evaluation judge.

Every error text a :class:`Completion` carries has been through :func:`nexus_core.secrets.scrub`: a
provider that echoes the ``Authorization`` header in its error body leaves no key in a table or a log.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import multiprocessing
import os
import random
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from nexus_core.config import ConfigPath, NexusModel
from nexus_core.errors import ConfigError, InputError
from nexus_core.secrets import scrub
from nexus_core.settings import nexus_home


class LLMConfig(NexusModel):
    """How to reach a model through litellm and how hard to push it."""

    model: str = Field(default="openai/nexus-teacher", description="litellm provider string, e.g. openrouter/openai/gpt-4o-mini")
    api_base: str | None = Field(default=None, description="Base URL of an OpenAI-compatible server (ends in /v1); null for the provider default")
    api_key_env: str | None = Field(default=None, description="Environment variable holding the API key (never the key itself)")
    max_concurrency: int = Field(default=8, ge=1, description="Requests in flight at once")
    rpm: float | None = Field(default=None, gt=0, description="Requests per minute limit; null for none")
    timeout_s: float = Field(default=60.0, gt=0, description="Per-request timeout in seconds")
    max_retries: int = Field(default=4, ge=0, description="Retries of a transient failure (429, 5xx, timeout, bad body)")
    backoff_s: float = Field(default=1.0, ge=0, description="First retry delay; doubles each retry (Retry-After wins when given)")
    max_backoff_s: float = Field(default=60.0, ge=0, description="Longest single wait between retries")
    max_cost_usd: float | None = Field(default=None, ge=0, description="Stop sending new requests once this much is spent")
    input_usd_per_mtok: float | None = Field(default=None, ge=0, description="Price per million prompt tokens; overrides "
                                             "litellm's price map (needed where it has no price for the model)")
    output_usd_per_mtok: float | None = Field(default=None, ge=0, description="Price per million completion tokens; "
                                              "set together with input_usd_per_mtok")
    temperature: float = Field(default=0.7, ge=0, description="Sampling temperature")
    max_tokens: int = Field(default=512, ge=1, description="Maximum completion tokens")
    top_logprobs: int = Field(default=0, ge=0, le=20, description="Top-k logprobs to request per token (0: none)")
    offline: bool = Field(default=False, description="Serve only from the response caches; a miss is a failed row naming its key")
    cache: bool = Field(default=True, description="Use the SQLite response cache under NEXUS_HOME")
    recorded_cache: list[ConfigPath] = Field(default_factory=list, description="Read-only JSONL response caches (key, response) behind the SQLite one")

    def sampling(self) -> dict[str, Any]:
        """The sampling parameters that join the cache key."""
        out: dict[str, Any] = {"temperature": self.temperature, "max_tokens": self.max_tokens}
        if self.top_logprobs:
            out.update(logprobs=True, top_logprobs=self.top_logprobs)
        return out


def cache_key(model: str, messages: list[dict[str, Any]], sampling: dict[str, Any]) -> str:
    """sha256 over (model, messages, sampling params), canonical JSON."""
    blob = json.dumps({"model": model, "messages": messages, "sampling": sampling},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """SQLite response cache (one row per key, committed per response) plus read-only recorded JSONL."""

    def __init__(self, path: str | Path | None = None, recorded: Iterable[str | Path] = (), enabled: bool = True):
        self.path = Path(path) if path else nexus_home() / "llm_cache.sqlite"
        self.enabled = enabled
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
            self._conn.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL survives a killed process (only a power cut may drop the last commits)
            # and spares an fsync per response: each put blocks the event loop while it runs.
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, model TEXT, "
                               "response TEXT NOT NULL, created_at REAL)")
            self._conn.commit()
        self._recorded: dict[str, dict[str, Any]] = {}
        for file in recorded:
            self._load_recorded(Path(file))

    def _load_recorded(self, path: Path) -> None:
        if not path.is_file():
            raise InputError(f"{path}: recorded response cache not found")
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    self._recorded[rec["key"]] = rec["response"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise InputError(f"{path}:{lineno}: not a recorded response ({exc})") from None

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored response for ``key`` (SQLite first, then recorded files), or None."""
        if self._conn is not None:
            with self._lock:
                row = self._conn.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
            if row:
                return json.loads(row[0])
        return self._recorded.get(key)

    def put(self, key: str, model: str, response: dict[str, Any]) -> None:
        """Store one response and commit at once (a killed run keeps everything answered so far)."""
        if self._conn is None:
            return
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)",
                               (key, model, json.dumps(response, ensure_ascii=False), time.time()))
            self._conn.commit()

    def close(self) -> None:
        """Close the SQLite connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


@dataclass
class Completion:
    """One request's outcome. ``status`` is ok | failed | skipped; failures are data, not exceptions."""

    key: str
    status: str
    content: str | None = None
    error: str | None = None
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    latency_s: float = 0.0
    attempts: int = 0
    waits: list[float] = field(default_factory=list)
    cached: bool = False
    logprobs: list[dict[str, Any]] | None = None
    response: dict[str, Any] | None = field(default=None, repr=False)


def litellm_prices(model: str) -> bool:
    """Whether litellm's price map (the local copy) has a price for ``model``."""
    import litellm

    return model in litellm.model_cost or model.split("/", 1)[-1] in litellm.model_cost


def check_model(cfg: LLMConfig, where: str = "teacher") -> None:
    """Fail fast on a provider string litellm does not know, a missing API key (named, never printed),
    or a cost cap that could never trigger because nothing prices the model."""
    if cfg.offline:
        return
    import litellm

    try:
        litellm.get_llm_provider(cfg.model, api_base=cfg.api_base)
    except Exception:
        raise ConfigError([f"{where}.model: litellm does not know the provider of {cfg.model!r} "
                           f"(use e.g. openrouter/..., openai/..., anthropic/...)"]) from None
    if (cfg.input_usd_per_mtok is None) != (cfg.output_usd_per_mtok is None):
        raise ConfigError([f"{where}.input_usd_per_mtok / {where}.output_usd_per_mtok: set both or neither"])
    if cfg.max_cost_usd is not None and cfg.input_usd_per_mtok is None and not litellm_prices(cfg.model):
        raise ConfigError([f"{where}.max_cost_usd: litellm has no price for {cfg.model}, so every call would "
                           f"cost 0 and the cap could never stop the run; set {where}.input_usd_per_mtok and "
                           f"{where}.output_usd_per_mtok (the provider's list prices), or remove the cap"])
    if cfg.api_key_env:
        if not os.environ.get(cfg.api_key_env):
            raise ConfigError([f"{where}.api_key_env: environment variable {cfg.api_key_env} is not set"])
    elif cfg.api_base is None:
        missing = litellm.validate_environment(cfg.model).get("missing_keys") or []
        if missing:
            raise ConfigError([f"{where}.model: {cfg.model} needs environment variable(s) {', '.join(missing)}"])


def _retry_after(exc: BaseException) -> float | None:
    """Seconds from a Retry-After header on a litellm/httpx error, if any."""
    headers: Any = None
    for attr in ("litellm_response_headers", "headers"):
        headers = getattr(exc, attr, None) or headers
    response = getattr(exc, "response", None)
    if headers is None and response is not None:
        headers = getattr(response, "headers", None)
    if not headers:
        return None
    try:
        value = headers.get("retry-after") or headers.get("Retry-After")
        return float(value) if value is not None else None
    except (TypeError, ValueError, AttributeError):
        return None


def _is_permanent(exc: BaseException) -> bool:
    import litellm

    permanent = (litellm.AuthenticationError, litellm.NotFoundError, litellm.PermissionDeniedError,
                 litellm.ContextWindowExceededError, litellm.ContentPolicyViolationError)
    if isinstance(exc, permanent):
        return True
    # A 400 is the caller's fault, except litellm reports some malformed bodies as BadRequest too.
    return isinstance(exc, litellm.BadRequestError) and "Provider NOT provided" in str(exc)


def _content_of(response: dict[str, Any]) -> tuple[str, list[dict[str, Any]] | None]:
    """(message content, logprobs content list) of a chat completion dict; ValueError if malformed."""
    try:
        choice = response["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        raise ValueError(f"malformed response: no choices[0].message.content ({exc})") from None
    if not isinstance(content, str) or not content.strip():
        raise ValueError("malformed response: empty content")
    lp = choice.get("logprobs")
    content_lp = lp.get("content") if isinstance(lp, dict) else None
    return content, content_lp or None


class Limits:
    """Money spent and the next free rate-limit slot: what the cost cap and ``rpm`` are checked against.

    One client owns a private one. Clients in several worker processes share one made with
    ``shared=True`` (values in shared memory), so the cap and the rate hold for the whole pool.
    ``time.monotonic`` is system-wide on Linux, so slots compare across processes.
    """

    def __init__(self, shared: bool = False):
        ctx = multiprocessing.get_context("spawn")
        self._lock = ctx.Lock() if shared else threading.Lock()
        self._spent = ctx.RawValue("d", 0.0) if shared else _Box()
        self._slot = ctx.RawValue("d", 0.0) if shared else _Box()

    @property
    def spent_usd(self) -> float:
        """USD paid for fresh (non-cached) calls so far."""
        return self._spent.value

    def add(self, usd: float) -> None:
        """Record money paid."""
        with self._lock:
            self._spent.value += usd

    def take_slot(self, interval: float) -> float:
        """Reserve the next send time ``interval`` seconds after the last one; returns its monotonic time."""
        with self._lock:
            slot = max(time.monotonic(), self._slot.value)
            self._slot.value = slot + interval
        return slot


@dataclass
class _Box:
    value: float = 0.0


class LLMClient:
    """Async chat completions with the guarantees listed in the module docstring.

    ``spent_usd`` counts only fresh (non-cached) calls: money actually paid, by this client or by
    every client sharing its :class:`Limits`.
    """

    def __init__(self, cfg: LLMConfig, cache: ResponseCache | None = None, limits: Limits | None = None,
                 extra: dict[str, Any] | None = None):
        self.cfg = cfg
        # more request parameters (e.g. the judge's response_format): sent and keyed like sampling ones
        self.extra = dict(extra or {})
        self.cache = cache or ResponseCache(recorded=cfg.recorded_cache, enabled=cfg.cache)
        self.limits = limits or Limits()
        self._sem: asyncio.Semaphore | None = None
        self._sem_loop: asyncio.AbstractEventLoop | None = None

    @property
    def spent_usd(self) -> float:
        """USD paid for fresh calls (see :class:`Limits`)."""
        return self.limits.spent_usd

    def _api_key(self) -> str | None:
        if self.cfg.api_key_env:
            return os.environ.get(self.cfg.api_key_env)
        # A local OpenAI-compatible server needs some key in the header; providers read their own env.
        return "sk-local-not-needed" if self.cfg.api_base else None

    def _scrub(self, text: str) -> str:
        """``text`` without the API key or any other secret (:func:`nexus_core.secrets.scrub`)."""
        return scrub(text, [self._api_key()]) or ""

    async def _wait_rate(self) -> None:
        if not self.cfg.rpm:
            return
        wait = self.limits.take_slot(60.0 / self.cfg.rpm) - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    def _cost(self, response: Any) -> float:
        import litellm

        if self.cfg.input_usd_per_mtok is not None:  # the config's prices win over litellm's map
            usage = getattr(response, "usage", None)
            tokens_in = getattr(usage, "prompt_tokens", 0) or 0
            tokens_out = getattr(usage, "completion_tokens", 0) or 0
            return (tokens_in * self.cfg.input_usd_per_mtok + tokens_out * (self.cfg.output_usd_per_mtok or 0)) / 1e6
        hidden = getattr(response, "_hidden_params", None) or {}
        if hidden.get("response_cost") is not None:  # litellm already priced it during the call
            return float(hidden["response_cost"])
        if not litellm_prices(self.cfg.model):
            return 0.0  # unpriced (a local server): skip completion_cost's slow failure path
        try:
            return float(litellm.completion_cost(completion_response=response) or 0.0)
        except Exception:  # a model without a price (local server): free
            return 0.0

    async def complete(self, messages: list[dict[str, Any]]) -> Completion:
        """One chat completion: from the cache, or through litellm with retries."""
        cfg = self.cfg
        sampling = {**cfg.sampling(), **self.extra}
        key = cache_key(cfg.model, messages, sampling)
        cached = self.cache.get(key)
        if cached is not None:
            return self._completion(key, cached, cached=True, latency=0.0, attempts=0)
        if cfg.offline:
            return Completion(key=key, status="failed", model=cfg.model,
                              error=f"offline: no cached response for key {key[:16]}")
        loop = asyncio.get_running_loop()
        if self._sem is None or self._sem_loop is not loop:  # map_sync runs each call in a fresh loop
            self._sem, self._sem_loop = asyncio.Semaphore(cfg.max_concurrency), loop
        import litellm

        last_error, attempt, waits = "", 0, []
        async with self._sem:
            # Checked once a slot is free, not on arrival: a whole batch arrives at once, before
            # anything is spent, so a check on arrival would let the full batch past the cap.
            if cfg.max_cost_usd is not None and self.spent_usd >= cfg.max_cost_usd:
                return Completion(key=key, status="skipped", model=cfg.model,
                                  error=f"cost cap reached ({self.spent_usd:.4f} >= {cfg.max_cost_usd} USD)")
            for attempt in range(1, cfg.max_retries + 2):
                await self._wait_rate()
                t0 = time.perf_counter()
                try:
                    raw = await litellm.acompletion(
                        model=cfg.model, messages=messages, api_base=cfg.api_base, api_key=self._api_key(),
                        timeout=cfg.timeout_s, num_retries=0, max_retries=0, **sampling)
                    latency = time.perf_counter() - t0
                    response: dict[str, Any] = raw.model_dump(mode="json")  # pyright: ignore[reportAttributeAccessIssue] - a ModelResponse without stream=True
                    _content_of(response)  # malformed bodies are retried like transient errors
                    cost = self._cost(raw)
                    response["_nexus_cost_usd"] = cost
                    self.limits.add(cost)
                    self.cache.put(key, cfg.model, response)
                    done = self._completion(key, response, cached=False, latency=latency, attempts=attempt)
                    done.waits = waits
                    return done
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - every failure becomes row data after retries
                    # Provider bodies may echo the request's headers: scrub before the text is kept anywhere.
                    last_error = f"{type(exc).__name__}: {self._scrub(str(exc))[:300]}"
                    if _is_permanent(exc) or attempt > cfg.max_retries:
                        break
                    wait = _retry_after(exc)
                    if wait is None:
                        wait = min(cfg.backoff_s * 2 ** (attempt - 1), cfg.max_backoff_s)
                        wait *= 0.5 + random.random() / 2  # jitter so retries do not stampede
                    waits.append(min(wait, cfg.max_backoff_s))
                    await asyncio.sleep(waits[-1])
        return Completion(key=key, status="failed", model=cfg.model, error=last_error, attempts=attempt, waits=waits)

    def _completion(self, key: str, response: dict[str, Any], *, cached: bool, latency: float,
                    attempts: int) -> Completion:
        try:
            content, logprobs = _content_of(response)
        except ValueError as exc:
            return Completion(key=key, status="failed", error=self._scrub(str(exc)), model=self.cfg.model,
                              cached=cached)
        usage = response.get("usage") or {}
        return Completion(
            key=key, status="ok", content=content, model=response.get("model") or self.cfg.model,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            cost_usd=float(response.get("_nexus_cost_usd") or 0.0), latency_s=latency, attempts=attempts,
            cached=cached, logprobs=logprobs, response=response)

    async def map(self, batch: list[list[dict[str, Any]]],
                  on_done: Callable[[int, Completion], Awaitable[None] | None] | None = None) -> list[Completion]:
        """Complete every message list of ``batch`` concurrently (bounded), results in input order."""
        async def one(i: int, messages: list[dict[str, Any]]) -> Completion:
            result = await self.complete(messages)
            if on_done is not None:
                maybe = on_done(i, result)
                if asyncio.iscoroutine(maybe):
                    await maybe
            return result

        return list(await asyncio.gather(*(one(i, m) for i, m in enumerate(batch))))

    def close(self) -> None:
        """Close the response cache."""
        self.cache.close()

    def map_sync(self, batch: list[list[dict[str, Any]]]) -> list[Completion]:
        """:meth:`map` from synchronous code (runs its own event loop; safe inside a Prefect task thread)."""
        return run_async(self.map(batch))


def run_async(coro: Awaitable[Any]) -> Any:
    """Run a coroutine to completion from sync code, even when the calling thread already has a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = asyncio.run(coro)  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            out["error"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]
