"""Orchestration overhead: the same 20-step pipeline of cheap steps as

  1. plain function calls (baseline),
  2. the spine without Prefect (manifest + MLflow run + catalog row per step),
  3. Nexus tasks in a Prefect flow, cold (every step executes),
  4. the same flow again, warm (every step Cached).

Run: ``make bench`` or ``python -m bench.orchestration``. Uses a throwaway NEXUS_HOME and data root.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

STEPS = 20


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="nexus-bench-"))
    os.environ["NEXUS_HOME"] = str(tmp / "home")
    os.environ["NEXUS_DATA"] = str(tmp / "data")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from nexus_core.settings import configure_environment

    configure_environment()
    from prefect import flow

    from bench.cheap_step import CheapConfig, CheapResult, run_cheap
    from nexus_core.context import StepContext
    from nexus_core.runner import run_step
    from tasks.common import nexus_task, run_context

    @nexus_task(run_cheap, name="cheap")
    def cheap(cfg: CheapConfig) -> CheapResult:
        return run_step(run_cheap, cfg, name=f"cheap{cfg.index}", context=run_context())

    @flow(name="bench-orchestration")
    def pipeline(seed: int) -> list[str]:
        return [cheap(CheapConfig(index=i + seed), return_state=True).name for i in range(STEPS)]

    def plain() -> None:
        for i in range(STEPS):
            out = tmp / "plain" / str(i)
            out.mkdir(parents=True, exist_ok=True)
            run_cheap(CheapConfig(index=i), inputs={}, out_uri=str(out), ctx=StepContext.detached(work_dir=out))

    def spine() -> None:
        for i in range(STEPS):
            run_step(run_cheap, CheapConfig(index=i + 1000), name=f"spine{i}")

    def timed(fn, *args) -> tuple[float, object]:
        t0 = time.perf_counter()
        out = fn(*args)
        return time.perf_counter() - t0, out

    plain()  # warm imports and the file system once
    pipeline(10_000)  # start the local Prefect API and MLflow store once, outside the timings
    t_plain, _ = timed(plain)
    t_spine, _ = timed(spine)
    t_cold, states_cold = timed(pipeline, 0)
    t_warm, states_warm = timed(pipeline, 0)
    assert set(states_cold) == {"Completed"}, states_cold
    assert set(states_warm) == {"Cached"}, states_warm

    rows = [
        ("plain function calls", t_plain),
        ("spine, no Prefect", t_spine),
        ("Nexus tasks, cold", t_cold),
        ("Nexus tasks, warm (cached)", t_warm),
    ]
    print(f"{STEPS}-step pipeline of cheap steps ({os.cpu_count()} CPU cores)")
    print(f"{'variant':<28} {'total s':>8} {'ms/step':>8} {'x plain':>8}")
    for name, t in rows:
        print(f"{name:<28} {t:>8.3f} {t / STEPS * 1000:>8.1f} {t / t_plain:>8.1f}")
    print(f"warm vs cold: {t_warm / t_cold:.2f}x the time")


if __name__ == "__main__":
    main()
