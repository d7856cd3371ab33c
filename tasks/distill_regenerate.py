"""Task: regenerate rejected rows with a stricter prompt."""

from __future__ import annotations

from pathlib import Path

from nexus_core.artifacts import ArtifactRef
from nexus_core.distill_lib import template_texts
from nexus_core.runner import run_step
from nexus_core.steps.distill.regenerate import RegenerateConfig, RegenerateResult, run_regenerate
from tasks.common import nexus_task, run_context


def _sources(params: dict) -> list[str]:
    cfg: RegenerateConfig = params["cfg"]
    rules = Path(cfg.rules)
    return [*template_texts(cfg.prompts_dir, [cfg.template]),
            *([rules.read_text(encoding="utf-8")] if rules.is_file() else [])]


@nexus_task(run_regenerate, name="distill-regenerate", extra_sources=_sources, retries=1, retry_delay_seconds=5)
def regenerate(cfg: RegenerateConfig, reviewed: ArtifactRef, name: str = "regenerated") -> RegenerateResult:
    """Regenerate and re-filter rejected rows into ``distill/<name>_vN``."""
    return run_step(run_regenerate, cfg, area="distill", name=name, inputs={"reviewed": reviewed},
                    context=run_context(), extra_sources=tuple(_sources({"cfg": cfg})))
