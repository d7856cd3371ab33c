"""Train: Flux.2 Klein transformer, LoRA or full fine-tuning, from precomputed latents and text embeddings.

Reads only the precompute artifact's MDS shards (verified against their recorded sha256) — the VAE
and text encoder are not loaded except to render validation images. Flow-matching loss with a base
loss and weighting scheme (nexus_core.flux.losses), optional DreamBooth prior preservation (each
batch: instance half + class half) and optional distillation from a frozen teacher DiT.

Checkpoints (accelerate ``save_state``) go to ``checkpoint_dir`` or, by default, the step's work dir
(``ctx.work_dir``: outside the artifact, kept when a run is killed, removed once the artifact is
published), every ``checkpointing_steps``, keeping ``checkpoints_total_limit``;
``resume_from_checkpoint: latest`` continues from the newest one, including the step count,
optimizer and batch order. The work dir is keyed by the cache key, so re-running a killed run with
the same config resumes it; to continue a *finished* run with a larger ``max_steps``, set
``checkpoint_dir`` (it is never deleted). Output:
``transformer_lora.safetensors`` (lora) or ``transformer.safetensors`` + ``transformer/`` (full),
``train_config.json``, and ``validation/step_<N>_<i>.png`` (also logged to MLflow).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from pydantic import Field

from nexus_core import checkpoints
from nexus_core.artifacts import ArtifactRef, atomic_write_json
from nexus_core.config import ConfigPath, NexusModel, PathOrName, runtime_field
from nexus_core.context import StepContext
from nexus_core.contract import directory, step
from nexus_core.errors import ConfigError, InputError
from nexus_core.flux import losses
from nexus_core.flux.device import check_dtype, resolve_device
from nexus_core.flux.mds import open_dataset, verify_shards
from nexus_core.flux.training import collate, stream_indices
from nexus_core.runner import StepResult


class LoraSettings(NexusModel):
    """LoRA adapter shape."""

    rank: int = Field(default=16, ge=1, description="LoRA rank r")
    alpha: float = Field(default=16.0, gt=0, description="LoRA alpha (scale = alpha / rank)")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the LoRA branch")
    target_modules: list[str] = Field(default=["to_q", "to_k", "to_v", "to_out.0"], description="Module names to adapt")


class LossSettings(NexusModel):
    """Flow-matching objective."""

    base: losses.BaseLoss = Field(default="mse", description="Element loss: mse | l1 | huber | logcosh")
    weighting: losses.Weighting = Field(default="none", description="none | sigma_sqrt | logit_normal | mode | cosmap")
    huber_c: float = Field(default=0.1, gt=0, description="Pseudo-Huber c")
    logit_mean: float = Field(default=0.0, description="logit_normal sampling mean")
    logit_std: float = Field(default=1.0, gt=0, description="logit_normal sampling std")
    mode_scale: float = Field(default=1.29, description="mode sampling scale")
    shift: float = Field(default=1.0, gt=0, description="Time shift of sampled sigmas (>1: more noise)")


class TrainConfig(NexusModel):
    """Everything about one Flux.2 training run."""

    pretrained_model_name_or_path: PathOrName | None = Field(
        default=None, description="Pipeline (VAE, scheduler, text encoder) for validation; a 'pipeline' input overrides")
    dit: PathOrName | None = Field(default=None, description="Transformer to train (dir with config.json or a pipeline); "
                                              "default: the pipeline's transformer/")
    train_mode: Literal["lora", "full"] = Field(default="lora", description="Train a LoRA adapter or every weight")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA shape (train_mode=lora)")
    loss: LossSettings = Field(default_factory=LossSettings, description="Loss and weighting")
    resolution: int = Field(default=512, ge=8, description="Must match the precomputed latents_<resolution>")
    latent_channels: int | None = Field(default=None, description="Expected patchified latent channels (checked)")
    latent_norm: Literal["vae", "dataset"] = Field(default="vae", description="Normalise latents with VAE bn or data stats")
    batch_size: int = Field(default=1, ge=1, description="Samples per micro-batch")
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="Micro-batches per optimizer step")
    max_steps: int = Field(default=1000, ge=1, description="Optimizer steps in total (including resumed ones)")
    learning_rate: float = Field(default=1e-4, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping norm")
    seed: int = Field(default=0, description="Seed for init, noise, sigmas and batch order")
    prior_preservation: bool = Field(default=False, description="DreamBooth: half of each batch from class images")
    prior_weight: float = Field(default=1.0, ge=0, description="Weight of the class-image loss")
    distillation: bool = Field(default=False, description="Also match a frozen teacher's prediction")
    teacher_dit: PathOrName | None = Field(default=None, description="Teacher transformer; default: a frozen copy of the start")
    flow_weight: float = Field(default=1.0, ge=0, description="Weight of the flow-matching loss when distilling")
    distillation_weight: float = Field(default=1.0, ge=0, description="Weight of the teacher-matching loss")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(default="no", description="Autocast dtype")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations to save memory")
    checkpointing_steps: int = Field(default=500, ge=1, description="Save a checkpoint every N optimizer steps")
    checkpoints_total_limit: int | None = Field(default=3, ge=1, description="Keep at most this many checkpoints")
    checkpoint_dir: ConfigPath | None = Field(default=None, description="Where checkpoints live (default: the step's work dir, "
                                                         "removed once the artifact is published)")
    resume_from_checkpoint: PathOrName | None = Field(default=None, description="'latest' or a checkpoint directory")
    validation_steps: int = Field(default=500, ge=1, description="Render validation images every N steps (and at the end)")
    validation_prompts: list[str] = Field(default_factory=list, description="Prompts of the validation images")
    validation_inference_steps: int = Field(default=20, ge=1, description="Sampler steps per validation image")
    log_every: int = runtime_field(10, "Log the loss every N steps", ge=1)
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


def checkpoint_root(cfg: TrainConfig, ctx: StepContext) -> Path:
    """Where checkpoints live: outside the artifact (its staging dir is removed on failure), in
    ``checkpoint_dir`` when set, else in the step's work dir, which a re-run of a killed run gets again."""
    return Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else ctx.work_dir / "checkpoints"


def _loadable(ref: str) -> bool:
    """A local path must exist; a hub id must be cached when the hub is off (otherwise it may download)."""
    from nexus_core.doctor import resolve_model

    if ref.startswith((".", "/", "~")) or Path(ref).exists():
        return Path(ref).expanduser().exists()
    return os.environ.get("HF_HUB_OFFLINE", "0") not in {"1", "true", "True"} or resolve_model(ref)[0]


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
        if ref and not _loadable(ref):
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
    device = resolve_device(cfg.device)
    dtype = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}[cfg.mixed_precision]
    try:
        check_dtype(device, dtype, "train.mixed_precision")
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError(problems, "flux train")
    return meta, pipeline, device  # pyright: ignore[reportReturnType] - pipeline is set whenever a problem is not raised


def _load_transformer(path: str):  # noqa: ANN202 - Flux2Transformer2DModel
    from diffusers import Flux2Transformer2DModel

    sub = "transformer" if (Path(path) / "transformer" / "config.json").is_file() else None
    return Flux2Transformer2DModel.from_pretrained(path, subfolder=sub)


def _subsets(root: Path, ds) -> list[str]:  # noqa: ANN001
    """instance/class label of every row, from the artifact's table (same order as the shards)."""
    table = root / "data.parquet"
    if table.is_file():
        import polars as pl

        subsets = pl.read_parquet(table, columns=["subset"])["subset"].to_list()
        if len(subsets) == ds.num_samples:
            return subsets
    return [ds[i]["subset"] for i in range(ds.num_samples)]  # reads every shard once


def _validate(cfg: TrainConfig, pipeline: str, transformer, step: int, out: Path, ctx: StepContext,  # noqa: ANN001
              cache: dict) -> list[str]:
    """Render the validation prompts with the current transformer; save and log the images."""
    import torch

    from nexus_core.models.flux_tiny import load_flux_pipeline

    if not cfg.validation_prompts:
        return []
    if "pipe" not in cache:  # VAE + text encoder load once per run, not once per validation
        cache["pipe"] = load_flux_pipeline(pipeline, transformer=transformer).to(transformer.device)
    pipe = cache["pipe"]
    pipe.transformer = transformer
    paths = []
    transformer.eval()
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    for i, prompt in enumerate(cfg.validation_prompts):
        # the frozen base may be in the autocast dtype while the VAE and text encoder are float32
        with torch.autocast(transformer.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            image = pipe(prompt=prompt, height=cfg.resolution, width=cfg.resolution,
                         num_inference_steps=cfg.validation_inference_steps, max_sequence_length=64,
                         generator=torch.Generator().manual_seed(cfg.seed + i)).images[0]
        path = out / "validation" / f"step_{step:06d}_{i}.png"
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
    """Train the transformer on precomputed shards; write the weights, config copy and validation images."""
    import torch
    from accelerate import Accelerator

    meta, pipeline, device = preflight(cfg, inputs)
    mds = inputs["precomputed"].path / "mds"
    verify_shards(mds)
    out = Path(out_uri)
    torch.manual_seed(cfg.seed)

    transformer = _load_transformer(cfg.dit or pipeline)
    if transformer.config.in_channels != meta["latent_channels"]:
        raise ConfigError([f"model.dit: transformer in_channels={transformer.config.in_channels} but the "
                           f"precomputed latents have {meta['latent_channels']} channels"], "flux train")
    if transformer.config.joint_attention_dim != meta["text_shape"][-1]:
        raise ConfigError([f"model.dit: joint_attention_dim={transformer.config.joint_attention_dim} but the "
                           f"precomputed text embeddings are {meta['text_shape'][-1]} wide"], "flux train")
    teacher = None
    if cfg.distillation:
        teacher = _load_transformer(cfg.teacher_dit) if cfg.teacher_dit else copy.deepcopy(transformer)
        teacher.requires_grad_(False).eval()
    if cfg.train_mode == "lora":
        from peft import LoraConfig

        transformer.requires_grad_(False)
        if cfg.mixed_precision != "no":  # frozen base weights in the autocast dtype: half the memory
            transformer.to(dtype=torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16)  # pyright: ignore[reportCallIssue] - diffusers' add_adapter is typed on the class
        transformer.add_adapter(LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha,  # pyright: ignore[reportArgumentType] - peft accepts a float alpha
                                           lora_dropout=cfg.lora.dropout, target_modules=cfg.lora.target_modules,
                                           init_lora_weights="gaussian"))
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:  # trainable weights (LoRA) stay float32 for a stable optimizer
        p.data = p.data.float()
    if not params:
        raise ConfigError([f"lora.target_modules: {cfg.lora.target_modules} matched no trainable module"])
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=device == "cpu",
                      gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    transformer, optimizer = acc.prepare(transformer, optimizer)
    if teacher is not None:
        teacher.to(acc.device)

    ckpt_root = checkpoint_root(cfg, ctx)
    start = 0
    if cfg.resume_from_checkpoint:
        path = checkpoints.latest(ckpt_root) if cfg.resume_from_checkpoint == "latest" \
            else Path(cfg.resume_from_checkpoint)
        if path is not None:
            if not (path / checkpoints.COMPLETE_MARKER).is_file():
                raise InputError(f"{path}: not a finished checkpoint (no {checkpoints.COMPLETE_MARKER})")
            acc.load_state(str(path))
            start = json.loads((path / "trainer_state.json").read_text())["global_step"]

    cache = Path(tempfile.mkdtemp(prefix="flux-train-cache-"))
    ds = open_dataset(mds, cache)
    loader = None
    try:
        subsets = _subsets(inputs["precomputed"].path, ds) if cfg.prior_preservation else []
        pools = ([[i for i, s in enumerate(subsets) if s == "instance"], [i for i, s in enumerate(subsets) if s == "class"]]
                 if cfg.prior_preservation else [list(range(ds.num_samples))])
        if cfg.prior_preservation and not all(pools):
            raise InputError(f"{mds}: prior preservation needs instance and class rows "
                             f"(found {len(pools[0])} instance, {len(pools[1])} class)")
        per_pool = cfg.batch_size // len(pools)
        step, loss_val, t0, history = start, float("nan"), time.perf_counter(), {}
        validation: list[str] = []
        val_cache: dict = {}
        transformer.train()

        def fetch(pos: int) -> tuple:
            idx = [i for k, pool in enumerate(pools) for i in stream_indices(pool, cfg.seed + 7919 * k, pos, per_pool)]
            return len(idx), collate([ds[i] for i in idx], meta, cfg.latent_norm)  # pyright: ignore[reportOptionalSubscript] - the dataset is open here

        # one batch read ahead on a thread, so shard reads and decoding overlap the forward/backward pass
        loader = ThreadPoolExecutor(1)
        ahead = loader.submit(fetch, start * cfg.gradient_accumulation_steps * per_pool)
        while step < cfg.max_steps:
            for micro in range(cfg.gradient_accumulation_steps):
                pos = (step * cfg.gradient_accumulation_steps + micro) * per_pool
                n, batch = ahead.result()
                ahead = loader.submit(fetch, pos + per_pool)
                x0, img_ids, emb, txt_ids = (t.to(acc.device) for t in batch)
                gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + pos)
                noise = torch.randn(x0.shape, generator=gen).to(acc.device)
                sig = losses.sample_sigmas(n, cfg.loss.weighting, gen, logit_mean=cfg.loss.logit_mean,
                                           logit_std=cfg.loss.logit_std, mode_scale=cfg.loss.mode_scale,
                                           shift=cfg.loss.shift).to(acc.device)
                xt = losses.noisy_latents(x0, noise, sig)
                kw = dict(hidden_states=xt, encoder_hidden_states=emb, timestep=sig, img_ids=img_ids,
                          txt_ids=txt_ids, guidance=None, return_dict=False)
                with acc.accumulate(transformer), acc.autocast():
                    pred = transformer(**kw)[0]
                    per = losses.flow_matching_loss(pred, noise - x0, sig, base=cfg.loss.base,
                                                    weighting=cfg.loss.weighting, huber_c=cfg.loss.huber_c)
                    loss = (losses.prior_preservation_loss(per, cfg.prior_weight) if cfg.prior_preservation
                            else per.mean())
                    if teacher is not None:
                        with torch.no_grad():
                            target = teacher(**kw)[0]
                        loss = losses.distillation_loss(loss, pred, target, flow_weight=cfg.flow_weight,
                                                        distillation_weight=cfg.distillation_weight,
                                                        base=cfg.loss.base, huber_c=cfg.loss.huber_c)
                    acc.backward(loss)
                    if acc.sync_gradients:
                        acc.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
            step += 1
            loss_val = float(loss.detach())
            if not torch.isfinite(loss.detach()):
                raise InputError(f"flux train: loss became {loss_val} at step {step}; lower learning_rate")
            history[step] = loss_val
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                ctx.log_metrics({"train_loss": loss_val}, step)  # one batched call per interval
            ctx.progress(step, cfg.max_steps, f"step {step}/{cfg.max_steps}, loss {loss_val:.4f}")
            if step % cfg.checkpointing_steps == 0 or step == cfg.max_steps:
                ck = checkpoints.checkpoint_path(ckpt_root, step)
                shutil.rmtree(ck, ignore_errors=True)
                acc.save_state(str(ck))
                atomic_write_json(ck / "trainer_state.json", {"global_step": step, "loss": loss_val})
                checkpoints.mark_complete(ck, step)
                checkpoints.rotate(ckpt_root, cfg.checkpoints_total_limit)
            if step % cfg.validation_steps == 0 and step != cfg.max_steps:
                validation += _validate(cfg, pipeline, acc.unwrap_model(transformer), step, out, ctx, val_cache)
        seconds = (time.perf_counter() - t0) / max(1, step - start)
    finally:
        if loader is not None:
            loader.shutdown(wait=True, cancel_futures=True)
        ds = None  # drop the dataset (and its shared memory) before its cache dir goes
        shutil.rmtree(cache, ignore_errors=True)

    model = acc.unwrap_model(transformer)
    validation += _validate(cfg, pipeline, model, step, out, ctx, val_cache)
    if cfg.train_mode == "lora":
        from diffusers import Flux2KleinPipeline
        from peft.utils import get_peft_model_state_dict

        Flux2KleinPipeline.save_lora_weights(str(out), transformer_lora_layers=get_peft_model_state_dict(model),  # pyright: ignore[reportArgumentType] - a state dict of tensors is what diffusers takes
                                             weight_name="transformer_lora.safetensors")
        weights = out / "transformer_lora.safetensors"
    else:
        model.save_pretrained(str(out / "transformer"), safe_serialization=True)
        weights = out / "transformer.safetensors"
        os.link(out / "transformer" / "diffusion_pytorch_model.safetensors", weights)  # no second copy on disk
    atomic_write_json(out / "train_config.json", {"train": cfg.model_dump(mode="json"), "precomputed": meta,
                                                  "pipeline": pipeline, "loss_history": history})
    trainable = sum(p.numel() for p in params)
    return TrainResult(start_step=start, global_step=step, final_loss=loss_val, weights=str(weights.name),
                       validation_images=[str(Path(p).relative_to(out)) for p in validation],
                       trainable_parameters=trainable, seconds_per_step=seconds,
                       metrics={"final_loss": loss_val, "global_step": step, "start_step": start,
                                "trainable_parameters": trainable, "seconds_per_step": seconds})
