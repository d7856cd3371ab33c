"""Task: choose the variant to release and register it in the MLflow model registry."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.compress.release import ReleaseConfig, ReleaseResult, run_release
from nexus_core.runner import run_step
from tasks.common import nexus_task, run_context


@nexus_task(run_release, name="compress-release")
def release(cfg: ReleaseConfig, benchmark: ArtifactRef, models: dict[str, ArtifactRef],
            heldout: ArtifactRef | None, calibration: ArtifactRef | None = None,
            name: str = "release") -> ReleaseResult:
    """Release one of ``models`` (keys as in the benchmark table) per the policy in ``cfg``, after checking
    that ``heldout`` is the benchmark's held-out set and shares no row with ``calibration`` or the
    calibration/recovery data in the variants' lineage."""
    return run_step(run_release, cfg, name=name, context=run_context(),
                    inputs={"benchmark": benchmark, **models, "heldout": heldout, "calibration": calibration})
