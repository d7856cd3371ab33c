"""Teacher collection throughput: achieved req/s vs the server's maximum, and vs a sequential loop.

A local OpenAI-compatible stub (its own process) answers every request after a fixed latency and
serves at most ``cap`` requests at once; more wait in its queue, as on a real server. Its maximum is
``cap / latency`` req/s. Rows: the real async litellm client (cache off) with ``max_concurrency``
equal to the cap (the server never queues: every client-side millisecond idles a server slot) and
twice the cap (a request always waiting), then the same over worker processes (``ClientPool``,
what ``teacher.processes`` uses), then a plain sequential ``litellm.completion`` loop.

    python -m bench.distill_collect [N]
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

os.environ.setdefault("NEXUS_HOME", tempfile.mkdtemp(prefix="nexus-bench-"))
from nexus_core.settings import configure_environment  # noqa: E402

configure_environment()


def _serve(latency: float, cap: int, urls) -> None:  # noqa: ANN001 - a multiprocessing queue
    """The stub server, in its own process so its Python work does not share the client's GIL."""
    from tests.support.openai_stub import Reply, StubServer, chat_completion

    gate = threading.Semaphore(cap)

    def handler(body, i):  # noqa: ANN001, ANN202
        with gate:  # the server's concurrency cap
            time.sleep(latency)
        return Reply(body=chat_completion("answer " + str(i)))

    with StubServer(handler) as stub:
        urls.put(stub.url)
        threading.Event().wait()


@contextmanager
def served(latency: float, cap: int) -> Iterator[str]:
    """Run the stub in a child process; yield its base URL."""
    urls = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_serve, args=(latency, cap, urls), daemon=True)
    proc.start()
    try:
        yield urls.get(timeout=60)
    finally:
        proc.terminate()


def _rate(client, n: int, tag: str) -> tuple[float, float, int]:  # noqa: ANN001 - LLMClient or ClientPool
    """(req/s, client CPU ms per request in this process, ok count) for ``n`` requests through ``client.map``."""
    from nexus_core.llm.client import run_async

    run_async(client.map([[{"role": "user", "content": f"warm-up {tag} {i}"}] for i in range(16)]))
    batch = [[{"role": "user", "content": f"{tag} q{i}"}] for i in range(n)]
    t0, c0 = time.perf_counter(), time.process_time()
    out = run_async(client.map(batch))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return n / wall, 1000 * cpu / n, sum(c.status == "ok" for c in out)


def main(n: int = 400, latency: float = 0.05, cap: int = 8, n_seq: int = 40, processes: int = 2) -> None:
    """Print achieved req/s and its ratio to the server max (target >= 0.8) and to a sequential loop."""
    import litellm

    from nexus_core.llm.client import LLMClient, LLMConfig, ResponseCache
    from nexus_core.llm.pool import ClientPool

    server_max = cap / latency
    print(f"server: latency {latency * 1000:.0f} ms, at most {cap} at once (more wait in its queue) "
          f"-> max {server_max:.1f} req/s; {n} requests per row")
    with served(latency, cap) as url:
        def cfg(concurrency: int) -> LLMConfig:
            return LLMConfig(model="openai/bench", api_base=url, max_concurrency=concurrency, cache=False,
                             max_retries=0)

        runs = []
        for concurrency in (cap, 2 * cap):
            rate, cpu, ok = _rate(LLMClient(cfg(concurrency), ResponseCache(enabled=False)), n, f"c{concurrency}")
            runs.append((f"LLMClient, 1 process, concurrency {concurrency}", rate, ok, f"{cpu:.1f} ms CPU/req"))
        for concurrency in (cap, 2 * cap) if processes > 1 else ():
            with ClientPool(cfg(concurrency), processes) as pool:
                rate, _, ok = _rate(pool, n, f"pool{concurrency}")
            runs.append((f"ClientPool, {processes} processes, concurrency {concurrency}", rate, ok, ""))
        t0 = time.perf_counter()
        for i in range(n_seq):
            litellm.completion(model="openai/bench", api_base=url, api_key="x",
                               messages=[{"role": "user", "content": f"s{i}"}])
        seq = n_seq / (time.perf_counter() - t0)
    for label, rate, ok, extra in runs:
        print(f"  {label:42s} {rate:7.1f} req/s  ratio vs server max {rate / server_max:.2f} (target >= 0.8)"
              f"  x{rate / seq:.1f} sequential  {ok}/{n} ok  {extra}")
    print(f"  {'sequential litellm.completion loop':42s} {seq:7.1f} req/s  ({n_seq} requests)")


if __name__ == "__main__":
    # a fast server (the client's CPU is the limit), then a teacher-like latency at higher concurrency
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    main(n, latency=0.05, cap=8)
    main(4 * n, latency=0.5, cap=32, n_seq=4, processes=1)
