"""Stable Video Diffusion pieces the video-generation steps share: the tiny pipeline, loading, EDM.

How ``StableVideoDiffusionPipeline`` conditions its ``UNetSpatioTemporalConditionModel`` (diffusers 0.39):

* ``encoder_hidden_states``: the CLIP image embedding of the first frame (``image_embeds`` of
  ``CLIPVisionModelWithProjection``, one token ``(1, projection_dim)``; ``projection_dim`` equals the
  UNet's ``cross_attention_dim``). Classifier-free guidance's negative is zeros.
* ``image_latents``: the VAE encoder's ``latent_dist.mode()`` of the first frame after
  ``noise_aug_strength`` x Gaussian noise, **not** scaled by ``scaling_factor``, repeated for every
  frame and concatenated to the (scaled) noisy latents on the channel axis (UNet ``in_channels`` =
  2 x latent channels). The negative is zeros.
* ``added_time_ids``: ``[fps - 1, motion_bucket_id, noise_aug_strength]``.
* The scheduler is ``EulerDiscreteScheduler`` with ``prediction_type: v_prediction``,
  ``timestep_type: continuous`` and Karras sigmas: EDM with sigma_data = 1, so for noise level s the
  UNet gets ``x / sqrt(s^2 + 1)`` (c_in) at timestep ``0.25 ln s`` (c_noise), and the denoised
  sample is ``c_skip x + c_out F`` with ``c_skip = 1 / (s^2 + 1)``, ``c_out = -s / sqrt(s^2 + 1)``.
  :func:`edm_loss` trains with exactly that, sigmas log-normal(``p_mean``, ``p_std``) and weight
  ``1 / c_out^2 = (s^2 + 1) / s^2`` (the community SVD fine-tuning recipe); a test checks the
  coefficients against ``scheduler.scale_model_input`` / ``scheduler.step``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from nexus_core.config import NexusModel
from nexus_core.errors import InputError

# SVD img2vid-xt's scheduler_config.json (the tiny pipeline gets the same schedule)
SVD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                 "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "v_prediction",
                 "sigma_max": 700.0, "sigma_min": 0.002, "steps_offset": 1, "timestep_spacing": "leading",
                 "timestep_type": "continuous", "use_karras_sigmas": True}


class TinySVDConfig(NexusModel):
    """Shape of a tiny Stable Video Diffusion pipeline built from config (random weights)."""

    unet_channels: list[int] = Field(default=[32, 64], min_length=2, description="UNet block widths (multiples of 32)")
    vae_channels: list[int] = Field(default=[32, 64, 64], min_length=1, description="VAE block widths (multiples of "
                                    "32); the latent is 2^(len-1) times smaller than the frame")
    latent_channels: int = Field(default=4, ge=1, description="VAE latent channels")
    cross_attention_dim: int = Field(default=24, ge=2, description="UNet cross-attention width = CLIP projection_dim")
    num_frames: int = Field(default=8, ge=1, description="Frames the UNet is configured for (unet.config.num_frames)")
    image_size: int = Field(default=32, ge=8, description="CLIP image encoder input size")
    seed: int = Field(default=0, description="Seed for weight initialisation")


def build_tiny_svd(out: Path, cfg: TinySVDConfig) -> Path:
    """Write a ``StableVideoDiffusionPipeline`` directory (``save_pretrained``) with tiny components."""
    import torch
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(cfg.seed)
    n = len(cfg.unet_channels)
    unet = UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=2 * cfg.latent_channels, out_channels=cfg.latent_channels,
        down_block_types=("CrossAttnDownBlockSpatioTemporal",) * (n - 1) + ("DownBlockSpatioTemporal",),
        up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * (n - 1),
        block_out_channels=tuple(cfg.unet_channels), layers_per_block=1, addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=3 * 8, cross_attention_dim=cfg.cross_attention_dim,
        num_attention_heads=tuple(max(1, c // 16) for c in cfg.unet_channels), num_frames=cfg.num_frames)
    vae = AutoencoderKLTemporalDecoder(  # diffusers annotates these as 1-tuples; any length works
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),  # pyright: ignore[reportArgumentType]
        block_out_channels=tuple(cfg.vae_channels),  # pyright: ignore[reportArgumentType]
        layers_per_block=1, latent_channels=cfg.latent_channels)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, projection_dim=cfg.cross_attention_dim, num_hidden_layers=1,
        num_attention_heads=2, image_size=cfg.image_size, patch_size=8))
    pipe = StableVideoDiffusionPipeline(
        vae=vae, image_encoder=encoder, unet=unet, scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER),
        feature_extractor=CLIPImageProcessor(crop_size={"height": cfg.image_size, "width": cfg.image_size},
                                             size={"shortest_edge": cfg.image_size}))
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def check_pipeline_dir(path: str) -> None:
    """A local path must be a diffusers directory of an SVD pipeline (hub ids load as they are)."""
    import json

    p = Path(path)
    if not p.exists():
        return
    index = p / "model_index.json"
    if not index.is_file():
        raise InputError(f"{p}: not a diffusers pipeline directory (no model_index.json)")
    cls = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    if cls != "StableVideoDiffusionPipeline":
        raise InputError(f"{index}: _class_name is {cls!r}, not StableVideoDiffusionPipeline")


def load_svd(path: str, dtype: str = "float32", image_encoder: bool = True) -> Any:
    """The SVD pipeline (without its CLIP image encoder when ``image_encoder`` is false: the projector
    replaces it at render time)."""
    import torch
    from diffusers import StableVideoDiffusionPipeline

    check_pipeline_dir(path)
    extra: dict[str, Any] = {} if image_encoder else {"image_encoder": None, "feature_extractor": None}
    pipe = StableVideoDiffusionPipeline.from_pretrained(path, torch_dtype=getattr(torch, dtype), **extra)
    pipe.set_progress_bar_config(disable=True)
    check_scheduler(pipe.scheduler.config, path)
    return pipe


def check_scheduler(config: Any, where: str) -> None:
    """The EDM formulas here hold for SVD's v-prediction, continuous-timestep Euler schedule only."""
    pred, kind = config.get("prediction_type"), config.get("timestep_type")
    if (pred, kind) != ("v_prediction", "continuous"):
        raise InputError(f"{where}: scheduler has prediction_type={pred!r}, timestep_type={kind!r}; SVD training "
                         "here needs v_prediction with continuous timesteps")


def edm_coefficients(sigma: Any) -> tuple[Any, Any, Any, Any]:
    """(c_skip, c_out, c_in, c_noise) of SVD's EDM parametrisation (sigma_data = 1) for noise levels ``sigma``."""
    s2 = sigma ** 2 + 1
    return 1 / s2, -sigma / s2 ** 0.5, 1 / s2 ** 0.5, 0.25 * sigma.log()


def sample_sigmas(n: int, p_mean: float, p_std: float, generator: Any) -> Any:
    """``n`` log-normal noise levels (EDM training distribution)."""
    import torch

    return (p_mean + p_std * torch.randn(n, generator=generator)).exp()


def time_ids(fps: int, motion_bucket_id: int, noise_aug_strength: float, n: int) -> Any:
    """``added_time_ids`` as the pipeline builds them (SVD was micro-conditioned on fps - 1)."""
    import torch

    return torch.tensor([[fps - 1, motion_bucket_id, noise_aug_strength]], dtype=torch.float32).repeat(n, 1)


def edm_loss(unet: Any, x0: Any, cond_latents: Any, embeds: Any, added_time_ids: Any, sigma: Any,
             noise: Any) -> Any:
    """Per-sample weighted denoising loss of the (frozen) UNet: ``x0`` ``(B, F, C, h, w)`` scaled video
    latents, ``cond_latents`` ``(B, C, h, w)`` unscaled first-frame latents, ``embeds`` ``(B, 1, D)``."""
    import torch

    dtype = next(unet.parameters()).dtype
    s = sigma.view(-1, 1, 1, 1, 1)
    c_skip, c_out, c_in, c_noise = edm_coefficients(s)
    noisy = x0 + noise * s
    cond = cond_latents.unsqueeze(1).expand(-1, x0.shape[1], -1, -1, -1)
    inp = torch.cat([c_in * noisy, cond], dim=2)
    out = unet(inp.to(dtype), c_noise.flatten().to(dtype), encoder_hidden_states=embeds.to(dtype),
               added_time_ids=added_time_ids.to(dtype), return_dict=False)[0].float()
    denoised = c_skip * noisy + c_out * out
    weight = (s ** 2 + 1) / s ** 2
    return (weight * (denoised - x0) ** 2).mean(dim=(1, 2, 3, 4))

