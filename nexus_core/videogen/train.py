"""Video projector train: teach the heads of :mod:`nexus_core.videogen.projector` to condition SVD from text.

The UNet, VAE and LLM are frozen; only the projector trains (AdamW, clipped), on the tensors the video
precompute step stored (the VAE and CLIP encoder never run here). Per step, for a batch of videos:

* ``edm``: the EDM denoising loss of the frozen UNet (:func:`nexus_core.videogen.svd.edm_loss`:
  sigmas log-normal(``p_mean``, ``p_std``), SVD's c_in / c_noise / c_skip / c_out, weight
  (s^2 + 1) / s^2) with ``encoder_hidden_states`` = the embedding head's output, the stored
  ``cond_latent`` concatenated to every frame (``first_frame: predicted``: SVD trained on true first
  frames, so the head is taught the embedding that goes with them) or zeros (``first_frame: zeros``:
  the embedding alone must carry the video, as at render time), and the stored fps / motion bucket /
  noise-augmentation time ids;
* ``align_weight`` x the scale-free MSE from the embedding head to the first frame's CLIP image
  embedding (the space the UNet already reads);
* ``frame_weight`` x the scale-free MSE from the first-frame head to ``cond_latent`` (predicted only).

Checkpoints (projector + optimizer) go to the work dir every ``checkpointing_steps``; a re-run of a
killed run resumes from the newest (``max_steps``/``checkpointing_steps`` are resume-neutral).
Output: ``projector.safetensors`` + ``projector_config.json``, ``captions.txt`` (the training captions)
and ``train_config.json`` (config, loss history).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from nexus_core import checkpoints
from nexus_core.artifacts import ArtifactRef, atomic_write_json
from nexus_core.config import RESUME_NEUTRAL, NexusModel, PathOrName, runtime_field
from nexus_core.context import StepContext
from nexus_core.contract import directory, model, step
from nexus_core.errors import ConfigError, InputError
from nexus_core.flux.device import check_dtype, resolve_device
from nexus_core.flux.training import load_checkpoint, save_checkpoint
from nexus_core.runner import StepResult
from nexus_core.videogen import projector as pj
from nexus_core.videogen import svd

META = "video_meta.json"


class VideoProjectorTrainConfig(NexusModel):
    """One video projector training run."""

    pretrained_model_name_or_path: PathOrName | None = Field(
        default=None, description="SVD pipeline (its UNet); a 'pipeline' input overrides")
    llm_layers: list[int] = Field(default=[-1], min_length=1, description="LLM hidden states concatenated per "
                                  "token, then mean-pooled (0 = embeddings, -1 = last layer)")
    hidden_size: int = Field(default=2048, ge=1, description="Inner width of each head")
    first_frame: Literal["predicted", "zeros"] = Field(default="predicted", description="First-frame latent at "
                                                       "render time: a second head's prediction, or zeros")
    max_sequence_length: int = Field(default=77, ge=1, description="Prompt tokens read (truncated beyond)")
    chat_template: bool = Field(default=True, description="Wrap prompts as a user turn of the LLM's chat template")
    align_weight: float = Field(default=0.1, ge=0, description="Weight of the scale-free MSE to the first frame's "
                                "CLIP image embedding (0: off)")
    frame_weight: float = Field(default=1.0, ge=0, description="Weight of the first-frame head's scale-free MSE")
    p_mean: float = Field(default=0.7, description="Mean of log sigma (EDM training noise levels)")
    p_std: float = Field(default=1.6, gt=0, description="Std of log sigma")
    batch_size: int = Field(default=1, ge=1, description="Videos per optimizer step")
    max_steps: int = Field(default=1000, ge=1, description="Optimizer steps in total (including resumed ones)",
                           json_schema_extra=RESUME_NEUTRAL)
    learning_rate: float = Field(default=1e-4, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(default=0.0, ge=0, description="Decoupled weight decay")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping norm")
    model_dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="Dtype of the frozen "
                                                                  "UNet and LLM (the projector trains in float32)")
    gradient_checkpointing: bool = Field(default=False, description="Recompute UNet activations to save memory")
    seed: int = Field(default=0, description="Seed for init, noise, sigmas and batch order")
    checkpointing_steps: int = Field(default=500, ge=1, description="Checkpoint every N steps (in the work dir)",
                                     json_schema_extra=RESUME_NEUTRAL)
    log_every: int = runtime_field(10, "Log losses and gradient norm every N steps", ge=1)
    device: str = Field(default="auto", description="auto | cpu | cuda[:N]")


class VideoProjectorTrainResult(StepResult):
    """What the run did."""

    start_step: int
    global_step: int
    final_loss: float
    final_edm_loss: float
    trainable_parameters: int
    weight_change: float = Field(description="Largest change of a projector weight in this run (0: it did not learn)")
    seconds_per_step: float


def load_precomputed(root: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(meta, rows with their tensors) of a video precompute artifact; InputError naming what is wrong."""
    import polars as pl
    from safetensors.torch import load_file

    for name in (META, "data.parquet"):
        if not (root / name).is_file():
            raise InputError(f"{root / name}: missing; {root} is not a video precompute artifact")
    meta = json.loads((root / META).read_text(encoding="utf-8"))
    rows = []
    for n, r in enumerate(pl.read_parquet(root / "data.parquet").to_dicts()):
        path = root / r["file"]
        if not path.is_file():
            raise InputError(f"{root / 'data.parquet'} row {n}: {path} missing")
        t = load_file(str(path))
        if list(t["latents"].shape) != [meta["num_frames"], *meta["latent_shape"]]:
            raise InputError(f"{path}: latents {list(t['latents'].shape)}, expected "
                             f"{[meta['num_frames'], *meta['latent_shape']]} ({META})")
        rows.append({**r, **t})
    return meta, rows


@step(area="models", kind="model",
      inputs={"precomputed": directory(description="The video precompute artifact (latents/ + video_meta.json)"),
              "llm": model(description="The frozen causal LM whose hidden states are projected"),
              "pipeline": directory(optional=True, description="SVD pipeline: the frozen UNet")})
def run_video_projector_train(cfg: VideoProjectorTrainConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                              ctx: StepContext) -> VideoProjectorTrainResult:
    """Train the projector heads against the frozen UNet; write them and their spec."""
    import torch
    from diffusers import UNetSpatioTemporalConditionModel

    from nexus_core.flux.projector import check_layers, llm_hidden_size
    from nexus_core.models.io import load_causal_lm

    root = inputs["precomputed"].path
    meta, rows = load_precomputed(root)
    pipeline = str(inputs["pipeline"].path) if "pipeline" in inputs else cfg.pretrained_model_name_or_path
    if not pipeline:
        raise ConfigError(["projector.pretrained_model_name_or_path: missing (the UNet comes from the pipeline)"])
    svd.check_pipeline_dir(pipeline)
    device = resolve_device(cfg.device)
    check_dtype(device, cfg.model_dtype, "projector.model_dtype")
    dtype = getattr(torch, cfg.model_dtype)
    torch.manual_seed(cfg.seed)
    unet = UNetSpatioTemporalConditionModel.from_pretrained(pipeline, subfolder="unet", torch_dtype=dtype)
    unet.to(device)  # pyright: ignore[reportArgumentType] - ModelMixin.to takes a device string
    unet.requires_grad_(False)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()  # diffusers checkpoints only in training mode; the frozen UNet has no dropout
    else:
        unet.eval()
    dim, latent_c = unet.config["cross_attention_dim"], unet.config["out_channels"]
    if dim != meta["embed_dim"] or latent_c != meta["latent_shape"][0]:
        raise InputError(f"{root / META}: embeddings {meta['embed_dim']} wide and {meta['latent_shape'][0]} latent "
                         f"channels, but the UNet of {pipeline} reads {dim} and {latent_c} (precomputed with "
                         "another pipeline?)")
    llm, tokenizer = load_causal_lm(inputs["llm"].path, dtype=cfg.model_dtype)
    llm.to(device).requires_grad_(False)
    check_layers(llm, cfg.llm_layers, "projector.llm_layers")
    spec = pj.VideoProjectorSpec(
        llm_layers=cfg.llm_layers, llm_hidden_size=llm_hidden_size(llm), hidden_size=cfg.hidden_size,
        cross_attention_dim=dim, latent_shape=meta["latent_shape"], first_frame=cfg.first_frame,
        max_sequence_length=cfg.max_sequence_length, chat_template=cfg.chat_template,
        video={k: meta[k] for k in ("num_frames", "height", "width", "fps", "motion_bucket_id", "noise_aug_strength")},
        llm={"uri": inputs["llm"].uri, "digest": inputs["llm"].digest},
        pipeline={"uri": inputs["pipeline"].uri, "digest": inputs["pipeline"].digest} if "pipeline" in inputs
        else {"uri": pipeline, "digest": None})
    projector = pj.build_projector(spec).to(device)
    named = dict(projector.named_parameters())
    initial = {k: v.detach().clone() for k, v in named.items()}
    optimizer = torch.optim.AdamW(projector.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    ckpt_root, start = ctx.work_dir / "checkpoints", 0
    found = checkpoints.latest(ckpt_root)
    if found is not None:  # a killed run with the same cache key: continue it
        state, trainer_state = load_checkpoint(found, named)
        optimizer.load_state_dict(state["optimizer"])
        start = int(trainer_state["global_step"])
        if start >= cfg.max_steps:
            raise InputError(f"{found}: a checkpoint at step {start}, but projector.max_steps is {cfg.max_steps}; "
                             "raise max_steps to continue it")
        ctx.info(f"resumed from {found} at step {start}")

    def rel_mse(a: Any, b: Any) -> Any:  # scale-free: CLIP embeddings and latents have their own scales
        dims = tuple(range(1, b.ndim))
        return (((a - b) ** 2).mean(dim=dims) / (b ** 2).mean(dim=dims).clamp_min(1e-8)).mean()

    history: dict[int, float] = {}
    step, loss_val, edm_val = start, float("nan"), float("nan")
    t0 = time.perf_counter()
    projector.train()
    while step < cfg.max_steps:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed + step // len(rows)))
        pick = [rows[int(order[(step * cfg.batch_size + k) % len(rows)])] for k in range(cfg.batch_size)]
        x0 = torch.stack([r["latents"] for r in pick]).to(device)
        cond = torch.stack([r["cond_latent"] for r in pick]).to(device)
        clip = torch.stack([r["image_embeds"] for r in pick]).to(device)
        embeds, frame = pj.project(llm, tokenizer, projector, spec, [r["caption"] for r in pick])
        sigma = svd.sample_sigmas(len(pick), cfg.p_mean, cfg.p_std, gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        ids = svd.time_ids(meta["fps"], meta["motion_bucket_id"], meta["noise_aug_strength"], len(pick)).to(device)
        given = cond if cfg.first_frame == "predicted" else torch.zeros_like(cond)
        edm = svd.edm_loss(unet, x0, given, embeds, ids, sigma, noise).mean()
        loss = edm + cfg.align_weight * rel_mse(embeds[:, 0], clip)
        if cfg.first_frame == "predicted":
            loss = loss + cfg.frame_weight * rel_mse(frame, cond)
        if not torch.isfinite(loss.detach()):
            raise InputError(f"projector train: loss became {float(loss)} at step {step + 1}; lower learning_rate")
        optimizer.zero_grad()
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(projector.parameters(), cfg.max_grad_norm))
        optimizer.step()
        step += 1
        loss_val, edm_val = float(loss.detach()), float(edm.detach())
        history[step] = loss_val
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            ctx.log_metrics({"train_loss": loss_val, "edm_loss": edm_val, "grad_norm": grad_norm}, step)
        ctx.progress(step, cfg.max_steps, f"step {step}/{cfg.max_steps}, loss {loss_val:.4f}")
        if step % cfg.checkpointing_steps == 0 and step < cfg.max_steps:
            ck = checkpoints.checkpoint_path(ckpt_root, step)
            save_checkpoint(ck, named, {"optimizer": optimizer.state_dict()}, {"global_step": step, "loss": loss_val})
            checkpoints.mark_complete(ck, step)
            checkpoints.rotate(ckpt_root, 2)
    seconds = (time.perf_counter() - t0) / max(1, step - start)

    out = Path(out_uri)
    out.mkdir(parents=True, exist_ok=True)
    projector.eval()
    pj.save_projector(out, projector, spec)
    (out / pj.CAPTIONS).write_text("".join(f"{c}\n" for c in sorted({r["caption"] for r in rows})), encoding="utf-8")
    atomic_write_json(out / "train_config.json", {"projector": cfg.model_dump(mode="json"), "precomputed": meta,
                                                  "pipeline": pipeline, "loss_history": history})
    trainable = sum(p.numel() for p in named.values())
    change = max(float((p.detach() - initial[k]).abs().max()) for k, p in named.items())
    return VideoProjectorTrainResult(
        start_step=start, global_step=step, final_loss=loss_val, final_edm_loss=edm_val,
        trainable_parameters=trainable, weight_change=change, seconds_per_step=seconds,
        metrics={"final_loss": loss_val, "final_edm_loss": edm_val, "trainable_parameters": trainable,
                 "weight_change": change, "seconds_per_step": seconds})
