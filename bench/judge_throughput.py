"""Judge throughput against a local OpenAI-compatible server with a fixed latency per request.

The server (real HTTP on loopback, threaded) answers every request with a valid rubric verdict after
``LATENCY_S``; with ``c`` requests in flight its maximum is ``c / LATENCY_S`` verdicts per second. The
judge (nexus_core.evaluate.rubric.judge_llm → llm_client → litellm) runs N rows at each concurrency; we print the
verdicts/s, the fraction of that maximum, and the speed-up over the sequential baseline (concurrency 1).

    python -m bench.judge_throughput [--latency 0.1] [--rows 64]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("NEXUS_HOME", tempfile.mkdtemp(prefix="nexus-bench-"))
from nexus_core.settings import configure_environment  # noqa: E402

configure_environment()

from nexus_core.evaluate.rubric import KNOWN_DIMENSIONS, JudgeSettings, judge_llm, load_rubric  # noqa: E402
from tests.support.openai_stub import Reply, StubServer, chat_completion  # noqa: E402

VERDICT = json.dumps({d: 4 for d in KNOWN_DIMENSIONS} | {"rationale": "bench"})


def run(url: str, rows: int, concurrency: int) -> tuple[float, int]:
    """(seconds, ok verdicts) for judging ``rows`` items at ``concurrency``."""
    rubric = load_rubric("configs/eval/rubric.json")
    items = [{"question": f"q{i}", "answer": f"answer {i}", "reference": "ref"} for i in range(rows)]
    settings = JudgeSettings(model="openai/judge", api_base=url, max_concurrency=concurrency, cache=False,
                             max_retries=0, timeout_s=30)
    t0 = time.perf_counter()
    out = judge_llm(items, rubric, settings)
    return time.perf_counter() - t0, sum(o["status"] == "ok" for o in out)


def main() -> None:
    """Run the sweep and print the table."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.1, help="server latency per request, seconds")
    ap.add_argument("--rows", type=int, default=64, help="rows judged per concurrency level (baseline: rows/8)")
    ap.add_argument("--concurrency", default="1,4,8,16", help="comma-separated concurrency levels")
    args = ap.parse_args()
    with StubServer(lambda body, n: Reply(body=chat_completion(VERDICT), delay_s=args.latency)) as stub:
        run(stub.url, 2, 2)  # warm up litellm's client and imports
        levels = [int(c) for c in args.concurrency.split(",")]
        results = {}
        for c in levels:
            n = max(8, args.rows // 8) if c == 1 else args.rows  # the sequential baseline is slow by design
            secs, ok = run(stub.url, n, c)
            results[c] = (n, secs, ok)
    base_rate = results[levels[0]][2] / results[levels[0]][1]
    print(f"judge throughput, server latency {args.latency * 1000:.0f} ms/request, cache off")
    print(f"{'concurrency':>11} {'rows':>5} {'ok':>4} {'seconds':>8} {'verdicts/s':>11} {'max/s':>7} "
          f"{'of max':>7} {'vs c=' + str(levels[0]):>8}")
    for c, (n, secs, ok) in results.items():
        rate, ceiling = ok / secs, c / args.latency
        print(f"{c:>11} {n:>5} {ok:>4} {secs:>8.2f} {rate:>11.1f} {ceiling:>7.1f} {rate / ceiling:>7.0%} "
              f"{rate / base_rate:>7.1f}x")


if __name__ == "__main__":
    main()
