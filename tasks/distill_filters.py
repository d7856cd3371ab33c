"""Task: rule-based filters and quality gates."""

from __future__ import annotations

from pathlib import Path

from nexus_core.artifacts import ArtifactRef
from nexus_core.runner import run_step
from nexus_core.steps.distill.filters import FiltersConfig, FiltersResult, run_distill_filters
from tasks.common import nexus_task, run_context


def _rules(params: dict) -> list[str]:
    path = Path(params["cfg"].rules)
    return [path.read_text(encoding="utf-8")] if path.is_file() else []


@nexus_task(run_distill_filters, name="distill-filters", extra_sources=_rules)
def distill_filters(cfg: FiltersConfig, collected: ArtifactRef, name: str = "filtered") -> FiltersResult:
    """Filter the collected rows into ``distill/<name>_vN`` (every row kept, with keep + reasons)."""
    return run_step(run_distill_filters, cfg, area="distill", name=name, inputs={"collected": collected},
                    context=run_context(), extra_sources=tuple(_rules({"cfg": cfg})))
