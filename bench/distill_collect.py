"""Teacher collection throughput: achieved req/s vs the server's maximum, and vs a sequential loop.

A local OpenAI-compatible stub answers every request after a fixed latency and serves at most
``cap`` requests at once, so its maximum is ``cap / latency`` req/s. The client runs with
``max_concurrency = cap`` (the real async litellm path, cache off).   python -m bench.distill_collect
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


def main(n: int = 400, latency: float = 0.05, cap: int = 8, n_seq: int = 40) -> None:
    """Print achieved req/s, the ratio to the server max (target >= 0.8) and to a sequential loop."""
    import litellm

    from nexus_core.llm_client import LLMClient, LLMConfig, ResponseCache

    server_max = cap / latency
    with served(latency, cap) as url:
        cfg = LLMConfig(model="openai/bench", api_base=url, max_concurrency=cap, cache=False, max_retries=0)
        client = LLMClient(cfg, ResponseCache(enabled=False))
        client.map_sync([[{"role": "user", "content": "warm-up"}]])
        batch = [[{"role": "user", "content": f"q{i}"}] for i in range(n)]
        t0 = time.perf_counter()
        out = client.map_sync(batch)
        conc = n / (time.perf_counter() - t0)
        ok = sum(c.status == "ok" for c in out)
        t0 = time.perf_counter()
        for i in range(n_seq):
            litellm.completion(model="openai/bench", api_base=url, api_key="x",
                               messages=[{"role": "user", "content": f"s{i}"}])
        seq = n_seq / (time.perf_counter() - t0)
    print(f"server max (cap {cap} / latency {latency * 1000:.0f} ms): {server_max:8.1f} req/s")
    print(f"nexus LLMClient, concurrency {cap}, {n} requests ({ok} ok): {conc:8.1f} req/s"
          f"   ratio vs server max: {conc / server_max:.2f} (target >= 0.8)")
    print(f"sequential litellm.completion loop, {n_seq} requests:      {seq:8.1f} req/s"
          f"   speed-up of LLMClient: {conc / seq:.1f}x")


if __name__ == "__main__":
    # a fast server (client CPU bound), then one with a teacher-like latency at higher concurrency
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    main(n, latency=0.05, cap=8)
    main(4 * n, latency=0.5, cap=32, n_seq=4)
