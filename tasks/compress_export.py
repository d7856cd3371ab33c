"""Task: export a model (merged safetensors, ONNX with parity check, TensorRT / Core ML where installed)."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.compress.export import ExportConfig, ExportResult, run_export
from nexus_core.runner import run_step
from tasks.common import nexus_task, run_context


@nexus_task(run_export, name="compress-export")
def export(cfg: ExportConfig, model: ArtifactRef, name: str = "export") -> ExportResult:
    """Export ``model`` into ``compress/<name>_vN``."""
    return run_step(run_export, cfg, name=name, inputs={"model": model}, context=run_context())
