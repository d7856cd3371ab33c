"""Tiny pipeline: build a small Klein-compatible Flux.2 pipeline from config, as a model artifact.

Used by the tiny preset so prepare (class-image generation), precompute and train all run the real
``from_pretrained`` path on CPU. Real runs name ``pipeline.pretrained_model_name_or_path`` instead.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from nexus_core.artifacts import ArtifactRef
from nexus_core.config import NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import step
from nexus_core.models.flux_tiny import TinyFluxConfig, build_tiny_flux, load_flux_pipeline
from nexus_core.runner import StepResult


class TinyPipelineConfig(NexusModel):
    """Shape of the tiny pipeline and the texts its tokenizer is trained on."""

    tiny: TinyFluxConfig = Field(default_factory=TinyFluxConfig, description="Component sizes")
    corpus: list[str] = Field(default_factory=list, description="Extra texts for the tokenizer (prompts)")


class TinyPipelineResult(StepResult):
    """What was built."""

    transformer_parameters: int
    text_encoder_parameters: int
    vae_parameters: int
    latent_channels: int


@step(area="models", kind="model")
def run_tiny_pipeline(cfg: TinyPipelineConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                      ctx: StepContext) -> TinyPipelineResult:
    """Write a diffusers pipeline directory (model_index.json + components) to ``out_uri``."""
    build_tiny_flux(Path(out_uri), cfg.corpus, cfg.tiny)
    pipe = load_flux_pipeline(out_uri)  # prove the from_pretrained path works before publishing

    def count(m) -> int:  # noqa: ANN001
        return sum(p.numel() for p in m.parameters())

    t, e, v = count(pipe.transformer), count(pipe.text_encoder), count(pipe.vae)
    return TinyPipelineResult(transformer_parameters=t, text_encoder_parameters=e, vae_parameters=v,
                              latent_channels=pipe.transformer.config.in_channels,
                              metrics={"transformer_parameters": t, "text_encoder_parameters": e})
