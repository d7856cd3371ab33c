"""Tiny SVD: build a small ``StableVideoDiffusionPipeline`` from config, as a model artifact.

Used by the tiny recipe so precompute, projector training and render all run the real
``from_pretrained`` path on CPU. Real runs name ``pipeline.pretrained_model_name_or_path`` instead.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from nexus_core.artifacts import ArtifactRef
from nexus_core.config import NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import step
from nexus_core.runner import StepResult
from nexus_core.videogen import svd


class TinySVDStepConfig(NexusModel):
    """Shape of the tiny pipeline."""

    tiny: svd.TinySVDConfig = Field(default_factory=svd.TinySVDConfig, description="Component sizes")


class TinySVDResult(StepResult):
    """What was built."""

    unet_parameters: int
    vae_parameters: int
    image_encoder_parameters: int
    cross_attention_dim: int


@step(area="models", kind="model")
def run_tiny_svd(cfg: TinySVDStepConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                 ctx: StepContext) -> TinySVDResult:
    """Write a diffusers SVD pipeline directory (model_index.json + components) to ``out_uri``."""
    svd.build_tiny_svd(Path(out_uri), cfg.tiny)
    pipe = svd.load_svd(out_uri)  # prove the from_pretrained path works before publishing

    def count(m) -> int:  # noqa: ANN001
        return sum(p.numel() for p in m.parameters())

    u, v, e = count(pipe.unet), count(pipe.vae), count(pipe.image_encoder)
    return TinySVDResult(unet_parameters=u, vae_parameters=v, image_encoder_parameters=e,
                         cross_attention_dim=pipe.unet.config.cross_attention_dim,
                         metrics={"unet_parameters": u, "vae_parameters": v})
