"""Video render: a frozen LLM + trained projector drive Stable Video Diffusion from text prompts.

Each prompt is read by the LLM the projector was trained with and projected to the UNet's
``encoder_hidden_states`` and a first-frame latent (:mod:`nexus_core.videogen.projector`); the SVD
pipeline, loaded without its CLIP image encoder, samples and decodes the frames
(:func:`~nexus_core.videogen.projector.sample_video`). Output per prompt ``i``: ``videos/<i>.gif``
(animated, looping, ``1000 / fps`` ms a frame) and ``frames/<i>/<k>.png``; ``data.jsonl`` holds the
prompt, files, seed and ``in_training`` (the prompt is a training caption). An LLM other than the one
the projector was trained with (by digest), or a pipeline whose UNet reads another embedding width or
latent, is refused before any work.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from nexus_core.artifacts import ArtifactRef
from nexus_core.config import NexusModel, PathOrName
from nexus_core.context import StepContext
from nexus_core.contract import directory, model, step
from nexus_core.errors import ConfigError, InputError
from nexus_core.flux.device import check_dtype, resolve_device
from nexus_core.runner import StepResult
from nexus_core.videogen import projector as pj
from nexus_core.videogen import svd


class VideoRenderConfig(NexusModel):
    """What to film and how (frame count, size and micro-conditioning default to the training videos')."""

    pretrained_model_name_or_path: PathOrName | None = Field(
        default=None, description="SVD pipeline (UNet, VAE, scheduler); a 'pipeline' input overrides")
    prompts: list[str] = Field(min_length=1, description="Prompts to render")
    num_frames: int | None = Field(default=None, ge=1, description="Frames per video (default: as trained)")
    num_inference_steps: int = Field(default=25, ge=1, description="Sampler steps")
    min_guidance_scale: float = Field(default=1.0, ge=0, description="Guidance on the first frame")
    max_guidance_scale: float = Field(default=3.0, ge=0, description="Guidance on the last frame (>1: guidance on)")
    motion_bucket_id: int | None = Field(default=None, ge=0, description="Motion time id (default: as trained)")
    fps: int | None = Field(default=None, ge=2, description="Frame rate: time id and GIF speed (default: as trained)")
    decode_chunk_size: int = Field(default=8, ge=1, description="Frames decoded at a time")
    seed: int = Field(default=0, description="Prompt i is drawn with seed + i")
    model_dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="Pipeline/LLM dtype")
    device: str = Field(default="auto", description="auto | cpu | cuda[:N]")


class VideoRenderResult(StepResult):
    """What was filmed."""

    videos: list[str] = Field(description="GIF paths relative to the artifact")
    frames_per_video: int
    unseen_prompts: int = Field(description="Prompts that are not training captions of the projector")
    seconds_per_video: float


@step(area="videogen", kind="dataset",
      inputs={"projector": directory(description="A video projector train artifact"),
              "llm": model(description="The LLM the projector was trained with"),
              "pipeline": directory(optional=True, description="SVD pipeline: UNet, VAE, scheduler")})
def run_video_render(cfg: VideoRenderConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                     ctx: StepContext) -> VideoRenderResult:
    """Render every prompt to a GIF and PNG frames; write the prompt table."""
    import torch

    from nexus_core.models.io import load_causal_lm

    root = inputs["projector"].path
    projector, spec = pj.load_projector(root)
    trained_with = spec.llm.get("digest")
    if trained_with and trained_with != inputs["llm"].digest:
        raise InputError(f"render: input 'llm' ({inputs['llm'].uri}, digest {inputs['llm'].digest}) is not the LLM "
                         f"the projector {root / pj.CONFIG} was trained with ({spec.llm.get('uri')}, digest "
                         f"{trained_with})")
    pipeline = str(inputs["pipeline"].path) if "pipeline" in inputs else cfg.pretrained_model_name_or_path
    if not pipeline:
        raise ConfigError(["render.pretrained_model_name_or_path: missing (UNet, VAE and scheduler come from it)"])
    device = resolve_device(cfg.device)
    check_dtype(device, cfg.model_dtype, "render.model_dtype")
    pipe = svd.load_svd(pipeline, cfg.model_dtype, image_encoder=False).to(device)
    unet = pipe.unet.config
    if unet.cross_attention_dim != spec.cross_attention_dim or unet.out_channels != spec.latent_shape[0]:
        raise ConfigError([f"render: the projector {root / pj.CONFIG} writes {spec.cross_attention_dim}-wide "
                           f"embeddings and {spec.latent_shape[0]}-channel first frames, but the UNet of {pipeline} "
                           f"reads {unet.cross_attention_dim} and {unet.out_channels}"])
    video = spec.video
    frames_n = cfg.num_frames or int(video["num_frames"])
    fps = cfg.fps or int(video["fps"])
    llm, tokenizer = load_causal_lm(inputs["llm"].path, dtype=cfg.model_dtype)
    llm.to(device)
    projector.to(device)
    seen = set((root / pj.CAPTIONS).read_text(encoding="utf-8").splitlines()) if (root / pj.CAPTIONS).is_file() \
        else set()

    out = Path(out_uri)
    rows, paths = [], []
    t0 = time.perf_counter()
    for i, prompt in enumerate(cfg.prompts):
        with torch.no_grad():
            embeds, first = pj.project(llm, tokenizer, projector, spec, [prompt])
        frames = pj.sample_video(
            pipe, embeds, first, num_frames=frames_n, height=int(video["height"]), width=int(video["width"]),
            steps=cfg.num_inference_steps, min_guidance_scale=cfg.min_guidance_scale,
            max_guidance_scale=cfg.max_guidance_scale, fps=fps,
            motion_bucket_id=cfg.motion_bucket_id if cfg.motion_bucket_id is not None else int(video["motion_bucket_id"]),
            noise_aug_strength=float(video["noise_aug_strength"]), seed=cfg.seed + i,
            decode_chunk_size=cfg.decode_chunk_size)
        gif = f"videos/{i:04d}.gif"
        pj.write_gif(out / gif, frames, fps)
        (out / "frames" / f"{i:04d}").mkdir(parents=True)
        for k, frame in enumerate(frames):
            frame.save(out / "frames" / f"{i:04d}" / f"{k:03d}.png")
        ctx.log_file(out / gif, "videos")
        paths.append(gif)
        rows.append({"prompt": prompt, "file": gif, "frames_dir": f"frames/{i:04d}", "frames": len(frames),
                     "seed": cfg.seed + i, "in_training": prompt in seen})
        ctx.progress(i + 1, len(cfg.prompts), f"{i + 1}/{len(cfg.prompts)} prompts")
    per_video = (time.perf_counter() - t0) / len(paths)
    (out / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    unseen = sum(p not in seen for p in cfg.prompts)
    return VideoRenderResult(
        rows=len(rows), videos=paths, frames_per_video=frames_n, unseen_prompts=unseen, seconds_per_video=per_video,
        columns={"prompt": "str", "file": "str", "frames_dir": "str", "frames": "int", "seed": "int",
                 "in_training": "bool"},
        metrics={"videos": float(len(paths)), "unseen_prompts": float(unseen), "seconds_per_video": per_video})
