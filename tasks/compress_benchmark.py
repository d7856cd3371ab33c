"""Task: benchmark the base model and its compressed variants side by side."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.compress.benchmark import BenchmarkConfig, BenchmarkResult, run_benchmark
from nexus_core.runner import run_step
from tasks.common import nexus_task, run_context


@nexus_task(run_benchmark, name="compress-benchmark", gpu=True)
def benchmark(cfg: BenchmarkConfig, base: ArtifactRef, variants: dict[str, ArtifactRef],
              heldout: ArtifactRef | None = None, name: str = "benchmark") -> BenchmarkResult:
    """Measure ``base`` and each of ``variants`` into the report ``compress/<name>_vN``."""
    if {"base", "heldout"} & set(variants):
        raise ValueError("variant names 'base' and 'heldout' are reserved")
    return run_step(run_benchmark, cfg, name=name, inputs={"base": base, **variants, "heldout": heldout},
                    context=run_context())
