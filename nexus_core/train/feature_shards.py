"""Training an mm stage from precomputed tower features (the shards :mod:`nexus_core.train.mm_features`
writes): the tower's identity (``tower_digest``), the checks a stage makes before training from shards,
the shards as a map-style dataset, the collator, and the Trainer whose loss puts the projected features
on the media tokens (``inputs_embeds``), the same arithmetic as the models' own forward.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nexus_core.artifacts import ArtifactRef
from nexus_core.context import StepContext
from nexus_core.errors import InputError
from nexus_core.flux.mds import open_dataset, verify_shards
from nexus_core.train.audio import is_audio_model
from nexus_core.train.common import (
    checkpoint_dir,
    is_main_process,
    param_delta,
    param_snapshot,
    trainer_kwargs,
)
from nexus_core.train.mm_data import IGNORE

META = "mm_features.json"
# Settings a tokenized row (and the media it holds) depends on: shards and stage must agree on them.
ROW_KEYS = ("max_length", "assistant_only_loss", "max_skipped", "max_audio_seconds", "resample_audio", "video_fps",
            "video_max_frames", "video_max_seconds")


def tower_digest(model_dir: Path) -> str:
    """sha256 of the tower a model's projector reads: its saved tensors, the feature selection settings
    and the preprocessor config (what turns a file into the tower's input)."""
    import torch
    from safetensors import safe_open

    conf = json.loads((model_dir / "config.json").read_text())
    part = "audio_tower" if is_audio_model(model_dir) else "vision_tower"
    h = hashlib.sha256()
    sel = {k: conf.get(k) for k in ("vision_feature_layer", "vision_feature_select_strategy")}
    pre = model_dir / "preprocessor_config.json"
    h.update(json.dumps([part, sel, json.loads(pre.read_text()) if pre.is_file() else None], sort_keys=True).encode())
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise InputError(f"{model_dir}: no *.safetensors weights to identify the {part} by")
    n = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in sorted(k for k in st.keys() if part in k.split(".")):  # noqa: SIM118 - safe_open has no iter
                t = st.get_tensor(key).contiguous()
                h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
                n += 1
    if not n:
        raise InputError(f"{model_dir}: no {part} weights in its safetensors")
    return h.hexdigest()


def check_features(features: ArtifactRef, model_dir: Path, stage: Any) -> dict[str, Any]:
    """The shards' meta, once they fit the stage: a frozen tower, the same tower, the same row settings."""
    if stage.train_vision_tower:
        raise InputError(f"{stage.method}: precomputed features need a frozen tower; train_vision_tower: true "
                         "trains it (turn one of them off)")
    path = features.path / META
    if not path.is_file():
        raise InputError(f"features {features.path}: not an mm features artifact (no {META})")
    meta = json.loads(path.read_text())
    have = tower_digest(model_dir)
    if meta["tower_digest"] != have:
        raise InputError(f"features {features.path} were made with tower {meta['tower_digest'][:16]} (model "
                         f"{meta['model']}), but model {model_dir} has tower {have[:16]}: precompute them again "
                         "with this model")
    for k in ROW_KEYS:
        if meta.get(k) != getattr(stage, k):
            raise InputError(f"{stage.method}.{k}: {getattr(stage, k)!r}, but features {features.path} were made "
                             f"with {k}={meta.get(k)!r}")
    return meta


class FeatureRows:
    """The shards as a map-style dataset (so the Trainer samples rows exactly as from an in-memory list)."""

    def __init__(self, root: Path, cache_dir: Path):
        verify_shards(root)
        self.ds = open_dataset(root, cache_dir)

    def __len__(self) -> int:
        return int(self.ds.num_samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.ds[int(i)]
        return {"input_ids": s["input_ids"], "labels": s["labels"], "features": s["features"]}


class FeatureCollator:
    """Pads ids/labels as the media collators do and stacks the rows' features (``media_features``)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The batch: ``input_ids``, ``labels``, ``attention_mask`` (right padding), ``media_features``."""
        import numpy as np
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(np.array(r["input_ids"]))
            labels[i, :n] = torch.tensor(np.array(r["labels"]))
            mask[i, :n] = 1
        feats = torch.from_numpy(np.concatenate([np.array(r["features"], np.float32) for r in rows]))
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "media_features": feats}


def merge_features(model: Any, input_ids: Any, features: Any) -> Any:
    """``inputs_embeds`` with the projected features on the media tokens (the models' own merge)."""
    from peft import PeftModel

    inner: Any = model.get_base_model() if isinstance(model, PeftModel) else model
    audio = inner.config.model_type == "qwen2_audio"
    projector = inner.multi_modal_projector if audio else inner.model.multi_modal_projector
    token = inner.config.audio_token_id if audio else inner.config.image_token_id
    embeds = model.get_input_embeddings()(input_ids)
    spots = input_ids == token
    if int(spots.sum()) != features.shape[0]:
        raise InputError(f"mm features: {int(spots.sum())} media tokens in the batch but {features.shape[0]} stored "
                         "feature rows (shards and tokenizer disagree)")
    if features.shape[0]:
        weight = next(projector.parameters())
        projected = projector(features.to(weight.device, weight.dtype))
        embeds = embeds.masked_scatter(spots.unsqueeze(-1).expand_as(embeds), projected.to(embeds.dtype))
    return embeds


def feature_trainer_class() -> type:
    """A ``transformers.Trainer`` whose loss takes ``media_features`` instead of media (imported lazily)."""
    from transformers import Trainer

    class FeatureTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001, ANN202
            inputs = dict(inputs)
            embeds = merge_features(self.accelerator.unwrap_model(model), inputs.pop("input_ids"),
                                    inputs.pop("media_features"))
            return super().compute_loss(model, {**inputs, "inputs_embeds": embeds}, return_outputs, num_items_in_batch)

    return FeatureTrainer


def train_from_features(cfg: Any, inputs: dict[str, ArtifactRef], out_uri: str, ctx: StepContext, base: Path,
                        prepare: Callable[[Any, Path], Any], save: Callable[..., None]) -> dict[str, float]:
    """The stage's training on stored features: the model as the stage prepares it (the tower loaded but
    never run), rows and features from the shards; ``save`` writes the artifact as the stage does."""
    from transformers import AutoProcessor, TrainingArguments

    from nexus_core.train.control import fit

    check_features(inputs["features"], base, cfg)
    processor = AutoProcessor.from_pretrained(str(base))
    model = prepare(cfg, base)
    cache = Path(tempfile.mkdtemp(prefix="mds-cache-", dir=ctx.work_dir))
    rows = FeatureRows(inputs["features"].path / "mds", cache)
    args = TrainingArguments(**trainer_kwargs(cfg, checkpoint_dir(ctx.work_dir), remove_unused_columns=False))
    trainer = feature_trainer_class()(model=model, args=args, train_dataset=rows,
                                      data_collator=FeatureCollator(processor.tokenizer.pad_token_id),
                                      processing_class=processor)
    before = param_snapshot(model)
    try:
        metrics = fit(trainer, cfg, ctx)
    finally:
        del rows
        shutil.rmtree(cache, ignore_errors=True)
    metrics.update(param_delta(before, model))
    metrics["trainable_params"] = float(sum(t.numel() for t in before.values()))
    metrics["total_params"] = float(sum(p.numel() for p in model.parameters()))
    if is_main_process():
        save(cfg, trainer.accelerator.unwrap_model(trainer.model), processor, base, Path(out_uri))
    return metrics
