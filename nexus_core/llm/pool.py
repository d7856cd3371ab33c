"""Teacher calls spread over worker processes, for when one process's CPU is the bottleneck.

litellm spends about 8-10 ms of CPU per request in Python (building the request, parsing the
response, its own logging and pricing), so one event loop tops out near 100-125 requests/s on
these machines whatever the concurrency. A fast teacher (a local vLLM server, a provider with a
high rate limit) can answer more. ``teacher.processes: N`` runs N clients, each with its own event
loop in its own process. They share one :class:`~nexus_core.llm.client.Limits` (so the cost cap
and ``rpm`` hold for the pool as a whole) and the one SQLite response cache (WAL mode, a commit
per response), so a killed run still resumes with nothing asked twice.

Each worker pays litellm's import (a few seconds) once: worth it for thousands of rows, not ten.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from nexus_core.llm.client import Completion, Limits, LLMClient, LLMConfig

_worker: tuple[LLMClient, asyncio.AbstractEventLoop] | None = None


def _init_worker(cfg: LLMConfig, limits: Limits) -> None:
    """Runs once in each worker: one client and one event loop kept for the worker's life."""
    global _worker
    from nexus_core.settings import configure_environment

    configure_environment()
    _worker = (LLMClient(cfg, limits=limits), asyncio.new_event_loop())


def _complete_chunk(requests: list[list[dict[str, Any]]]) -> list[Completion]:
    assert _worker is not None, "worker not initialised"
    client, loop = _worker
    done = loop.run_until_complete(client.map(requests))
    for c in done:
        c.response = None  # the parent uses the parsed fields only; the raw body is in the cache
    return done


class ClientPool:
    """``processes`` worker processes; ``cfg.max_concurrency`` is split between them."""

    def __init__(self, cfg: LLMConfig, processes: int):
        self.processes = processes
        self.limits = Limits(shared=True)
        per_worker = cfg.model_copy(update={"max_concurrency": math.ceil(cfg.max_concurrency / processes)})
        self._executor = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(per_worker, self.limits))

    @property
    def spent_usd(self) -> float:
        """USD paid by every worker so far."""
        return self.limits.spent_usd

    async def map(self, batch: list[list[dict[str, Any]]],
                  on_done: Callable[[int, Completion], Awaitable[None] | None] | None = None) -> list[Completion]:
        """Complete every message list of ``batch``: one contiguous chunk per worker, results in input order.
        ``on_done(i, completion)`` is called for each row of a chunk as that chunk finishes."""
        size = math.ceil(len(batch) / self.processes) or 1
        loop = asyncio.get_running_loop()

        async def run(start: int) -> list[Completion]:
            part = await loop.run_in_executor(self._executor, _complete_chunk, batch[start:start + size])
            for j, c in enumerate(part):
                if on_done is not None and asyncio.iscoroutine(maybe := on_done(start + j, c)):
                    await maybe
            return part

        parts = await asyncio.gather(*(run(i) for i in range(0, len(batch), size)))
        return [c for part in parts for c in part]

    def close(self) -> None:
        """Stop the workers (waits for chunks in flight)."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
