"""Prune: magnitude (unstructured), structured (attention KV groups + MLP channels), or layer dropping.

Input ``model`` (an HF model artifact); optional ``calibration`` (a dataset with text) drives layer
importance and the optional recovery distillation from the unpruned model. The output is an HF
model directory; structured pruning and layer dropping really shrink it (config dims change),
magnitude pruning keeps dense shapes with zeros (sparse kernels are a runtime concern).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from nexus_core import contract  # contract.model/table: `model` and `table` are local names here
from nexus_core.artifacts import ArtifactRef, atomic_write_json
from nexus_core.compress.common import count_params, dir_bytes, load_texts, perplexity, save_model
from nexus_core.config import NexusModel
from nexus_core.context import StepContext
from nexus_core.contract import step
from nexus_core.errors import InputError, StepError
from nexus_core.models.losses import distill_kl
from nexus_core.runner import StepResult


class RecoveryConfig(NexusModel):
    """Short fine-tuning of the pruned model by distillation from the unpruned one."""

    steps: int = Field(default=0, ge=0, description="Optimiser steps (0 = no recovery)")
    lr: float = Field(default=1e-4, gt=0, description="AdamW learning rate")
    batch_size: int = Field(default=4, ge=1, description="Texts per step")
    temperature: float = Field(default=2.0, gt=0, description="Softmax temperature of the KL loss")
    max_length: int = Field(default=128, ge=8, description="Tokens per text")


class PruneConfig(NexusModel):
    """How to prune."""

    method: Literal["magnitude", "structured", "layer_drop"] = Field(description="Pruning family")
    sparsity: float = Field(default=0.5, description="Target fraction removed, strictly between 0 and 1 (magnitude: "
                                             "weights; structured: heads and channels unless set below)")
    scope: Literal["global", "layer"] = Field(default="global", description="Magnitude: rank weights globally or per layer")
    head_sparsity: float | None = Field(default=None, description="Structured: fraction of KV groups removed "
                                                          "(default: sparsity)")
    mlp_sparsity: float | None = Field(default=None, description="Structured: fraction of MLP channels removed "
                                                         "(default: sparsity)")
    drop_layers: int | None = Field(default=None, ge=1, description="Layer drop: number of blocks removed "
                                                            "(default: round(sparsity * layers))")
    calibration_column: str | None = Field(default=None, description="Text column of the calibration dataset")
    calibration_rows: int = Field(default=32, ge=1, description="Calibration texts used")
    eval_rows: int = Field(default=8, ge=1, description="Calibration texts used for the before/after perplexity")
    recovery: RecoveryConfig = Field(default_factory=RecoveryConfig, description="Optional recovery distillation")

    @model_validator(mode="after")
    def _fractions(self) -> PruneConfig:
        for key in ("sparsity", "head_sparsity", "mlp_sparsity"):
            value = getattr(self, key)
            if value is not None and not 0 < value < 1:
                raise ValueError(f"{key}: must be strictly between 0 and 1, got {value}")
        return self


class PruneResult(StepResult):
    """What pruning did."""

    method: str
    params_before: int
    params_after: int
    sparsity: float = Field(description="Fraction of zero weights in the decoder Linears after pruning")
    dropped_layers: list[int] = Field(default_factory=list)
    recovery_losses: list[float] = Field(default_factory=list)


@step(area="compress", kind="model",
      inputs={"model": contract.model(description="HF causal LM to prune"),
              "calibration": contract.table(optional=True, description="Texts: calibration_column, text, "
                                                              "input+output or prompt+completion")})
def run_prune(cfg: PruneConfig, *, inputs: dict[str, ArtifactRef], out_uri: str, ctx: StepContext) -> PruneResult:
    """Prune ``inputs['model']`` and save the result as an HF model dir under ``out_uri``."""
    from nexus_core.models.io import load_causal_lm

    model, tokenizer = load_causal_lm(inputs["model"].path, int8=False)
    texts: list[str] = []
    if "calibration" in inputs:
        texts = load_texts(inputs["calibration"], cfg.calibration_column, cfg.calibration_rows)
    elif cfg.method == "layer_drop" or cfg.recovery.steps:
        why = "layer importance" if cfg.method == "layer_drop" else "recovery distillation"
        raise InputError(f"prune: calibration data missing: method={cfg.method} / recovery needs a 'calibration' "
                         f"dataset input for {why}")
    teacher = copy.deepcopy(model) if cfg.recovery.steps else None
    before = count_params(model)
    eval_texts = texts[: cfg.eval_rows]
    metrics: dict[str, float] = {}
    if eval_texts:
        metrics["ppl_before"] = perplexity(model, tokenizer, eval_texts)

    masks = None
    dropped: list[int] = []
    if cfg.method == "magnitude":
        masks = magnitude_prune(model, cfg.sparsity, cfg.scope)
    elif cfg.method == "structured":
        kept_kv = prune_attention_heads(model, cfg.head_sparsity or cfg.sparsity)
        inter = prune_mlp_channels(model, cfg.mlp_sparsity or cfg.sparsity)
        metrics.update({"kv_heads": kept_kv, "intermediate_size": inter})
    else:
        scores = layer_importance(model, tokenizer, texts)
        n_drop = cfg.drop_layers or max(1, round(cfg.sparsity * len(scores)))
        if n_drop >= len(scores):
            raise InputError(f"prune: drop_layers={n_drop} would remove all {len(scores)} layers")
        dropped = sorted(sorted(range(len(scores)), key=lambda i: scores[i])[:n_drop])
        drop_layers(model, dropped)
        metrics.update({f"importance_layer_{i}": s for i, s in enumerate(scores)})

    losses: list[float] = []
    if teacher is not None:
        r = cfg.recovery
        losses = recover_by_distillation(model, teacher, tokenizer, texts, steps=r.steps, lr=r.lr,
                                         temperature=r.temperature, batch_size=r.batch_size,
                                         max_length=r.max_length, masks=masks)
        metrics["recovery_final_loss"] = losses[-1]
    if eval_texts:
        metrics["ppl_after"] = perplexity(model, tokenizer, eval_texts)

    out = Path(out_uri)
    save_model(model, tokenizer, out)
    after = count_params(model)
    sparsity = sparsity_of(model)
    atomic_write_json(out / "pruning.json", {"method": cfg.method, "params_before": before, "params_after": after,
                                             "sparsity": sparsity, "dropped_layers": dropped})
    metrics.update({"params_before": before, "params_after": after, "sparsity": sparsity,
                    "size_mb": dir_bytes(out, "*.safetensors") / 1e6})
    return PruneResult(method=cfg.method, params_before=before, params_after=after, sparsity=sparsity,
                       dropped_layers=dropped, recovery_losses=losses, metrics=metrics)


# ---------------------------------------------------------------- pruning surgery


def decoder_layers(model: Any) -> Any:
    """The ``nn.ModuleList`` of decoder blocks, or a StepError naming the unsupported architecture."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(layers[0], "self_attn") or not hasattr(layers[0], "mlp"):
        raise StepError(f"{type(model).__name__}: pruning supports Llama-style decoders (model.layers[i].self_attn/mlp)")
    return layers


def prunable_linears(model: Any) -> dict[str, Any]:
    """Linear layers inside the decoder blocks (embeddings and the tied LM head are left alone)."""
    import torch

    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


# -- unstructured -----------------------------------------------------------------------------------
def magnitude_prune(model: Any, sparsity: float, scope: str = "global") -> dict[str, Any]:
    """Zero the smallest-magnitude weights of the decoder Linears; return the keep-masks by module name.

    ``global`` ranks all weights together (layers with small weights lose more); ``layer`` prunes each
    Linear to the same sparsity.
    """
    import torch

    linears = prunable_linears(model)
    masks: dict[str, Any] = {}
    with torch.no_grad():
        if scope == "global":
            flat = torch.cat([m.weight.detach().abs().flatten() for m in linears.values()])
            k = int(sparsity * flat.numel())
            threshold = torch.kthvalue(flat, max(k, 1)).values if k else flat.min() - 1
            for name, m in linears.items():
                masks[name] = m.weight.abs() > threshold
        else:
            for name, m in linears.items():
                w = m.weight.abs().flatten()
                k = int(sparsity * w.numel())
                threshold = torch.kthvalue(w, max(k, 1)).values if k else w.min() - 1
                masks[name] = m.weight.abs() > threshold
        apply_masks(model, masks)
    return masks


def apply_masks(model: Any, masks: dict[str, Any]) -> None:
    """Re-zero pruned weights (after an optimiser step during recovery)."""
    import torch

    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            mods[name].weight.mul_(mask)


def sparsity_of(model: Any) -> float:
    """Fraction of exactly-zero weights in the decoder Linears."""
    linears = prunable_linears(model)
    total = sum(m.weight.numel() for m in linears.values())
    zeros = sum(int((m.weight == 0).sum()) for m in linears.values())
    return zeros / total if total else 0.0


# -- structured -------------------------------------------------------------------------------------
def _slice_linear(lin: Any, rows: Any = None, cols: Any = None) -> Any:
    import torch

    w = lin.weight.detach()
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            new.bias.copy_(lin.bias.detach()[rows] if rows is not None else lin.bias.detach())
    return new


def prune_mlp_channels(model: Any, sparsity: float) -> int:
    """Remove the least important MLP channels in every block; return the new intermediate size.

    Importance of channel c: ``|gate[c]| * |up[c]| * |down[:, c]|`` (weight norms). Every block keeps the
    same count because HF configs hold one ``intermediate_size``.
    """
    import torch

    layers = decoder_layers(model)
    inter = model.config.intermediate_size
    keep = max(1, int(round(inter * (1 - sparsity))))
    for layer in layers:
        mlp = layer.mlp
        score = mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1) * mlp.down_proj.weight.norm(dim=0)
        idx = torch.sort(torch.topk(score, keep).indices).values
        mlp.gate_proj = _slice_linear(mlp.gate_proj, rows=idx)
        mlp.up_proj = _slice_linear(mlp.up_proj, rows=idx)
        mlp.down_proj = _slice_linear(mlp.down_proj, cols=idx)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = keep
    model.config.intermediate_size = keep
    return keep


def prune_attention_heads(model: Any, sparsity: float) -> int:
    """Remove whole key/value groups (a KV head with its query heads) in every block; return KV heads kept.

    Grouped-query attention shares one K/V head between several query heads, so the group is the
    smallest unit that keeps the layout valid. Importance: squared weight norms of the group's
    q/k/v rows and o columns.
    """
    import torch

    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    group = heads // kv
    keep = max(1, int(round(kv * (1 - sparsity))))
    if keep == kv:
        return kv
    for layer in decoder_layers(model):
        attn = layer.self_attn
        q = attn.q_proj.weight.view(kv, group * hd, -1)
        k = attn.k_proj.weight.view(kv, hd, -1)
        v = attn.v_proj.weight.view(kv, hd, -1)
        o = attn.o_proj.weight.view(-1, kv, group * hd)
        score = q.pow(2).sum((1, 2)) + k.pow(2).sum((1, 2)) + v.pow(2).sum((1, 2)) + o.pow(2).sum((0, 2))
        groups = torch.sort(torch.topk(score, keep).indices).values
        q_rows = torch.cat([torch.arange(g * group * hd, (g + 1) * group * hd) for g in groups.tolist()])
        kv_rows = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in groups.tolist()])
        attn.q_proj = _slice_linear(attn.q_proj, rows=q_rows)
        attn.k_proj = _slice_linear(attn.k_proj, rows=kv_rows)
        attn.v_proj = _slice_linear(attn.v_proj, rows=kv_rows)
        attn.o_proj = _slice_linear(attn.o_proj, cols=q_rows)
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = keep * group, keep, hd
    return keep


def layer_importance(model: Any, tokenizer: Any, texts: list[str], max_length: int = 128) -> list[float]:
    """Block influence of each decoder layer: ``1 - cos(input, output)`` of its hidden states, averaged.

    A layer that barely changes the residual stream (low influence) is the cheapest to drop.
    """
    import torch

    layers = decoder_layers(model)
    sums = [0.0] * len(layers)
    counts = [0] * len(layers)
    hooks = []

    def hook(i: int):  # noqa: ANN202
        def fn(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            sums[i] += float((1 - cos).sum())
            counts[i] += cos.numel()
        return fn

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(hook(i), with_kwargs=True))
    try:
        with torch.no_grad():
            for text in texts:
                enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
                model(**enc)
    finally:
        for h in hooks:
            h.remove()
    return [s / max(c, 1) for s, c in zip(sums, counts, strict=True)]


def drop_layers(model: Any, drop: list[int]) -> None:
    """Remove decoder blocks by index and fix the config (layer count, per-layer type lists)."""
    import torch

    layers = decoder_layers(model)
    keep = [i for i in range(len(layers)) if i not in set(drop)]
    if not keep:
        raise StepError("layer dropping would remove every layer")
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(model.model.layers):  # KV-cache slots are indexed by layer_idx
        layer.self_attn.layer_idx = new_idx  # pyright: ignore[reportArgumentType] - a plain int attribute
    model.config.num_hidden_layers = len(keep)
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]


# -- recovery and quality ---------------------------------------------------------------------------
def recover_by_distillation(student: Any, teacher: Any, tokenizer: Any, texts: list[str], *, steps: int,
                            lr: float = 1e-4, temperature: float = 2.0, batch_size: int = 4, max_length: int = 128,
                            masks: dict[str, Any] | None = None, seed: int = 0) -> list[float]:
    """Short KL(teacher ‖ student) fine-tuning of a pruned model on ``texts``; returns the loss curve.

    ``masks`` (from magnitude pruning) are re-applied after every step so sparsity survives training.
    """
    import torch

    torch.manual_seed(seed)
    student.train()
    teacher.eval()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr)
    losses = []
    pad_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        for step in range(steps):
            batch = [texts[(step * batch_size + j) % len(texts)] for j in range(batch_size)]
            enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            with torch.no_grad():
                t_logits = teacher(**enc).logits / temperature
            s_logits = student(**enc).logits / temperature
            kl = distill_kl(torch.log_softmax(s_logits, -1), torch.log_softmax(t_logits, -1))
            mask = enc["attention_mask"].float()
            loss = (kl * mask).sum() / mask.sum() * temperature**2
            opt.zero_grad()
            loss.backward()
            opt.step()
            if masks:
                apply_masks(student, masks)
            losses.append(loss.detach().item())
    finally:
        tokenizer.padding_side = pad_side
        student.eval()
    return losses
