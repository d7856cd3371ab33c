"""Prune: magnitude (unstructured), structured (attention KV groups + MLP channels), or layer dropping.

Input ``model`` (an HF model artifact); optional ``calibration`` (a dataset with text) drives layer
importance and the optional recovery distillation from the unpruned model. The output is an HF
model directory; structured pruning and layer dropping really shrink it (config dims change),
magnitude pruning keeps dense shapes with zeros (sparse kernels are a runtime concern).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from nexus_core.artifacts import ArtifactRef, atomic_write_json
from nexus_core.compress_lib import (
    count_params,
    dir_bytes,
    drop_layers,
    layer_importance,
    load_texts,
    magnitude_prune,
    perplexity,
    prune_attention_heads,
    prune_mlp_channels,
    recover_by_distillation,
    save_model,
    sparsity_of,
)
from nexus_core.config import NexusModel
from nexus_core.errors import InputError
from nexus_core.runner import StepResult
from nexus_core.serve.engine import check_model_dir


class RecoveryConfig(NexusModel):
    """Short fine-tuning of the pruned model by distillation from the unpruned one."""

    steps: int = Field(0, ge=0, description="Optimiser steps (0 = no recovery)")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate")
    batch_size: int = Field(4, ge=1, description="Texts per step")
    temperature: float = Field(2.0, gt=0, description="Softmax temperature of the KL loss")
    max_length: int = Field(128, ge=8, description="Tokens per text")


class PruneConfig(NexusModel):
    """How to prune."""

    method: Literal["magnitude", "structured", "layer_drop"] = Field(description="Pruning family")
    sparsity: float = Field(0.5, description="Target fraction removed, strictly between 0 and 1 (magnitude: "
                                             "weights; structured: heads and channels unless set below)")
    scope: Literal["global", "layer"] = Field("global", description="Magnitude: rank weights globally or per layer")
    head_sparsity: float | None = Field(None, description="Structured: fraction of KV groups removed "
                                                          "(default: sparsity)")
    mlp_sparsity: float | None = Field(None, description="Structured: fraction of MLP channels removed "
                                                         "(default: sparsity)")
    drop_layers: int | None = Field(None, ge=1, description="Layer drop: number of blocks removed "
                                                            "(default: round(sparsity * layers))")
    calibration_column: str | None = Field(None, description="Text column of the calibration dataset")
    calibration_rows: int = Field(32, ge=1, description="Calibration texts used")
    eval_rows: int = Field(8, ge=1, description="Calibration texts used for the before/after perplexity")
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


def run_prune(cfg: PruneConfig, *, inputs: dict[str, ArtifactRef], out_uri: str) -> PruneResult:
    """Prune ``inputs['model']`` and save the result as an HF model dir under ``out_uri``."""
    from nexus_core.models.tiny import load_llm

    if "model" not in inputs:
        raise InputError("prune: needs a 'model' input")
    check_model_dir(inputs["model"].uri)
    model, tokenizer = load_llm(inputs["model"].uri)
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
