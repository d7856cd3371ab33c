"""LLM → Stable Video Diffusion conditioning projector, and the text-to-video sampler.

SVD is image-to-video: it reads one CLIP image embedding (one token, ``cross_attention_dim`` wide) and
the VAE latent of a first frame (see :mod:`nexus_core.videogen.svd`). For text-to-video a frozen
causal LM reads the prompt (its chat template when it has one, right-padded/truncated to
``max_sequence_length`` tokens); the hidden states of ``llm_layers`` are concatenated per token and
mean-pooled over the real (non-padding) tokens, then two heads map the pooled vector:

* the **embedding head** (LayerNorm → Linear → GELU → Linear) → ``(1, cross_attention_dim)``, in place
  of the CLIP image embedding of the first frame;
* the **first-frame head** (``first_frame: predicted``; same shape of MLP) → the unscaled first-frame
  latent ``(C, h, w)`` the pipeline would get from ``vae.encode(image).latent_dist.mode()``. With
  ``first_frame: zeros`` there is no such head and the first-frame latent is zeros, which is SVD's own
  "no image" input (its classifier-free guidance negative and its conditioning dropout).

An artifact holds ``projector.safetensors`` (both heads) and ``projector_config.json``
(:class:`VideoProjectorSpec`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from nexus_core.errors import InputError

WEIGHTS = "projector.safetensors"
CONFIG = "projector_config.json"
CAPTIONS = "captions.txt"


class VideoProjectorSpec(BaseModel):
    """What a video projector maps from and to (saved as ``projector_config.json``)."""

    llm_layers: list[int] = Field(description="LLM hidden-state indices concatenated per token (0 = embeddings)")
    llm_hidden_size: int = Field(description="Width of one LLM hidden state")
    hidden_size: int = Field(description="Inner width of each head")
    cross_attention_dim: int = Field(description="Embedding head output: the UNet's cross_attention_dim")
    latent_shape: list[int] = Field(description="First-frame latent (C, h, w) the pipeline concatenates")
    first_frame: Literal["predicted", "zeros"] = Field(description="First-frame latent: the head's or zeros")
    max_sequence_length: int = Field(description="Tokens per prompt (padded/truncated)")
    chat_template: bool = Field(description="Prompts wrapped as a user turn of the LLM's chat template")
    video: dict[str, Any] = Field(default_factory=dict, description="num_frames, height, width, fps, "
                                  "motion_bucket_id, noise_aug_strength of the training videos")
    llm: dict[str, Any] = Field(default_factory=dict, description="The LLM trained with: uri, digest")
    pipeline: dict[str, Any] = Field(default_factory=dict, description="The pipeline trained with: uri, digest")

    @property
    def in_dim(self) -> int:
        """Input width of the heads."""
        return len(self.llm_layers) * self.llm_hidden_size


def _mlp(n_in: int, hidden: int, n_out: int) -> Any:
    from torch import nn

    return nn.Sequential(nn.LayerNorm(n_in), nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, n_out))


def build_projector(spec: VideoProjectorSpec) -> Any:
    """``nn.ModuleDict`` with ``embed`` (and ``frame`` when predicted), float32, freshly initialised."""
    import math

    from torch import nn

    heads = {"embed": _mlp(spec.in_dim, spec.hidden_size, spec.cross_attention_dim)}
    if spec.first_frame == "predicted":
        heads["frame"] = _mlp(spec.in_dim, spec.hidden_size, math.prod(spec.latent_shape))
    return nn.ModuleDict(heads)


def save_projector(out: Path, projector: Any, spec: VideoProjectorSpec) -> None:
    """Write the weights and the spec into ``out``."""
    from safetensors.torch import save_file

    from nexus_core.artifacts import atomic_write_json

    save_file({k: v.detach().float().cpu().contiguous() for k, v in projector.state_dict().items()},
              str(out / WEIGHTS), metadata={"format": "pt", "nexus.kind": "svd_projector"})
    atomic_write_json(out / CONFIG, spec.model_dump(mode="json"))


def load_projector(root: Path) -> tuple[Any, VideoProjectorSpec]:
    """(projector in eval mode, its spec) from a projector artifact directory."""
    from safetensors.torch import load_file

    for name in (WEIGHTS, CONFIG):
        if not (root / name).is_file():
            raise InputError(f"{root}: not a video projector artifact (no {name})")
    spec = VideoProjectorSpec.model_validate(json.loads((root / CONFIG).read_text(encoding="utf-8")))
    projector = build_projector(spec)
    projector.load_state_dict(load_file(str(root / WEIGHTS)))
    return projector.eval(), spec


def pooled_features(llm: Any, tokenizer: Any, prompts: list[str], spec: VideoProjectorSpec) -> Any:
    """``(B, in_dim)``: the frozen LLM's hidden states of ``spec.llm_layers``, concatenated per token and
    averaged over each prompt's real tokens."""
    import torch

    use_chat = spec.chat_template and getattr(tokenizer, "chat_template", None)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) if use_chat else p for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                    max_length=spec.max_sequence_length, add_special_tokens=not use_chat)
    device = next(llm.parameters()).device
    mask = enc["attention_mask"].to(device)
    with torch.no_grad():
        out = llm.base_model(input_ids=enc["input_ids"].to(device), attention_mask=mask, output_hidden_states=True,
                             use_cache=False)
    h = torch.cat([out.hidden_states[i] for i in spec.llm_layers], dim=-1).float()
    m = mask.unsqueeze(-1).float()
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def project(llm: Any, tokenizer: Any, projector: Any, spec: VideoProjectorSpec,
            prompts: list[str]) -> tuple[Any, Any]:
    """(``encoder_hidden_states`` ``(B, 1, D)``, first-frame latents ``(B, C, h, w)``) for ``prompts``;
    gradients reach the projector only."""
    import torch

    device = next(projector.parameters()).device
    x = pooled_features(llm, tokenizer, prompts, spec).to(device)
    embeds = projector["embed"](x).unsqueeze(1)
    shape = (len(prompts), *spec.latent_shape)
    frame = projector["frame"](x).view(shape) if "frame" in projector else torch.zeros(shape, device=device)
    return embeds, frame


def sample_video(pipe: Any, embeds: Any, first_latent: Any, *, num_frames: int, height: int, width: int,
                 steps: int, min_guidance_scale: float, max_guidance_scale: float, fps: int,
                 motion_bucket_id: int, noise_aug_strength: float, seed: int, decode_chunk_size: int) -> list[Any]:
    """PIL frames of one video: ``StableVideoDiffusionPipeline.__call__`` steps 5-9 and decoding, with
    ``embeds`` ``(1, 1, D)`` and ``first_latent`` ``(1, C, h, w)`` in place of the CLIP and VAE encodings of
    an input image (guidance against zeros for both, the scale rising over the frames, as the pipeline does)."""
    import torch
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
        _append_dims,
        retrieve_timesteps,
    )

    device, dtype = pipe.unet.device, pipe.unet.dtype
    cfg = max_guidance_scale > 1
    embeds, first_latent = embeds.to(device, dtype), first_latent.to(device, dtype)
    if cfg:
        embeds = torch.cat([torch.zeros_like(embeds), embeds])
        first_latent = torch.cat([torch.zeros_like(first_latent), first_latent])
    image_latents = first_latent.unsqueeze(1).repeat(1, num_frames, 1, 1, 1)
    added = pipe._get_add_time_ids(fps - 1, motion_bucket_id, noise_aug_strength, dtype, 1, 1, cfg).to(device)
    timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, device)
    assert timesteps is not None  # typed Optional; set_timesteps always fills it
    generator = torch.Generator().manual_seed(seed)
    latents = pipe.prepare_latents(1, num_frames, pipe.unet.config.in_channels, height, width, dtype, device,
                                   generator)
    guidance = torch.linspace(min_guidance_scale, max_guidance_scale, num_frames).unsqueeze(0).to(device, dtype)
    guidance = _append_dims(guidance, latents.ndim)
    with torch.no_grad():
        for t in timesteps:
            x = torch.cat([latents] * 2) if cfg else latents
            x = torch.cat([pipe.scheduler.scale_model_input(x, t), image_latents], dim=2)
            pred = pipe.unet(x, t, encoder_hidden_states=embeds, added_time_ids=added, return_dict=False)[0]
            if cfg:
                uncond, cond = pred.chunk(2)
                pred = uncond + guidance * (cond - uncond)
            latents = pipe.scheduler.step(pred, t, latents).prev_sample
        frames = pipe.decode_latents(latents, num_frames, decode_chunk_size)
    return pipe.video_processor.postprocess_video(video=frames, output_type="pil")[0]


def write_gif(path: Path, frames: list[Any], fps: int) -> None:
    """An animated GIF (Pillow), looping, ``1000 / fps`` ms per frame."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=max(1, round(1000 / fps)), loop=0,
                   optimize=False, disposal=1)
