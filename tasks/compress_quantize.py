"""Task: quantize a model (INT8 dynamic / static / mixed, NF4 on GPU)."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.compress.quantize import QuantizeConfig, QuantizeResult, run_quantize
from nexus_core.runner import run_step
from tasks.common import nexus_task, run_context


@nexus_task(run_quantize, name="compress-quantize")
def quantize(cfg: QuantizeConfig, model: ArtifactRef, calibration: ArtifactRef | None = None,
             name: str = "quantized") -> QuantizeResult:
    """Quantize ``model`` into ``compress/<name>_vN`` (calibration needed for int8_static and mixed)."""
    return run_step(run_quantize, cfg, name=name, inputs={"model": model, "calibration": calibration},
                    context=run_context())
