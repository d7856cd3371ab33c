"""Task: rule-based filters and quality gates."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.distill.filters import FiltersConfig, FiltersResult, run_distill_filters
from nexus_core.runner import run_step
from tasks.common import nexus_task, run_context


@nexus_task(run_distill_filters, name="distill-filters")
def distill_filters(cfg: FiltersConfig, collected: ArtifactRef, name: str = "filtered") -> FiltersResult:
    """Filter the collected rows into ``distill/<name>_vN`` (every row kept, with keep + reasons)."""
    return run_step(run_distill_filters, cfg, name=name, inputs={"collected": collected},
                    context=run_context())
