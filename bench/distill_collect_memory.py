"""Teacher collection memory: RSS of the collect step as the input grows 4x, and over the run.

Each size runs in a fresh process: a teacher-inputs table of N rows → ``run_teacher_collect`` (the
real step: pyarrow batches in, ParquetWriter out, async litellm client) against a local
OpenAI-compatible server in its own process answering 8 KB per row. A thread samples the process's
RSS every 0.2 s. If rows were held in memory, RSS would climb through the run and 4x the rows would
add about 3x more; batching keeps it flat once the first batches have warmed the allocator.

    python -m bench.distill_collect_memory [ROWS]   (default 1000, then 4x)
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ANSWER = "We measure respiration in randomised plots and compare drought cycles. " * 110  # ~8 KB


def _serve(urls) -> None:  # noqa: ANN001 - a multiprocessing queue
    from tests.support.openai_stub import Reply, StubServer, chat_completion

    with StubServer(lambda body, i: Reply(body=chat_completion(ANSWER))) as stub:
        urls.put(stub.url)
        threading.Event().wait()


def child(rows: int, url: str) -> None:
    """Run the collect step on ``rows`` rows; print the peak RSS growth in MB as JSON."""
    tmp = Path(tempfile.mkdtemp(prefix="nexus-mem-"))
    os.environ.update(NEXUS_HOME=str(tmp / "home"), NEXUS_DATA=str(tmp / "data"))
    from nexus_core.settings import configure_environment

    configure_environment()
    import polars as pl

    from nexus_core.artifacts import raw_ref
    from nexus_core.context import StepContext
    from nexus_core.distill.collect import CollectConfig, run_teacher_collect
    from nexus_core.distill.prompts import TeacherConfig
    from tests.support.distill_teacher import write_teacher_inputs

    inputs = write_teacher_inputs(tmp / "inputs", [f"Question {i} about soil." for i in range(rows)])
    cfg = CollectConfig(batch_size=256, teacher=TeacherConfig(model="openai/bench", api_base=url, cache=False,
                                                              max_concurrency=16, max_retries=0))
    warm = tmp / "warm"
    warm.mkdir()
    small = tmp / "small"
    small.mkdir()
    pl.read_parquet(inputs / "data.parquet").head(32).write_parquet(small / "data.parquet")
    run_teacher_collect(cfg, inputs={"teacher_inputs": raw_ref(small)}, out_uri=str(warm),
                        ctx=StepContext.detached())  # imports, pools
    base = _rss_mb()
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            samples.append(_rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = tmp / "out"
    out.mkdir()
    t0 = time.perf_counter()
    res = run_teacher_collect(cfg, inputs={"teacher_inputs": raw_ref(inputs)}, out_uri=str(out),
                              ctx=StepContext.detached())
    done.set()
    sampler.join()
    # rows go through at a steady rate, so quarters of the run's time are quarters of its rows
    quarters = [max(samples[len(samples) * q // 4: len(samples) * (q + 1) // 4] or [base]) for q in range(4)]
    print(json.dumps({"rows": rows, "ok": res.ok, "base_mb": base, "peak_mb": max(samples or [base]),
                      "quarters_mb": quarters, "seconds": time.perf_counter() - t0,
                      "output_mb": (out / "data.parquet").stat().st_size / 2**20}))


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def main(rows: int = 1000) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    urls = ctx.Queue()
    server = ctx.Process(target=_serve, args=(urls,), daemon=True)
    server.start()
    try:
        url = urls.get(timeout=60)
        results = []
        for n in (rows, 4 * rows):
            out = subprocess.run([sys.executable, "-m", "bench.distill_collect_memory", "--child", str(n), url],
                                 capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        server.terminate()
    for r in results:
        print(f"{r['rows']:>6} rows ({r['ok']} ok, {r['output_mb']:.1f} MB of responses written, {r['seconds']:.0f} s): "
              f"RSS {r['base_mb']:.0f} MB before, peak {r['peak_mb']:.0f} MB (+{r['peak_mb'] - r['base_mb']:.1f} MB); "
              "peak per quarter of the rows: " + " / ".join(f"{q:.0f}" for q in r["quarters_mb"]) + " MB")
    a, b = results
    held = (b["rows"] - a["rows"]) * len(ANSWER) / 2**20
    grow = lambda r: r["peak_mb"] - r["base_mb"]  # noqa: E731
    print(f"4x the rows: peak growth {grow(b):.1f} MB vs {grow(a):.1f} MB; over the last three quarters of the "
          f"{b['rows']}-row run RSS moved {max(b['quarters_mb'][1:]) - b['quarters_mb'][0]:+.1f} MB "
          f"(holding every response would add ~{held:.0f} MB more)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(int(sys.argv[2]), sys.argv[3])
    else:
        main(*(int(a) for a in sys.argv[1:2]))
