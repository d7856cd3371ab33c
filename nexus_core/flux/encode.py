"""Encoding helpers shared by precompute, training and the bench: the exact tensors the Klein pipeline
feeds its transformer, computed outside the pipeline call.

Latents are stored *patchified* (``B, 4*C, H/2, W/2``) and *before* batch-norm normalisation; the
trainer normalises them with the VAE's running statistics (what inference un-normalises with) or
with the dataset statistics recorded at precompute time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "bfloat16", "float16")


def images_to_tensor(images: list[Any], size: int | tuple[int, int]) -> torch.Tensor:
    """PIL images → ``(B, 3, H, W)`` float tensor in [-1, 1] (center crop + resize to ``size``: a square
    side, or ``(height, width)``; an image already that size is taken as it is)."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    h, w = (size, size) if isinstance(size, int) else size
    arrs = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (w, h):
            im = ImageOps.fit(im, (w, h), Image.Resampling.BICUBIC)
        arrs.append(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def mask_to_grid(mask: Any, size: tuple[int, int], factor: int) -> Any:
    """A grayscale PIL mask (white = train on it) → float16 ``(H/factor, W/factor)`` array in [0, 1]: fitted
    to ``size`` like its image, then average-pooled onto the stored latent grid (``factor`` = VAE x patch)."""
    import numpy as np
    from PIL import Image, ImageOps

    h, w = size
    im = mask.convert("L")
    if im.size != (w, h):
        im = ImageOps.fit(im, (w, h), Image.Resampling.BILINEAR)
    a = np.asarray(im, dtype=np.float32) / 255.0
    return a.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3)).astype(np.float16)


def encode_images(pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
    """VAE mode latents, patchified 2x2: ``(B, 4*C, H/(2s), W/(2s))``, not yet normalised."""
    import torch

    with torch.no_grad():
        lat = pipe.vae.encode(pixels.to(pipe.vae.device, pipe.vae.dtype)).latent_dist.mode()
    return pipe._patchify_latents(lat)


def encode_prompts(pipe: Any, captions: list[str], max_sequence_length: int,
                   layers: tuple[int, ...] | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(text_embeds ``(B, L, 3*D)``, text_ids ``(B, L, 4)``) exactly as the Klein pipeline computes them."""
    import torch

    with torch.no_grad():
        embeds = pipe._get_qwen3_prompt_embeds(pipe.text_encoder, pipe.tokenizer, captions,
                                               max_sequence_length=max_sequence_length,
                                               hidden_states_layers=tuple(layers))
    return embeds, pipe._prepare_text_ids(embeds)


def normalize(latents: torch.Tensor, mean: list[float], var: list[float], eps: float) -> torch.Tensor:
    """``(latents - mean) / sqrt(var + eps)`` per channel (the pipeline's batch-norm step)."""
    import torch

    m = torch.tensor(mean, dtype=latents.dtype).view(1, -1, 1, 1)
    s = torch.sqrt(torch.tensor(var, dtype=latents.dtype) + eps).view(1, -1, 1, 1)
    return (latents - m) / s


def pack(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, C, H, W)`` → (tokens ``(B, H*W, C)``, position ids ``(B, H*W, 4)``) as the pipeline packs them."""
    from diffusers import Flux2KleinPipeline

    ids = Flux2KleinPipeline._prepare_latent_ids(latents)
    return Flux2KleinPipeline._pack_latents(latents), ids


def to_storage(t: torch.Tensor, save_dtype: str) -> Any:
    """Tensor → numpy array in ``save_dtype`` (bfloat16 is stored as its uint16 bit pattern)."""
    import torch

    if save_dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.uint16).cpu().numpy()
    return t.to(getattr(torch, save_dtype)).cpu().numpy()


def from_storage(a: Any, save_dtype: str) -> torch.Tensor:
    """Inverse of :func:`to_storage`, as float32."""
    import torch

    t = torch.from_numpy(a.copy())
    if save_dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    return t.float()
