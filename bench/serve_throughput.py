"""Server throughput: tokens/s with 1, 4 and 16 concurrent clients vs a single-request loop.

    python -m bench.serve_throughput [--requests 32 --max-tokens 32]

Serves a small Llama with the project's OpenAI-compatible server on loopback (real HTTP, real
batching) and drives it with httpx. The baseline sends the same requests one after another;
each concurrent run keeps N requests in flight, so the server can batch them into one generate call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


async def _drive(url: str, n_requests: int, clients: int, max_tokens: int) -> tuple[int, float]:
    import httpx

    body = {"model": "bench", "prompt": "The results of the experiment show that", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(i)
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            queue.get_nowait()
            r = await http.post(f"{url}/completions", json=body)
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=300) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(http) for _ in range(clients)])
        return tokens, time.perf_counter() - t0


def main() -> None:
    """Run the benchmark and print the table."""
    import httpx
    import torch

    from nexus_core.models.tiny import TinyLLMConfig, build_tiny_llm
    from nexus_core.serve import serve_in_thread
    from nexus_core.serve.app import create_app

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    texts = [json.loads(line)["text"] for line in (REPO / "data/raw/scientific/abstracts.jsonl").open()]
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_llm(Path(tmp) / "m", texts, TinyLLMConfig(vocab_size=1024, hidden_size=args.hidden,
                                                                     intermediate_size=4 * args.hidden,
                                                                     num_hidden_layers=4, num_attention_heads=8,
                                                                     num_key_value_heads=4))
        app = create_app({"bench": str(path)}, max_batch_size=16)
        with serve_in_thread(app) as url:
            # Baseline: one request at a time from a plain loop.
            body = {"model": "bench", "prompt": "The results of the experiment show that",
                    "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
            httpx.post(f"{url}/completions", json=body, timeout=300)  # warm-up
            t0, tokens = time.perf_counter(), 0
            for _ in range(args.requests):
                tokens += httpx.post(f"{url}/completions", json=body, timeout=300).json()["usage"]["completion_tokens"]
            base_tps = tokens / (time.perf_counter() - t0)
            results = [("single-request loop", base_tps)]
            for clients in (1, 4, 16):
                toks, secs = asyncio.run(_drive(url, args.requests, clients, args.max_tokens))
                results.append((f"{clients} concurrent client(s)", toks / secs))
        app.state.close()
    print(f"model: llama hidden={args.hidden} layers=4, {args.requests} requests x {args.max_tokens} tokens, "
          f"torch threads={args.threads}")
    print(f"{'mode':<28}{'tokens/s':>12}{'vs loop':>10}")
    for name, tps in results:
        print(f"{name:<28}{tps:>12.1f}{tps / base_tps:>10.2f}")


if __name__ == "__main__":
    main()
