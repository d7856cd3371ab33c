"""Projector render: a frozen LLM + trained projector drive the Flux.2 Klein pipeline to draw prompts.

Each prompt is read by the LLM the projector was trained with, projected to ``prompt_embeds``
(:mod:`nexus_core.flux.projector`) and rendered by ``Flux2KleinPipeline(prompt_embeds=...)``, loaded
without its own text encoder and tokenizer; classifier-free guidance (scale > 1) is against the
projected ``negative_prompt``. Output: ``images/<i>_<j>.png`` per prompt ``i`` and image ``j``, and
``data.jsonl`` (the artifact's table) with, per image, the prompt, file, seed and ``in_training`` (the prompt is one of the
projector's training captions). An LLM other than the one the projector was trained with (by digest)
is refused: the projector reads that LLM's hidden-state space only.
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
from nexus_core.flux import projector as pj
from nexus_core.flux.device import check_dtype, resolve_device
from nexus_core.runner import StepResult


class RenderConfig(NexusModel):
    """What to draw and how."""

    pretrained_model_name_or_path: PathOrName | None = Field(
        default=None, description="Klein pipeline (VAE, scheduler, DiT); a 'pipeline' input overrides")
    prompts: list[str] = Field(min_length=1, description="Prompts to render")
    height: int = Field(default=512, ge=8, description="Image height (a multiple of the VAE x patch factor)")
    width: int = Field(default=512, ge=8, description="Image width (a multiple of the VAE x patch factor)")
    num_inference_steps: int = Field(default=50, ge=1, description="Sampler steps")
    guidance_scale: float = Field(default=4.0, ge=0, description="Classifier-free guidance (>1 on; Klein base: 4)")
    negative_prompt: str = Field(default="", description="Negative prompt (projected like the prompts)")
    images_per_prompt: int = Field(default=1, ge=1, description="Images per prompt")
    seed: int = Field(default=0, description="Prompt i is drawn with seed + i")
    model_dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="Pipeline/LLM dtype")
    device: str = Field(default="auto", description="auto | cpu | cuda[:N]")


class RenderResult(StepResult):
    """What was drawn."""

    images: list[str] = Field(description="PNG paths relative to the artifact")
    unseen_prompts: int = Field(description="Prompts that are not training captions of the projector")
    seconds_per_image: float


@step(area="flux", kind="dataset",
      inputs={"projector": directory(description="A projector train artifact (projector.safetensors + config)"),
              "llm": model(description="The LLM the projector was trained with"),
              "pipeline": directory(optional=True, description="Klein pipeline: VAE, scheduler, DiT")})
def run_projector_render(cfg: RenderConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                         ctx: StepContext) -> RenderResult:
    """Render every prompt to PNG files; write the prompt table."""
    from nexus_core.models.io import load_causal_lm

    root = inputs["projector"].path
    projector, spec = pj.load_projector(root)
    trained_with = spec.llm.get("digest")
    if trained_with and trained_with != inputs["llm"].digest:
        raise InputError(f"render: input 'llm' ({inputs['llm'].uri}, digest {inputs['llm'].digest}) is not the LLM "
                         f"the projector {root} was trained with ({spec.llm.get('uri')}, digest {trained_with})")
    pipeline = str(inputs["pipeline"].path) if "pipeline" in inputs else cfg.pretrained_model_name_or_path
    if not pipeline:
        raise ConfigError(["render.pretrained_model_name_or_path: missing (VAE, scheduler and DiT come from it)"])
    device = resolve_device(cfg.device)
    check_dtype(device, cfg.model_dtype, "render.model_dtype")
    pipe = pj.load_render_pipeline(pipeline, cfg.model_dtype).to(device)
    factor = pipe.vae_scale_factor * 2
    bad = [f"render.{k}: {v} is not a multiple of {factor} (VAE x patch factor)"
           for k, v in (("height", cfg.height), ("width", cfg.width)) if v % factor]
    if pipe.transformer.config.joint_attention_dim != spec.joint_attention_dim:
        bad.append(f"render: the projector writes {spec.joint_attention_dim}-wide embeddings but the DiT reads "
                   f"{pipe.transformer.config.joint_attention_dim}")
    if bad:
        raise ConfigError(bad)
    llm, tokenizer = load_causal_lm(inputs["llm"].path, dtype=cfg.model_dtype)
    llm.to(device)
    projector.to(device)
    seen = set((root / pj.CAPTIONS).read_text(encoding="utf-8").splitlines()) if (root / pj.CAPTIONS).is_file() \
        else set()

    out = Path(out_uri)
    (out / "images").mkdir(parents=True)
    rows, paths = [], []
    t0 = time.perf_counter()
    for i, prompt in enumerate(cfg.prompts):
        images = pj.render(pipe, llm, tokenizer, projector, spec, prompt, height=cfg.height, width=cfg.width,
                           steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                           negative_prompt=cfg.negative_prompt, seed=cfg.seed + i,
                           images_per_prompt=cfg.images_per_prompt)
        for j, image in enumerate(images):
            rel = f"images/{i:04d}_{j}.png"
            image.save(out / rel)
            ctx.log_file(out / rel, "images")
            paths.append(rel)
            rows.append({"prompt": prompt, "file": rel, "seed": cfg.seed + i, "image": j,
                         "in_training": prompt in seen})
        ctx.progress(i + 1, len(cfg.prompts), f"{i + 1}/{len(cfg.prompts)} prompts")
    per_image = (time.perf_counter() - t0) / max(1, len(paths))
    (out / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    unseen = sum(p not in seen for p in cfg.prompts)
    return RenderResult(rows=len(rows), images=paths, unseen_prompts=unseen, seconds_per_image=per_image,
                        columns={"prompt": "str", "file": "str", "seed": "int", "image": "int", "in_training": "bool"},
                        metrics={"images": float(len(paths)), "unseen_prompts": float(unseen),
                                 "seconds_per_image": per_image})
