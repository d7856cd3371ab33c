"""Projector train: teach a small MLP to turn a frozen LLM's hidden states into Flux.2 Klein conditioning.

Design (image generation driven by an LLM, the DiT and the LLM frozen):

* The LLM reads each caption (its chat template, padded to the precompute's ``max_sequence_length``
  tokens); the hidden states of ``llm_layers`` go through the projector
  (:mod:`nexus_core.flux.projector`) to a sequence shaped like Klein's ``prompt_embeds``
  ``(L, joint_attention_dim)``, with the pipeline's own ``text_ids``.
* The objective is the flux train step's flow-matching loss (:mod:`nexus_core.flux.losses`: base
  loss, weighting, time shift) of the frozen DiT given those embeddings, on the latents the flux
  precompute step stored -- so the VAE and Klein's text encoder never run here. Batches come from
  one aspect-ratio bucket at a time (:class:`nexus_core.flux.training.BatchPlan`, ``repeats``
  honoured) and are collated by :func:`nexus_core.flux.training.collate`.
* ``align_weight`` adds a cheap alignment term: the MSE between the projected embeddings and the
  precomputed ``text_embeds`` of the real text encoder, divided by their mean square (scale-free,
  since Qwen3 hidden states are large). It starts the projector in the space the DiT already reads;
  with two tokenizers it is positional, a prior -- the flow-matching loss is what is optimised.
* Only the projector trains (AdamW, clipped); checkpoints (projector + optimizer state) go to the
  step's work dir every ``checkpointing_steps``, and a re-run of a killed run resumes from the newest
  (``max_steps`` and ``checkpointing_steps`` are resume-neutral: a re-run with more steps resumes too).

Output: ``projector.safetensors`` + ``projector_config.json`` (the LLM and pipeline by URI and digest),
``captions.txt`` (the training captions, so renders can say which prompts are new),
``train_config.json`` (config, loss history) and ``validation/step_<N>_<i>.png`` for
``validation_prompts``, rendered at the end through the pipeline with the projected embeddings.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from nexus_core import checkpoints
from nexus_core.artifacts import ArtifactRef, atomic_write_json
from nexus_core.config import RESUME_NEUTRAL, NexusModel, PathOrName, runtime_field
from nexus_core.context import StepContext
from nexus_core.contract import directory, model, step
from nexus_core.errors import ConfigError, InputError
from nexus_core.flux import losses
from nexus_core.flux import projector as pj
from nexus_core.flux.device import check_dtype, resolve_device
from nexus_core.flux.mds import open_dataset, verify_shards
from nexus_core.flux.training import BatchPlan, collate, load_checkpoint, save_checkpoint
from nexus_core.runner import StepResult


class ProjectorTrainConfig(NexusModel):
    """One projector training run."""

    pretrained_model_name_or_path: PathOrName | None = Field(
        default=None, description="Pipeline (DiT, and VAE for validation); a 'pipeline' input overrides")
    llm_layers: list[int] = Field(default=[-1], min_length=1, description="LLM hidden states concatenated per "
                                  "token (0 = embeddings, -1 = last layer)")
    hidden_size: int = Field(default=2048, ge=1, description="Inner width of the projector MLP")
    chat_template: bool = Field(default=True, description="Wrap captions as a user turn of the LLM's chat template "
                                "(as Klein does with Qwen3), when the tokenizer has one")
    align_weight: float = Field(default=0.1, ge=0, description="Weight of the scale-free MSE to the precomputed "
                                "text_embeds (0: flow-matching loss only)")
    loss_base: losses.BaseLoss = Field(default="mse", description="Flow-matching element loss: mse | l1 | huber | logcosh")
    weighting: losses.Weighting = Field(default="logit_normal", description="Sigma sampling/weighting scheme")
    shift: float = Field(default=1.0, gt=0, description="Time shift of sampled sigmas (>1: more noise)")
    latent_norm: Literal["vae", "dataset"] = Field(default="vae", description="Normalise latents with VAE bn or data stats")
    batch_size: int = Field(default=4, ge=1, description="Samples per optimizer step")
    max_steps: int = Field(default=1000, ge=1, description="Optimizer steps in total (including resumed ones)",
                           json_schema_extra=RESUME_NEUTRAL)
    learning_rate: float = Field(default=1e-4, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(default=0.0, ge=0, description="Decoupled weight decay")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping norm")
    model_dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="Dtype of the frozen "
                                                                  "DiT and LLM (the projector trains in float32)")
    gradient_checkpointing: bool = Field(default=False, description="Recompute DiT activations to save memory")
    seed: int = Field(default=0, description="Seed for init, noise, sigmas and batch order")
    checkpointing_steps: int = Field(default=500, ge=1, description="Checkpoint every N steps (in the work dir)",
                                     json_schema_extra=RESUME_NEUTRAL)
    validation_prompts: list[str] = Field(default_factory=list, description="Prompts rendered at the end")
    validation_inference_steps: int = Field(default=20, ge=1, description="Sampler steps per validation image")
    validation_guidance_scale: float = Field(default=4.0, ge=0, description="Classifier-free guidance (>1 on)")
    log_every: int = runtime_field(10, "Log losses and gradient norm every N steps", ge=1)
    device: str = Field(default="auto", description="auto | cpu | cuda[:N]")


class ProjectorTrainResult(StepResult):
    """What the run did."""

    start_step: int
    global_step: int
    final_loss: float
    final_flow_loss: float
    final_align_loss: float
    trainable_parameters: int
    weight_change: float = Field(description="Largest change of a projector weight in this run (0: it did not learn)")
    seconds_per_step: float
    validation_images: list[str]


def _rows(root: Path, n: int) -> tuple[list[str], list[int], list[str]]:
    """bucket, repeats and caption of every row, from the precompute's table (same order as the shards)."""
    import polars as pl

    table = root / "data.parquet"
    if not table.is_file():
        raise InputError(f"{table}: missing; {root} is not a flux precompute artifact")
    df = pl.read_parquet(table)
    if df.height != n:
        raise InputError(f"{table}: {df.height} rows but the shards hold {n}")
    return df["bucket"].to_list(), [max(1, int(r)) for r in df["repeats"].to_list()], df["caption"].to_list()


def _shape_groups(rows: list[dict[str, Any]], column: str) -> list[list[dict[str, Any]]]:
    """Rows split by latent shape, in order (one DiT forward each; BatchPlan batches are one bucket)."""
    by: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(tuple(r[column].shape), []).append(r)
    return list(by.values())


@step(area="models", kind="model",
      inputs={"precomputed": directory(description="The flux precompute artifact (mds/ + flux_meta.json)"),
              "llm": model(description="The frozen causal LM whose hidden states are projected"),
              "pipeline": directory(optional=True, description="Klein pipeline: the frozen DiT (+ VAE for validation)")})
def run_projector_train(cfg: ProjectorTrainConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                        ctx: StepContext) -> ProjectorTrainResult:
    """Train the projector on the precomputed latents with the DiT and LLM frozen; write it and its spec."""
    import torch
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    from nexus_core.models.io import load_causal_lm

    root = inputs["precomputed"].path
    if not (root / "flux_meta.json").is_file():
        raise InputError(f"{root / 'flux_meta.json'}: missing; {root} is not a flux precompute artifact")
    meta = json.loads((root / "flux_meta.json").read_text(encoding="utf-8"))
    pipeline = str(inputs["pipeline"].path) if "pipeline" in inputs else cfg.pretrained_model_name_or_path
    if not pipeline:
        raise ConfigError(["projector.pretrained_model_name_or_path: missing (the DiT comes from the pipeline)"])
    device = resolve_device(cfg.device)
    check_dtype(device, cfg.model_dtype, "projector.model_dtype")
    dtype = getattr(torch, cfg.model_dtype)
    mds = root / "mds"
    verify_shards(mds)
    torch.manual_seed(cfg.seed)

    sub = "transformer" if (Path(pipeline) / "transformer" / "config.json").is_file() or not Path(pipeline).exists() \
        else None
    dit = Flux2Transformer2DModel.from_pretrained(pipeline, subfolder=sub, torch_dtype=dtype)
    dit.to(device)  # pyright: ignore[reportArgumentType] - ModelMixin.to takes a device string
    dit.requires_grad_(False)
    if cfg.gradient_checkpointing:
        dit.enable_gradient_checkpointing()
        dit.train()  # diffusers checkpoints only in training mode; the frozen DiT has no dropout
    else:
        dit.eval()
    seq_len, width = meta["text_shape"]
    joint = dit.config["joint_attention_dim"]
    if joint != width:
        raise InputError(f"{root}: text_embeds are {width} wide but the DiT's joint_attention_dim is "
                         f"{joint} (precomputed with another pipeline?)")
    llm, tokenizer = load_causal_lm(inputs["llm"].path, dtype=cfg.model_dtype)
    llm.to(device).requires_grad_(False)
    pj.check_layers(llm, cfg.llm_layers, "projector.llm_layers")
    spec = pj.ProjectorSpec(
        llm_layers=cfg.llm_layers, llm_hidden_size=pj.llm_hidden_size(llm), hidden_size=cfg.hidden_size,
        joint_attention_dim=width, max_sequence_length=seq_len, chat_template=cfg.chat_template,
        llm={"uri": inputs["llm"].uri, "digest": inputs["llm"].digest},
        pipeline={"uri": inputs["pipeline"].uri, "digest": inputs["pipeline"].digest} if "pipeline" in inputs
        else {"uri": pipeline, "digest": None})
    projector = pj.build_projector(spec).to(device)
    named = dict(projector.named_parameters())
    initial = {k: v.detach().clone() for k, v in named.items()}
    optimizer = torch.optim.AdamW(projector.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    ckpt_root = ctx.work_dir / "checkpoints"
    start = 0
    found = checkpoints.latest(ckpt_root)
    if found is not None:  # a killed run with the same cache key: continue it
        state, trainer_state = load_checkpoint(found, named)
        optimizer.load_state_dict(state["optimizer"])
        start = int(trainer_state["global_step"])
        if start >= cfg.max_steps:
            raise InputError(f"{found}: a checkpoint at step {start}, but projector.max_steps is {cfg.max_steps}; "
                             "raise max_steps to continue it")
        ctx.info(f"resumed from {found} at step {start}")

    cache = ctx.work_dir / f"stream-cache-{uuid.uuid4().hex[:8]}"
    ds = open_dataset(mds, cache)
    col = meta["latent_column"]
    history: dict[int, float] = {}
    step, loss_val, flow_val, align_val = start, float("nan"), float("nan"), float("nan")
    t0 = time.perf_counter()
    try:
        buckets, repeats, captions = _rows(root, ds.num_samples)
        pool = [i for i in range(ds.num_samples) for _ in range(repeats[i])]
        plan = BatchPlan([pool], buckets, cfg.batch_size, cfg.seed)
        projector.train()
        while step < cfg.max_steps:
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            batch = [ds[i] for i, _ in plan.batch(step)]
            flow, align, n_all = torch.zeros((), device=device), torch.zeros((), device=device), len(batch)
            for rows in _shape_groups(batch, col):
                g = collate(rows, meta, cfg.latent_norm)[0]
                x0, img_ids = g.x0.to(device), g.img_ids.to(device)
                emb = pj.project(llm, tokenizer, projector, spec, [r["caption"] for r in rows])
                txt_ids = Flux2KleinPipeline._prepare_text_ids(emb).to(device)  # as the pipeline will at render time
                noise = torch.randn(x0.shape, generator=gen).to(device)
                sig = losses.sample_sigmas(len(rows), cfg.weighting, gen, shift=cfg.shift).to(device)
                xt = losses.noisy_latents(x0, noise, sig)
                pred = dit(hidden_states=xt.to(dtype), encoder_hidden_states=emb.to(dtype), timestep=sig.to(dtype),
                           img_ids=img_ids, txt_ids=txt_ids, guidance=None, return_dict=False)[0]
                per = losses.flow_matching_loss(pred, noise - x0, sig, base=cfg.loss_base, weighting=cfg.weighting)
                flow = flow + per.sum() / n_all
                target = g.emb.to(device)
                rel = ((emb - target) ** 2).mean(dim=(1, 2)) / (target ** 2).mean(dim=(1, 2)).clamp_min(1e-8)
                align = align + rel.sum() / n_all
            loss = flow + cfg.align_weight * align
            if not torch.isfinite(loss.detach()):
                raise InputError(f"projector train: loss became {float(loss)} at step {step + 1}; lower learning_rate")
            optimizer.zero_grad()
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(projector.parameters(), cfg.max_grad_norm))
            optimizer.step()
            step += 1
            loss_val, flow_val, align_val = float(loss.detach()), float(flow.detach()), float(align.detach())
            history[step] = loss_val
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                ctx.log_metrics({"train_loss": loss_val, "flow_loss": flow_val, "align_loss": align_val,
                                 "grad_norm": grad_norm}, step)
            ctx.progress(step, cfg.max_steps, f"step {step}/{cfg.max_steps}, loss {loss_val:.4f}")
            if step % cfg.checkpointing_steps == 0 and step < cfg.max_steps:
                ck = checkpoints.checkpoint_path(ckpt_root, step)
                save_checkpoint(ck, named, {"optimizer": optimizer.state_dict()}, {"global_step": step, "loss": loss_val})
                checkpoints.mark_complete(ck, step)
                checkpoints.rotate(ckpt_root, 2)
        seconds = (time.perf_counter() - t0) / max(1, step - start)
    finally:
        ds = None  # drop the dataset (and its shared memory) before its cache dir goes
        shutil.rmtree(cache, ignore_errors=True)

    out = Path(out_uri)
    out.mkdir(parents=True, exist_ok=True)
    projector.eval()
    pj.save_projector(out, projector, spec)
    (out / pj.CAPTIONS).write_text("".join(f"{c}\n" for c in sorted(set(captions))), encoding="utf-8")
    validation = _validate(cfg, meta, pipeline, dit, llm, tokenizer, projector, spec, step, out, ctx)
    atomic_write_json(out / "train_config.json", {"projector": cfg.model_dump(mode="json"), "precomputed": meta,
                                                  "pipeline": pipeline, "loss_history": history})
    trainable = sum(p.numel() for p in named.values())
    change = max(float((p.detach() - initial[k]).abs().max()) for k, p in named.items())
    return ProjectorTrainResult(
        start_step=start, global_step=step, final_loss=loss_val, final_flow_loss=flow_val, final_align_loss=align_val,
        trainable_parameters=trainable, weight_change=change, seconds_per_step=seconds, validation_images=validation,
        metrics={"final_loss": loss_val, "final_flow_loss": flow_val, "final_align_loss": align_val,
                 "trainable_parameters": trainable, "weight_change": change, "seconds_per_step": seconds})


def _validate(cfg: ProjectorTrainConfig, meta: dict, pipeline: str, dit: Any, llm: Any, tokenizer: Any,
              projector: Any, spec: pj.ProjectorSpec, step: int, out: Path, ctx: StepContext) -> list[str]:
    """Render the validation prompts through the pipeline (its VAE and scheduler, the trained DiT in
    memory) with the projected embeddings; save and log the images; paths relative to ``out``."""
    if not cfg.validation_prompts:
        return []
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(pipeline, transformer=dit, text_encoder=None, tokenizer=None,
                                              torch_dtype=dit.dtype).to(dit.device)
    pipe.set_progress_bar_config(disable=True)
    dit.eval()
    paths = []
    for i, prompt in enumerate(cfg.validation_prompts):
        image = pj.render(pipe, llm, tokenizer, projector, spec, prompt, height=meta["resolution"],
                          width=meta["resolution"], steps=cfg.validation_inference_steps,
                          guidance_scale=cfg.validation_guidance_scale, negative_prompt="", seed=cfg.seed + i)[0]
        path = out / "validation" / f"step_{step:06d}_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        ctx.log_file(path, f"validation/step_{step:06d}")
        paths.append(str(path.relative_to(out)))
    return paths
