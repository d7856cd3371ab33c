"""Video precompute: caption + video rows → SVD latents, first-frame conditioning and CLIP embeddings.

Input: a JSON-lines file, one ``{"video": PATH, "caption": TEXT}`` per line (``video`` relative to the
file; anything Pillow opens as an animation: GIF, WebP, APNG). From each video ``num_frames`` frames
are taken evenly from first to last, resized to ``width`` x ``height``; then, with the pipeline's frozen
parts and exactly as ``StableVideoDiffusionPipeline`` prepares them:

* ``latents`` ``(F, C, h, w)``: ``vae.encode(frames).latent_dist.mode() * scaling_factor`` (the target
  of the denoising loss; the pipeline's decoder divides by ``scaling_factor``);
* ``cond_latent`` ``(C, h, w)``: ``vae.encode(first + noise_aug_strength * noise).latent_dist.mode()``,
  unscaled (what the pipeline concatenates to every frame; seeded noise);
* ``image_embeds`` ``(D,)``: the CLIP image embedding of the first frame (the pipeline's
  ``_encode_image`` on the frame resized with its antialiasing filter to the encoder's input size).

Output: ``latents/NNNN.safetensors`` per video, ``data.parquet`` (video, caption, file, source_frames)
and ``video_meta.json`` (shapes, fps / motion bucket / noise augmentation, the pipeline). A row with
no caption, a missing or unreadable video, or fewer frames than ``num_frames`` stops the step naming
the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from nexus_core.artifacts import ArtifactRef, atomic_write_json
from nexus_core.config import NexusModel, PathOrName
from nexus_core.context import StepContext
from nexus_core.contract import anything, directory, step
from nexus_core.errors import ConfigError, InputError
from nexus_core.runner import StepResult
from nexus_core.videogen import svd

META = "video_meta.json"


class VideoPrecomputeConfig(NexusModel):
    """How videos become training tensors."""

    pretrained_model_name_or_path: PathOrName | None = Field(
        default=None, description="SVD pipeline (VAE, image encoder); a 'pipeline' input overrides")
    num_frames: int = Field(default=14, ge=2, description="Frames per video (even spread, first to last)")
    height: int = Field(default=576, ge=8, description="Frame height (a multiple of 8 and of the VAE factor)")
    width: int = Field(default=1024, ge=8, description="Frame width (a multiple of 8 and of the VAE factor)")
    fps: int = Field(default=7, ge=2, description="Frame rate the videos are conditioned on (time id fps - 1)")
    motion_bucket_id: int = Field(default=127, ge=0, description="Motion bucket time id")
    noise_aug_strength: float = Field(default=0.02, ge=0, description="Noise added to the first frame before the VAE")
    model_dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="Pipeline dtype")
    seed: int = Field(default=0, description="Seed of the first-frame noise")
    device: str = Field(default="auto", description="auto | cpu | cuda[:N]")


class VideoPrecomputeResult(StepResult):
    """What was encoded."""

    videos: int
    latent_shape: list[int]
    embed_dim: int


def read_rows(path: Path) -> list[dict[str, Any]]:
    """``{video: resolved Path, caption}`` per line of the caption file; InputError naming file:line."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{n}: expected an object with 'video' and 'caption'")
        for key in ("video", "caption"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise InputError(f"{path}:{n}: missing or empty {key!r}")
        rows.append({"video": (path.parent / row["video"]).resolve(), "caption": row["caption"].strip(), "line": n})
    if not rows:
        raise InputError(f"{path}: no rows")
    return rows


def _files_read(cfg: VideoPrecomputeConfig, inputs: dict[str, ArtifactRef]) -> list[Path]:
    """The video files (their bytes join the cache key; the caption file's digest is the input's)."""
    src = inputs["source"].path
    return sorted({r["video"] for r in read_rows(src) if r["video"].is_file()}) if src.is_file() else []


def read_frames(path: Path, n: int, size: tuple[int, int], where: str) -> tuple[list[Any], int]:
    """``n`` RGB frames spread evenly over the animation at ``path``, resized to ``size``; its frame count."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise InputError(f"{where}: video {path} not found")
    try:
        with Image.open(path) as im:
            total = getattr(im, "n_frames", 1)
            if total < n:
                raise InputError(f"{where}: video {path} has {total} frame(s), fewer than num_frames={n}")
            frames = []
            for k in range(n):
                im.seek(round(k * (total - 1) / (n - 1)))
                frames.append(im.convert("RGB").resize(size))
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{where}: video {path} is not readable ({e})") from None
    return frames, total


@step(area="videogen", kind="dataset",
      inputs={"source": anything(description="JSON lines of {video, caption}"),
              "pipeline": directory(optional=True, description="SVD pipeline: VAE and CLIP image encoder")},
      reads=_files_read)
def run_video_precompute(cfg: VideoPrecomputeConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                         ctx: StepContext) -> VideoPrecomputeResult:
    """Encode every video with the frozen VAE and image encoder; write tensors, table and meta."""
    import polars as pl
    import torch
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
        _resize_with_antialiasing,
    )
    from safetensors.torch import save_file

    from nexus_core.flux.device import check_dtype, resolve_device

    src = inputs["source"].path
    if not src.is_file():
        raise InputError(f"{src}: expected a JSON-lines file of {{video, caption}} rows")
    rows = read_rows(src)
    pipeline = str(inputs["pipeline"].path) if "pipeline" in inputs else cfg.pretrained_model_name_or_path
    if not pipeline:
        raise ConfigError(["precompute.pretrained_model_name_or_path: missing (the VAE comes from the pipeline)"])
    device = resolve_device(cfg.device)
    check_dtype(device, cfg.model_dtype, "precompute.model_dtype")
    pipe = svd.load_svd(pipeline, cfg.model_dtype).to(device)
    factor = pipe.vae_scale_factor
    bad = [f"precompute.{k}: {v} is not a multiple of {max(8, factor)} (VAE factor)"
           for k, v in (("height", cfg.height), ("width", cfg.width)) if v % max(8, factor)]
    if bad:
        raise ConfigError(bad)
    clip_size = int(pipe.image_encoder.config.image_size)
    out = Path(out_uri)
    (out / "latents").mkdir(parents=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    table, shape, dim = [], [], 0
    for i, row in enumerate(rows):
        where = f"{src}:{row['line']}"
        frames, total = read_frames(row["video"], cfg.num_frames, (cfg.width, cfg.height), where)
        pixels = pipe.video_processor.preprocess(frames, height=cfg.height, width=cfg.width).to(device, pipe.vae.dtype)
        with torch.no_grad():
            latents = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
            first = pixels[:1] + cfg.noise_aug_strength * torch.randn(pixels[:1].shape, generator=gen).to(pixels)
            cond = pipe.vae.encode(first).latent_dist.mode()[0]
            clip_in = (_resize_with_antialiasing(pixels[:1].float(), (clip_size, clip_size)) + 1.0) / 2.0
            embeds = pipe._encode_image(clip_in, device, 1, False)[0, 0]
        rel = f"latents/{i:04d}.safetensors"
        save_file({"latents": latents.float().cpu().contiguous(), "cond_latent": cond.float().cpu().contiguous(),
                   "image_embeds": embeds.float().cpu().contiguous()}, str(out / rel))
        shape, dim = list(latents.shape[1:]), int(embeds.shape[0])
        table.append({"video": str(row["video"]), "caption": row["caption"], "file": rel, "source_frames": total})
        ctx.progress(i + 1, len(rows), f"{i + 1}/{len(rows)} videos")
    pl.DataFrame(table).write_parquet(out / "data.parquet")
    atomic_write_json(out / META, {
        "num_frames": cfg.num_frames, "height": cfg.height, "width": cfg.width, "fps": cfg.fps,
        "motion_bucket_id": cfg.motion_bucket_id, "noise_aug_strength": cfg.noise_aug_strength,
        "latent_shape": shape, "embed_dim": dim, "scaling_factor": pipe.vae.config.scaling_factor,
        "pipeline": pipeline})
    return VideoPrecomputeResult(rows=len(table), videos=len(table), latent_shape=shape, embed_dim=dim,
                                 columns={"video": "str", "caption": "str", "file": "str", "source_frames": "int"},
                                 metrics={"videos": float(len(table))})
