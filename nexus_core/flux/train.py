"""Train: Flux.2 Klein transformer, LoRA or full fine-tuning, from precomputed latents and text embeddings.

Reads only the precompute artifact's MDS shards (verified against their recorded sha256) through a
local shard cache bounded by ``cache_limit`` -- the VAE and text encoder are not loaded except to
render validation images. Flow-matching loss with a base loss and weighting scheme
(nexus_core.flux.losses), optional resolution-dependent time shift, masked loss, caption dropout,
random flips, DreamBooth prior preservation and distillation from a frozen teacher DiT. Batches come
from one aspect-ratio bucket at a time (nexus_core.flux.training.BatchPlan); rows of a dataset with
``repeats`` = k are drawn k times per epoch.

Checkpoints hold only what training changes (LoRA: the adapter, not the frozen base), plus the
optimizer, LR scheduler, EMA and RNG state. They go to ``checkpoint_dir`` or, by default, the step's
work dir (``ctx.work_dir``: outside the artifact, kept when a run is killed, removed once the
artifact is published), every ``checkpointing_steps``, keeping ``checkpoints_total_limit``;
``resume_from_checkpoint: latest`` continues from the newest one, including the step count,
optimizer and batch order (and says so when it finds none). The work dir is keyed by the resume key
(the cache key less ``max_steps``, ``num_processes`` and the checkpoint settings), so re-running a
killed run -- also with more steps or processes -- resumes it; to continue a *finished* run with a
larger ``max_steps``, set ``checkpoint_dir`` (it is never deleted). ``num_processes`` > 1 trains
data-parallel under ``accelerate launch`` (nexus_core.train.launch). Output:
``transformer_lora.safetensors`` + ``comfyui/transformer_lora.safetensors`` (lora; both at the
trained strength alpha / rank) or ``transformer.safetensors`` + ``transformer/`` (full),
``train_config.json``, and ``validation/step_<N>_<i>.png`` (also logged to MLflow).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from nexus_core import checkpoints
from nexus_core.artifacts import ArtifactRef, atomic_write_json
from nexus_core.config import RESUME_NEUTRAL, ConfigPath, NexusModel, PathOrName, runtime_field
from nexus_core.context import StepContext
from nexus_core.contract import directory, step
from nexus_core.errors import ConfigError, InputError
from nexus_core.flux import losses
from nexus_core.flux.checks import loadable
from nexus_core.flux.device import check_dtype, resolve_device
from nexus_core.flux.mds import open_dataset, verify_shards
from nexus_core.flux.training import (
    BatchPlan,
    Ema,
    collate,
    expand_targets,
    load_checkpoint,
    make_optimizer,
    save_checkpoint,
    save_lora,
)
from nexus_core.runner import StepResult

# diffusers' Klein LoRA script: double-stream image attention and every single-stream block
KLEIN_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj", "single_transformer_blocks.*.attn.to_out"]


class LoraSettings(NexusModel):
    """LoRA adapter shape."""

    rank: int = Field(default=16, ge=1, description="LoRA rank r")
    alpha: float = Field(default=16.0, gt=0, description="LoRA alpha (strength = alpha / rank, stored in the file)")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the LoRA branch")
    target_modules: list[str] = Field(default=KLEIN_LORA_TARGETS, description="Module names to adapt (a module-name "
                                      "suffix, or a dotted pattern with * expanded against the transformer)")


class LossSettings(NexusModel):
    """Flow-matching objective."""

    base: losses.BaseLoss = Field(default="mse", description="Element loss: mse | l1 | huber | logcosh")
    weighting: losses.Weighting = Field(default="none", description="none | sigma_sqrt | logit_normal | mode | cosmap")
    huber_c: float = Field(default=0.1, gt=0, description="Pseudo-Huber c")
    logit_mean: float = Field(default=0.0, description="logit_normal sampling mean")
    logit_std: float = Field(default=1.0, gt=0, description="logit_normal sampling std")
    mode_scale: float = Field(default=1.29, description="mode sampling scale")
    shift: float = Field(default=1.0, gt=0, description="Time shift of sampled sigmas (>1: more noise)")
    shift_by_resolution: bool = Field(default=False, description="Also shift sigmas by the image token count, with "
                                      "the pipeline scheduler's base/max shift (as at inference)")


class TrainConfig(NexusModel):
    """Everything about one Flux.2 training run."""

    pretrained_model_name_or_path: PathOrName | None = Field(
        default=None, description="Pipeline (VAE, scheduler, text encoder) for validation; a 'pipeline' input overrides")
    dit: PathOrName | None = Field(default=None, description="Transformer to train (dir with config.json or a pipeline); "
                                              "default: the pipeline's transformer/")
    train_mode: Literal["lora", "full"] = Field(default="lora", description="Train a LoRA adapter or every weight")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA shape (train_mode=lora)")
    base_quantization: Literal["none", "nf4", "int8"] = Field(
        default="none", description="LoRA on a bitsandbytes-quantized frozen base (CUDA and bitsandbytes needed)")
    loss: LossSettings = Field(default_factory=LossSettings, description="Loss and weighting")
    resolution: int = Field(default=512, ge=8, description="Must match the precomputed latents_<resolution>")
    latent_channels: int | None = Field(default=None, description="Expected patchified latent channels (checked)")
    latent_norm: Literal["vae", "dataset"] = Field(default="vae", description="Normalise latents with VAE bn or data stats")
    batch_size: int = Field(default=1, ge=1, description="Samples per micro-batch (per process)")
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="Micro-batches per optimizer step")
    max_steps: int = Field(default=1000, ge=1, description="Optimizer steps in total (including resumed ones)",
                           json_schema_extra=RESUME_NEUTRAL)
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = Field(
        default="adamw", description="adamw | adamw8bit (bitsandbytes, CUDA) | prodigy (set learning_rate ~1.0)")
    learning_rate: float = Field(default=1e-4, gt=0, description="Peak learning rate")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        default="constant", description="Learning-rate schedule after the warm-up")
    lr_warmup_steps: int = Field(default=0, ge=0, description="Optimizer steps of linear warm-up from 0")
    weight_decay: float = Field(default=0.0, ge=0, description="Decoupled weight decay")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping norm")
    ema_decay: float | None = Field(default=None, gt=0, lt=1, description="Keep an EMA of the trained weights with "
                                    "this decay and export it (and validate with it); null: off")
    caption_dropout: float = Field(default=0.0, ge=0, le=1, description="Share of samples trained on the empty "
                                   "caption (improves classifier-free guidance)")
    random_flip: bool = Field(default=False, description="Use the precomputed flipped latents for half the samples "
                              "(needs precompute.flip)")
    masked_loss: bool = Field(default=False, description="Train only where the precomputed mask is set (needs masks)")
    seed: int = Field(default=0, description="Seed for init, noise, sigmas and batch order")
    prior_preservation: bool = Field(default=False, description="DreamBooth: half of each batch from class images")
    prior_weight: float = Field(default=1.0, ge=0, description="Weight of the class-image loss")
    distillation: bool = Field(default=False, description="Also match a frozen teacher's prediction")
    teacher_dit: PathOrName | None = Field(default=None, description="Teacher transformer; default: a frozen copy of "
                                           "the start (held in the mixed-precision dtype when one is set)")
    flow_weight: float = Field(default=1.0, ge=0, description="Weight of the flow-matching loss when distilling")
    distillation_weight: float = Field(default=1.0, ge=0, description="Weight of the teacher-matching loss")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(default="no", description="Autocast dtype")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations to save memory")
    num_processes: int = Field(default=1, ge=1, description="Data-parallel processes (GPUs); >1 runs under "
                               "accelerate launch", json_schema_extra=RESUME_NEUTRAL)
    isolate: bool = runtime_field(False, "Train in a child process even with one process")
    cache_limit: str | None = Field(default="20gb", description="Bound on the local shard cache while reading the "
                                    "precomputed data (mosaicml-streaming's cache_limit); null: no bound")
    checkpointing_steps: int = Field(default=500, ge=1, description="Save a checkpoint every N optimizer steps",
                                     json_schema_extra=RESUME_NEUTRAL)
    checkpoints_total_limit: int | None = Field(default=3, ge=1, description="Keep at most this many checkpoints",
                                                json_schema_extra=RESUME_NEUTRAL)
    checkpoint_dir: ConfigPath | None = Field(default=None, description="Where checkpoints live (default: the step's work dir, "
                                                         "removed once the artifact is published)")
    resume_from_checkpoint: PathOrName | None = Field(default=None, description="'latest' or a checkpoint directory")
    validation_steps: int = Field(default=500, ge=1, description="Render validation images every N steps (and at the end)")
    validation_prompts: list[str] = Field(default_factory=list, description="Prompts of the validation images")
    validation_inference_steps: int = Field(default=20, ge=1, description="Sampler steps per validation image")
    validation_guidance_scale: float = Field(default=4.0, ge=0, description="Classifier-free guidance (>1 on; the "
                                             "Klein base default is 4)")
    validation_negative_prompt: str = Field(default="", description="Negative prompt when guidance is on")
    validation_width: int | None = Field(default=None, ge=8, description="Validation image width (default: resolution)")
    validation_height: int | None = Field(default=None, ge=8, description="Validation image height (default: resolution)")
    validation_seed: int | None = Field(default=None, description="Seed of the validation images (default: seed)")
    validation_images_per_prompt: int = Field(default=1, ge=1, description="Images rendered per validation prompt")
    log_every: int = runtime_field(10, "Log loss, learning rate and gradient norm every N steps", ge=1)
    device: str = Field(default="auto", description="auto | cpu | cuda[:N]")


class TrainResult(StepResult):
    """What the run did."""

    start_step: int
    global_step: int
    final_loss: float
    weights: str
    validation_images: list[str]
    trainable_parameters: int
    seconds_per_step: float
    processes: int = 1


def checkpoint_root(cfg: TrainConfig, ctx: StepContext) -> Path:
    """Where checkpoints live: outside the artifact (its staging dir is removed on failure), in
    ``checkpoint_dir`` when set, else in the step's work dir, which a re-run of a killed run gets again."""
    return Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else ctx.work_dir / "checkpoints"


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def preflight(cfg: TrainConfig, inputs: dict[str, ArtifactRef]) -> tuple[dict, str, str]:
    """Every config/data mismatch as one clear error before any model loads: (meta, pipeline, device)."""
    root = inputs["precomputed"].path
    meta_path = root / "flux_meta.json"
    if not meta_path.is_file():
        raise InputError(f"{meta_path}: missing; {root} is not a flux precompute artifact")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    problems = []
    pipeline = str(inputs["pipeline"].path) if "pipeline" in inputs else cfg.pretrained_model_name_or_path
    if not pipeline:
        problems.append("pipeline.pretrained_model_name_or_path: missing (the single source of VAE, scheduler "
                        "and text encoder)")
    for key, ref in (("pipeline.pretrained_model_name_or_path", pipeline), ("model.dit", cfg.dit),
                     ("train.teacher_dit", cfg.teacher_dit if cfg.distillation else None)):
        if ref and not loadable(ref):
            problems.append(f"{key}: {ref} cannot be loaded here (no such local directory, or a hub id not in "
                            "the local cache while HF_HUB_OFFLINE is set); see `nexus doctor`")
    if cfg.resolution != meta["resolution"]:
        problems.append(f"train.resolution: {cfg.resolution} but {root} holds {meta['latent_column']} "
                        f"(precomputed at {meta['resolution']})")
    if cfg.latent_channels is not None and cfg.latent_channels != meta["latent_channels"]:
        problems.append(f"train.latent_channels: {cfg.latent_channels} but the precomputed latents have "
                        f"{meta['latent_channels']} channels ({meta_path})")
    if cfg.prior_preservation and cfg.batch_size % 2:
        problems.append(f"train.batch_size: {cfg.batch_size} is odd; prior preservation needs an even batch "
                        "(half instance, half class images)")
    for key, wanted, have in (("train.caption_dropout", cfg.caption_dropout > 0, "empty_prompt"),
                              ("train.random_flip", cfg.random_flip, "has_flip"),
                              ("train.masked_loss", cfg.masked_loss, "has_mask")):
        if wanted and not meta.get(have):
            needs = {"empty_prompt": "its empty-caption embedding (re-run precompute)",
                     "has_flip": "flipped latents (set precompute.flip: true)",
                     "has_mask": "masks (add <image>.mask.png files beside the images)"}[have]
            problems.append(f"{key}: {root} has no {needs}")
    device = resolve_device(cfg.device)
    dtype = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}[cfg.mixed_precision]
    try:
        check_dtype(device, dtype, "train.mixed_precision")
    except ConfigError as exc:
        problems += exc.problems
    cuda_only = [("train.optimizer", cfg.optimizer == "adamw8bit", "adamw8bit"),
                 ("train.base_quantization", cfg.base_quantization != "none", cfg.base_quantization)]
    for key, on, what in cuda_only:
        if on and (not device.startswith("cuda") or not _has_module("bitsandbytes")):
            problems.append(f"{key}: {what} needs a CUDA device and the bitsandbytes package "
                            f"(device {device!r}, bitsandbytes {'installed' if _has_module('bitsandbytes') else 'missing'})")
    if cfg.base_quantization != "none" and cfg.train_mode != "lora":
        problems.append("train.base_quantization: only a LoRA run can train on a quantized base (train_mode: lora)")
    if cfg.optimizer == "prodigy" and not _has_module("prodigyopt"):
        problems.append("train.optimizer: prodigy needs the prodigyopt package (pip install prodigyopt)")
    if cfg.num_processes > 1 and device.startswith("cuda"):
        import torch

        if torch.cuda.device_count() < cfg.num_processes:
            problems.append(f"train.num_processes: {cfg.num_processes} but {torch.cuda.device_count()} GPU(s) visible")
    if problems:
        raise ConfigError(problems, "flux train")
    return meta, pipeline, device  # pyright: ignore[reportReturnType] - pipeline is set whenever a problem is not raised


def _load_transformer(path: str, quantization: str = "none"):  # noqa: ANN202 - Flux2Transformer2DModel
    from diffusers import Flux2Transformer2DModel

    sub = "transformer" if (Path(path) / "transformer" / "config.json").is_file() else None
    if quantization == "none":
        return Flux2Transformer2DModel.from_pretrained(path, subfolder=sub)
    import torch
    from diffusers import BitsAndBytesConfig
    from peft import prepare_model_for_kbit_training

    qc = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
          if quantization == "nf4" else BitsAndBytesConfig(load_in_8bit=True))
    model = Flux2Transformer2DModel.from_pretrained(path, subfolder=sub, quantization_config=qc,
                                                    torch_dtype=torch.bfloat16)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _rows_table(root: Path, ds) -> dict[str, list]:  # noqa: ANN001
    """subset / bucket / repeats of every row, from the artifact's table (same order as the shards)."""
    import polars as pl

    table = root / "data.parquet"
    n = ds.num_samples
    if table.is_file():
        df = pl.read_parquet(table)
        if df.height == n:
            return {"subset": df["subset"].to_list() if "subset" in df.columns else ["instance"] * n,
                    "bucket": df["bucket"].to_list() if "bucket" in df.columns else ["square"] * n,
                    "repeats": df["repeats"].to_list() if "repeats" in df.columns else [1] * n}
    rows = [ds[i] for i in range(n)]  # reads every shard once
    return {"subset": [r["subset"] for r in rows], "bucket": [r.get("bucket", "square") for r in rows],
            "repeats": [int(r.get("repeats", 1)) for r in rows]}


def _validate(cfg: TrainConfig, meta: dict, pipeline: str, transformer, step: int, out: Path,  # noqa: ANN001
              ctx: StepContext, cache: dict) -> list[str]:
    """Render the validation prompts with the current transformer, at the training sequence length and
    text layers; save and log the images."""
    import torch

    from nexus_core.models.flux_tiny import load_flux_pipeline

    if not cfg.validation_prompts:
        return []
    if "pipe" not in cache:  # VAE + text encoder load once per run, not once per validation
        cache["pipe"] = load_flux_pipeline(pipeline, transformer=transformer).to(transformer.device)
    pipe = cache["pipe"]
    pipe.transformer = transformer
    text = {"max_sequence_length": meta["max_sequence_length"],
            "text_encoder_out_layers": tuple(meta["text_encoder_out_layers"])}
    negative = None
    if cfg.validation_guidance_scale > 1 and cfg.validation_negative_prompt:
        negative = pipe.encode_prompt(prompt=cfg.validation_negative_prompt, **text)[0]
    paths = []
    transformer.eval()
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    seed = cfg.seed if cfg.validation_seed is None else cfg.validation_seed
    for i, prompt in enumerate(cfg.validation_prompts):
        # the frozen base may be in the autocast dtype while the VAE and text encoder are float32
        with torch.autocast(transformer.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            images = pipe(prompt=prompt, height=cfg.validation_height or cfg.resolution,
                          width=cfg.validation_width or cfg.resolution, guidance_scale=cfg.validation_guidance_scale,
                          negative_prompt_embeds=negative,  # pyright: ignore[reportArgumentType] - diffusers mistypes it as str
                          num_images_per_prompt=cfg.validation_images_per_prompt,
                          num_inference_steps=cfg.validation_inference_steps,
                          generator=torch.Generator().manual_seed(seed + i), **text).images
        for j, image in enumerate(images):
            suffix = f"_{j}" if cfg.validation_images_per_prompt > 1 else ""
            path = out / "validation" / f"step_{step:06d}_{i}{suffix}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
            ctx.log_file(path, f"validation/step_{step:06d}")
            paths.append(str(path))
    transformer.train()
    return paths


@step(area="models", kind="model",
      inputs={"precomputed": directory(description="The precompute step's artifact (mds/ + flux_meta.json)"),
              "pipeline": directory(optional=True, description="Pipeline: VAE, scheduler, text encoder, DiT")})
def run_train(cfg: TrainConfig, *, inputs: dict[str, ArtifactRef], out_uri: str, ctx: StepContext) -> TrainResult:
    """Train the transformer on precomputed shards; write the weights, config copy and validation images
    (here, or in ``num_processes`` data-parallel processes)."""
    from nexus_core.train.launch import run_stage

    preflight(cfg, inputs)  # before any process starts
    res = run_stage(train_transformer, cfg, inputs, out_uri, "flux train", ctx)
    keys = ("start_step", "global_step", "final_loss", "trainable_parameters", "seconds_per_step")
    return TrainResult(weights=res["weights"], validation_images=res["validation_images"],
                       processes=int(res.get("world_size", 1)), **{k: res[k] for k in keys},
                       metrics={k: res[k] for k in keys})


def train_transformer(cfg: TrainConfig, inputs: dict[str, ArtifactRef], out_uri: str,
                      ctx: StepContext) -> dict[str, Any]:
    """The training loop of :func:`run_train`, in each training process."""
    import torch
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    meta, pipeline, device = preflight(cfg, inputs)
    mds = inputs["precomputed"].path / "mds"
    verify_shards(mds)
    out = Path(out_uri)
    torch.manual_seed(cfg.seed)

    transformer = _load_transformer(cfg.dit or pipeline, cfg.base_quantization)
    if transformer.config.in_channels != meta["latent_channels"]:
        raise ConfigError([f"model.dit: transformer in_channels={transformer.config.in_channels} but the "
                           f"precomputed latents have {meta['latent_channels']} channels"], "flux train")
    if transformer.config.joint_attention_dim != meta["text_shape"][-1]:
        raise ConfigError([f"model.dit: joint_attention_dim={transformer.config.joint_attention_dim} but the "
                           f"precomputed text embeddings are {meta['text_shape'][-1]} wide"], "flux train")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    teacher = None
    if cfg.distillation:
        teacher = _load_transformer(cfg.teacher_dit) if cfg.teacher_dit else copy.deepcopy(transformer)
        teacher.requires_grad_(False).eval()
        if amp is not None:  # frozen: the autocast dtype is all it needs (half the memory of float32)
            teacher.to(dtype=amp)  # pyright: ignore[reportCallIssue] - ModelMixin.to takes a dtype
    if cfg.train_mode == "lora":
        from peft import LoraConfig

        transformer.requires_grad_(False)
        if amp is not None and cfg.base_quantization == "none":  # frozen base in the autocast dtype
            transformer.to(dtype=amp)  # pyright: ignore[reportCallIssue] - ModelMixin.to takes a dtype
        transformer.add_adapter(LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha,  # pyright: ignore[reportArgumentType] - peft accepts a float alpha
                                           lora_dropout=cfg.lora.dropout,
                                           target_modules=expand_targets(transformer, cfg.lora.target_modules),
                                           init_lora_weights="gaussian"))
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    named = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    params = list(named.values())
    for p in params:  # trainable weights stay float32 for a stable optimizer
        p.data = p.data.float()
    optimizer = make_optimizer(cfg.optimizer, params, cfg.learning_rate, cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                              num_training_steps=cfg.max_steps)
    ema = Ema(params, cfg.ema_decay) if cfg.ema_decay else None
    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=device == "cpu",
                      gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    transformer, optimizer = acc.prepare(transformer, optimizer)
    if teacher is not None:
        teacher.to(acc.device)
    main = acc.is_main_process

    ckpt_root = checkpoint_root(cfg, ctx)
    start = 0
    if cfg.resume_from_checkpoint:
        path = checkpoints.latest(ckpt_root) if cfg.resume_from_checkpoint == "latest" \
            else Path(cfg.resume_from_checkpoint)
        if path is None:
            ctx.info(f"resume_from_checkpoint: latest found no finished checkpoint under {ckpt_root}; "
                     "starting at step 0")
        else:
            if not (path / checkpoints.COMPLETE_MARKER).is_file():
                raise InputError(f"{path}: not a finished checkpoint (no {checkpoints.COMPLETE_MARKER})")
            state, trainer_state = load_checkpoint(path, named)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if ema is not None and state.get("ema"):
                ema.shadow = state["ema"]
            start = trainer_state["global_step"]
            if start > cfg.max_steps:
                raise InputError(f"{path}: a checkpoint at step {start}, past train.max_steps={cfg.max_steps}; "
                                 "raise max_steps or start without resume_from_checkpoint")
            ctx.info(f"resumed from {path} at step {start}")

    # bounded by cache_limit, removed at the end; one per launch, shared by its processes (local rank 0 fills it)
    launch = os.environ.get("MASTER_PORT") if acc.num_processes > 1 else None
    cache = ctx.work_dir / f"stream-cache-{launch or uuid.uuid4().hex[:8]}"
    ds = open_dataset(mds, cache, **({"cache_limit": cfg.cache_limit} if cfg.cache_limit else {}))
    empty = None
    if cfg.caption_dropout > 0:
        from safetensors.torch import load_file

        e = load_file(str(inputs["precomputed"].path / meta["empty_prompt"]))  # the caption "" as precomputed
        empty = (e["text_embeds"].float(), e["text_ids"].long())
    scheduler_cfg = {}
    if cfg.loss.shift_by_resolution:
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler_cfg = dict(FlowMatchEulerDiscreteScheduler.load_config(pipeline, subfolder="scheduler"))  # pyright: ignore[reportCallIssue, reportArgumentType] - a plain config dict without return_unused_kwargs
    loader = None
    world, rank = acc.num_processes, acc.process_index
    try:
        rows = _rows_table(inputs["precomputed"].path, ds)
        pools = ([[i for i, s in enumerate(rows["subset"]) if s == "instance"],
                  [i for i, s in enumerate(rows["subset"]) if s == "class"]]
                 if cfg.prior_preservation else [list(range(ds.num_samples))])
        if cfg.prior_preservation and not all(pools):
            raise InputError(f"{mds}: prior preservation needs instance and class rows "
                             f"(found {len(pools[0])} instance, {len(pools[1])} class)")
        pools = [[i for i in pool for _ in range(max(1, int(rows["repeats"][i])))] for pool in pools]
        plan = BatchPlan(pools, rows["bucket"], cfg.batch_size // len(pools), cfg.seed)
        step, loss_val, t0, history = start, float("nan"), time.perf_counter(), {}
        validation: list[str] = []
        val_cache: dict = {}
        transformer.train()

        def fetch(pos: int) -> list:
            picked = plan.batch(pos * world + rank)  # each process its own share of the global batch stream
            rng = torch.Generator().manual_seed(cfg.seed * 7_919 + pos * world + rank)
            u = torch.rand(len(picked), 2, generator=rng)
            return collate([ds[i] for i, _ in picked], meta, cfg.latent_norm,  # pyright: ignore[reportOptionalSubscript] - the dataset is open here
                           pools=[k for _, k in picked], flips=[cfg.random_flip and bool(x < 0.5) for x in u[:, 0]],
                           drop_captions=[bool(x < cfg.caption_dropout) for x in u[:, 1]], empty=empty,
                           use_mask=cfg.masked_loss)

        # one batch read ahead on a thread, so shard reads and decoding overlap the forward/backward pass
        loader = ThreadPoolExecutor(1)
        ahead = loader.submit(fetch, start * cfg.gradient_accumulation_steps)
        grad_norm = float("nan")
        while step < cfg.max_steps:
            for micro in range(cfg.gradient_accumulation_steps):
                pos = step * cfg.gradient_accumulation_steps + micro
                groups = ahead.result()
                ahead = loader.submit(fetch, pos + 1)
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + pos * world + rank)
                with acc.accumulate(transformer), acc.autocast():
                    loss = _batch_loss(cfg, transformer, teacher, groups, gen, acc.device, scheduler_cfg)
                    acc.backward(loss)
                    if acc.sync_gradients:
                        norm = acc.clip_grad_norm_(params, cfg.max_grad_norm)
                        grad_norm = float(norm) if norm is not None else float("nan")
                    optimizer.step()
                    optimizer.zero_grad()
            scheduler.step()
            step += 1
            if ema is not None:
                ema.update(params, step)
            loss_val = float(loss.detach())
            if not torch.isfinite(loss.detach()):
                raise InputError(f"flux train: loss became {loss_val} at step {step}; lower learning_rate")
            history[step] = loss_val
            if main and (step % cfg.log_every == 0 or step == cfg.max_steps):
                ctx.log_metrics({"train_loss": loss_val, "learning_rate": float(scheduler.get_last_lr()[0]),
                                 "grad_norm": grad_norm}, step)  # one batched call per interval
            if main:
                ctx.progress(step, cfg.max_steps, f"step {step}/{cfg.max_steps}, loss {loss_val:.4f}")
            if step % cfg.checkpointing_steps == 0 or step == cfg.max_steps:
                if main:
                    ck = checkpoints.checkpoint_path(ckpt_root, step)
                    save_checkpoint(ck, named, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                                "ema": ema.shadow if ema else None},
                                    {"global_step": step, "loss": loss_val})
                    checkpoints.mark_complete(ck, step)
                    checkpoints.rotate(ckpt_root, cfg.checkpoints_total_limit)
                acc.wait_for_everyone()
            if main and step % cfg.validation_steps == 0 and step != cfg.max_steps:
                with _ema_weights(ema, params):
                    validation += _validate(cfg, meta, pipeline, acc.unwrap_model(transformer), step, out, ctx,
                                            val_cache)
        seconds = (time.perf_counter() - t0) / max(1, step - start)
    finally:
        if loader is not None:
            loader.shutdown(wait=True, cancel_futures=True)
        ds = None  # drop the dataset (and its shared memory) before its cache dir goes
        acc.wait_for_everyone()
        if acc.is_local_main_process:
            shutil.rmtree(cache, ignore_errors=True)

    trainable = sum(p.numel() for p in params)
    result = {"start_step": start, "global_step": step, "final_loss": loss_val, "trainable_parameters": trainable,
              "seconds_per_step": seconds, "weights": "", "validation_images": []}
    acc.wait_for_everyone()
    if not main:
        return result
    model = acc.unwrap_model(transformer)
    if ema is not None:
        ema.swap(params)  # export (and render the last images with) the average
    validation += _validate(cfg, meta, pipeline, model, step, out, ctx, val_cache)
    if cfg.train_mode == "lora":
        weights = out / save_lora(out, model)[0]
    else:
        model.save_pretrained(str(out / "transformer"), safe_serialization=True)
        weights = out / "transformer.safetensors"
        os.link(out / "transformer" / "diffusion_pytorch_model.safetensors", weights)  # no second copy on disk
    atomic_write_json(out / "train_config.json", {"train": cfg.model_dump(mode="json"), "precomputed": meta,
                                                  "pipeline": pipeline, "loss_history": history})
    return {**result, "weights": weights.name, "validation_images": [str(Path(p).relative_to(out)) for p in validation]}


@contextlib.contextmanager
def _ema_weights(ema: Ema | None, params: list) -> Iterator[None]:
    """The EMA weights swapped in for the block (and swapped back), or the live ones without EMA."""
    if ema is not None:
        ema.swap(params)
    try:
        yield
    finally:
        if ema is not None:
            ema.swap(params)


def _batch_loss(cfg: TrainConfig, transformer, teacher, groups: list, gen, device, scheduler_cfg: dict):  # noqa: ANN001, ANN202
    """The micro-batch's loss: one forward per same-shape group; each sample weighted so that pool 0
    (all rows, or DreamBooth's instance rows) averages to 1 and the class rows to ``prior_weight``."""
    import torch

    counts: dict[int, int] = {}
    for g in groups:
        for k in g.pools:
            counts[k] = counts.get(k, 0) + 1
    total = torch.zeros((), device=device)
    n_all = sum(counts.values())
    for g in groups:
        x0, img_ids, emb, txt_ids = (t.to(device) for t in (g.x0, g.img_ids, g.emb, g.txt_ids))
        n = x0.shape[0]
        noise = torch.randn(x0.shape, generator=gen).to(device)
        sig = losses.sample_sigmas(n, cfg.loss.weighting, gen, logit_mean=cfg.loss.logit_mean,
                                   logit_std=cfg.loss.logit_std, mode_scale=cfg.loss.mode_scale, shift=cfg.loss.shift)
        if scheduler_cfg:
            sig = losses.resolution_shift(sig, x0.shape[1], base_seq_len=scheduler_cfg["base_image_seq_len"],
                                          max_seq_len=scheduler_cfg["max_image_seq_len"],
                                          base_shift=scheduler_cfg["base_shift"], max_shift=scheduler_cfg["max_shift"])
        sig = sig.to(device)
        xt = losses.noisy_latents(x0, noise, sig)
        kw = dict(hidden_states=xt, encoder_hidden_states=emb, timestep=sig, img_ids=img_ids, txt_ids=txt_ids,
                  guidance=None, return_dict=False)
        pred = transformer(**kw)[0]
        mask = g.mask.to(device) if g.mask is not None else None
        per = losses.flow_matching_loss(pred, noise - x0, sig, base=cfg.loss.base, weighting=cfg.loss.weighting,
                                        huber_c=cfg.loss.huber_c, mask=mask)
        w = torch.tensor([(cfg.prior_weight if k == 1 else 1.0) / counts[k] for k in g.pools], device=device)
        if teacher is not None:
            with torch.no_grad():
                target = teacher(**kw)[0]
            matched = losses.masked_mean(losses.base_loss(pred, target, cfg.loss.base, cfg.loss.huber_c), mask)
            total = total + cfg.flow_weight * (w * per).sum() + cfg.distillation_weight * matched.sum() / n_all
        else:
            total = total + (w * per).sum()
    return total
