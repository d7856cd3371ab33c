"""Task: package kept rows as an SFT dataset (Parquet, JSONL, HF datasets)."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.distill.package import PackageConfig, PackageResult, run_sft_package
from nexus_core.runner import run_step
from tasks.common import nexus_task, run_context


@nexus_task(run_sft_package, name="distill-package")
def sft_package(cfg: PackageConfig, regenerated: ArtifactRef, rereviewed: ArtifactRef | None = None,
                name: str = "sft") -> PackageResult:
    """Write the SFT dataset ``distill/<name>_vN`` (``rereviewed``: the second review of regenerated rows)."""
    return run_step(run_sft_package, cfg, name=name, inputs={"regenerated": regenerated, "rereviewed": rereviewed},
                    context=run_context())
