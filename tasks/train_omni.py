"""Task: the omni conversion (text LLM + vision or audio encoder + projector)."""

from __future__ import annotations

from nexus_core.artifacts import ArtifactRef
from nexus_core.runner import run_step
from nexus_core.train.omni import OmniConfig, OmniResult, run_omni
from tasks.common import nexus_task, run_context


@nexus_task(run_omni, name="train-omni")
def train_omni(cfg: OmniConfig, model: ArtifactRef, vision: ArtifactRef | None = None,
               name: str = "omni", audio: ArtifactRef | None = None) -> OmniResult:
    """Compose ``model`` with the vision encoder (``vision_ref(cfg)``; None for a tiny one), or the
    audio encoder (``audio_ref(cfg)``), into ``train/<name>_vN``."""
    return run_step(run_omni, cfg, name=name, inputs={"model": model, "vision": vision, "audio": audio},
                    context=run_context())
