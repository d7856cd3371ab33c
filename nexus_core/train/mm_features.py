"""Precomputed tower features for the multimodal stages, in MDS shards (as flux precomputes latents).

When the tower is frozen (``mm_align``; ``mm_sft`` without ``train_vision_tower``) its output for a row
never changes, so ``run_mm_features`` runs it once over the dataset and writes, per row, the tokenized
row (``input_ids``, ``labels``, exactly as the stage encodes it) and the tower output the projector
consumes (``features``: one ``(tokens, dim)`` block per image / video frame / clip, stacked in row order)
into MDS shards with recorded sha256. The stage then trains from them (``precomputed: true`` or
``features: <artifact>``): it embeds ``input_ids``, runs only the projector on the stored features and
scatters them onto the media tokens, the same arithmetic as the model's own forward, so the loss is the
on-the-fly loss for the same rows and seed (a test holds it to fp tolerance).

Which tower output (read off transformers 4.57):
- **LLaVA** (``LlavaModel.get_image_features``): the vision tower's ``hidden_states[vision_feature_layer]``
  (a list of layers: concatenated on the last axis), without the first token when
  ``vision_feature_select_strategy`` is ``default`` (a CLS token); the composed SigLIP models use
  ``full``, every patch. The image processor's ``pixel_values`` go in, as the collator makes them.
- **Qwen2-Audio** (its ``forward``): ``audio_tower(input_features, attention_mask=<padding mask>)
  .last_hidden_state``, each clip cut to its ``_get_feat_extract_output_lengths`` tokens.

The features are the tower's deterministic (eval-mode) output. The on-the-fly path runs the frozen tower
in training mode: equal when the tower has no dropout / layerdrop (SigLIP and Whisper checkpoints ship
0.0; a tower with either on is refused here, naming the setting).

Identity: ``tower_digest`` (:mod:`nexus_core.train.feature_shards`, which also trains from the shards) hashes the tower's saved tensors (names, dtypes, bytes), the feature selection
settings and the preprocessor config; it is stored in ``mm_features.json`` and a stage whose model has
another tower is refused, naming both digests and models. The tokenized rows depend on the stage's
``max_length``, ``assistant_only_loss`` and media settings; a mismatch is refused, naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from nexus_core.artifacts import ArtifactRef, atomic_write_json
from nexus_core.config import NexusModel, PathOrName
from nexus_core.context import StepContext
from nexus_core.contract import model as model_input
from nexus_core.contract import step, table
from nexus_core.errors import InputError
from nexus_core.flux.mds import write_mds
from nexus_core.runner import StepResult
from nexus_core.train.audio import audio_features, audio_spec, is_audio_model, load_audio
from nexus_core.train.audio_data import audio_records, encode_audio_mm
from nexus_core.train.data import load_rows
from nexus_core.train.feature_shards import META, ROW_KEYS, tower_digest
from nexus_core.train.mm_data import encode_mm, mm_records
from nexus_core.train.video import VideoSampling, load_visuals


class MMFeaturesConfig(NexusModel):
    """How the stage's rows are read and encoded (its own settings), and how features are stored."""

    media_dir: PathOrName | None = Field(default=None, description="Folder the rows' media paths are relative to")
    max_skipped: float = Field(default=0.0, ge=0, le=1, description="Share of bad-media rows skipped and counted")
    max_audio_seconds: float = Field(default=30.0, gt=0, description="Longest clip")
    resample_audio: bool = Field(default=True, description="Resample clips to the encoder's rate")
    video_fps: float = Field(default=1.0, gt=0, description="Video frames sampled per second")
    video_max_frames: int = Field(default=8, ge=1, description="Most frames from one video")
    video_max_seconds: float = Field(default=600.0, gt=0, description="Longest video")
    max_length: int = Field(default=512, ge=8, description="Longest tokenized row (as the stage's)")
    assistant_only_loss: bool = Field(default=True, description="Loss on the assistant turns only (as the stage's)")
    batch_size: int = Field(default=8, ge=1, description="Rows whose media go through the tower together")
    save_dtype: Literal["float32", "float16"] = Field(default="float32", description="Dtype of the stored features "
                                                      "(float32: the on-the-fly loss to fp tolerance)")
    shard_size_limit: int = Field(default=1 << 26, ge=1024, description="Bytes per MDS shard")


class MMFeaturesResult(StepResult):
    """What was precomputed."""

    tower_digest: str
    modality: str
    feature_dim: int
    media: int = Field(description="Images, frames and clips run through the tower")
    skipped_rows: int = 0


def features_config(stage: Any, **overrides: Any) -> MMFeaturesConfig:
    """The precompute config of an ``mm_align`` / ``mm_sft`` stage: its data settings, nothing else (so
    a learning-rate change reuses the shards)."""
    keys = set(MMFeaturesConfig.model_fields) - {"batch_size", "save_dtype", "shard_size_limit"}
    return MMFeaturesConfig(**{k: getattr(stage, k) for k in keys}, **overrides)


def _check_deterministic(model: Any, audio: bool) -> None:
    conf = model.config.audio_config if audio else model.config.vision_config
    noisy = {k: getattr(conf, k, 0.0) for k in ("dropout", "attention_dropout", "encoder_layerdrop")}
    on = {k: v for k, v in noisy.items() if v}
    if on:
        raise InputError(f"mm features: the tower has {', '.join(f'{k}={v}' for k, v in on.items())}; frozen, it still "
                         "trains stochastically, so stored features would not match its training-mode output")


def _vision_features(model: Any, pixels: Any) -> Any:
    """What ``LlavaModel.get_image_features`` feeds its projector (module docstring)."""
    import torch

    conf = model.config
    layer, strategy = conf.vision_feature_layer, conf.vision_feature_select_strategy
    out = model.model.vision_tower(pixels.to(model.dtype), output_hidden_states=True)
    pool = [out.hidden_states[i] for i in ([layer] if isinstance(layer, int) else layer)]
    if strategy == "default":
        pool = [hs[:, 1:] for hs in pool]
    return torch.cat(pool, dim=-1)


def _audio_features(model: Any, feats: dict[str, Any]) -> list[Any]:
    """What ``Qwen2AudioForConditionalGeneration.forward`` feeds its projector, per clip (unpadded)."""
    import torch

    tower = model.audio_tower
    x, mask = feats["input_features"], feats["feature_attention_mask"]
    lengths, out_lengths = tower._get_feat_extract_output_lengths(mask.sum(-1))
    b, _, mel = x.shape
    width = (mel - 2) // 2 + 1
    pad = torch.arange(width, dtype=lengths.dtype)[None, :].expand(b, width) >= lengths[:, None]
    attn_ = pad.view(b, 1, 1, width).expand(b, 1, width, width)
    attn = attn_.to(dtype=tower.conv1.weight.dtype)
    attn[attn_] = float("-inf")
    hs = tower(x.to(tower.conv1.weight.dtype), attention_mask=attn).last_hidden_state
    return [hs[i, : int(n)] for i, n in enumerate(out_lengths)]


@step(area="train", kind="dataset", inputs={
    "model": model_input(description="the model whose frozen tower makes the features"),
    "data": table(one_of=[("messages", "images"), ("messages", "audios"), ("messages", "videos")])})
def run_mm_features(cfg: MMFeaturesConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                    ctx: StepContext) -> MMFeaturesResult:
    """Run the tower once over every row's media; write tokenized rows + features as MDS shards."""
    import numpy as np
    import torch
    from transformers import AutoModelForImageTextToText, AutoModelForSeq2SeqLM, AutoProcessor

    base = inputs["model"].path
    data = inputs["data"]
    root = Path(cfg.media_dir) if cfg.media_dir else (data.path.parent if data.path.is_file() else data.path)
    df, where = load_rows(data)
    audio = is_audio_model(base)
    processor = AutoProcessor.from_pretrained(str(base))
    if audio:
        spec = audio_spec(base, cfg.max_audio_seconds, cfg.resample_audio)
        records, skipped = audio_records(df, where, root, spec, cfg.max_skipped)
        model = AutoModelForSeq2SeqLM.from_pretrained(str(base))
    else:
        sampling = VideoSampling(cfg.video_fps, cfg.video_max_frames, cfg.video_max_seconds)
        records, skipped = mm_records(df, where, root, cfg.max_skipped, sampling)
        model = AutoModelForImageTextToText.from_pretrained(str(base))
    _check_deterministic(model, audio)
    model.eval()
    rows: list[dict[str, Any]] = []
    for i, r in enumerate(records):
        try:
            rows.append(encode_audio_mm(processor, r, spec, cfg.max_length, cfg.assistant_only_loss) if audio
                        else encode_mm(processor.tokenizer, r, int(model.config.image_seq_length), cfg.max_length,
                                       cfg.assistant_only_loss))
        except InputError as exc:
            raise InputError(f"{where}: row {i}: {exc}") from None
    key = "audios" if audio else "images"
    dtype = np.float16 if cfg.save_dtype == "float16" else np.float32
    out_rows, media, dim = [], 0, 0
    for b in range(0, len(rows), cfg.batch_size):
        batch = rows[b:b + cfg.batch_size]
        files = [f for r in batch for f in r[key]]
        blocks: list[Any] = []
        if files:
            with torch.no_grad():
                if audio:
                    blocks = _audio_features(model, audio_features(processor.feature_extractor,
                                                                   [load_audio(Path(f), spec) for f in files]))
                else:
                    pixels = processor.image_processor(images=load_visuals(files), return_tensors="pt")["pixel_values"]
                    blocks = list(_vision_features(model, pixels))
        dim = dim or (int(blocks[0].shape[-1]) if blocks else 0)
        k = 0
        for r in batch:
            mine = blocks[k:k + len(r[key])]
            k += len(r[key])
            feats = (torch.cat(mine).float().numpy() if mine else np.zeros((0, dim), np.float32)).astype(dtype)
            out_rows.append({"input_ids": np.asarray(r["input_ids"], np.int64),
                             "labels": np.asarray(r["labels"], np.int64), "features": feats, "media": len(mine)})
        media += len(files)
        ctx.progress(min(b + cfg.batch_size, len(rows)), len(rows), f"{media} media through the tower")
    out = Path(out_uri)
    write_mds(out / "mds", {"input_ids": "ndarray", "labels": "ndarray", "features": "ndarray", "media": "int"},
              out_rows, size_limit=cfg.shard_size_limit)
    digest = tower_digest(base)
    modality = "audio" if audio else "vision"
    atomic_write_json(out / META, {"tower_digest": digest, "model": str(base), "model_type": model.config.model_type,
                                   "modality": modality, "feature_dim": dim, "rows": len(out_rows), "media": media,
                                   "skipped_rows": skipped, "save_dtype": cfg.save_dtype,
                                   **{k: getattr(cfg, k) for k in ROW_KEYS}})
    ctx.info(f"mm features: {media} {key} of {len(out_rows)} rows through the {modality} tower ({dim}-dim)")
    return MMFeaturesResult(rows=len(out_rows), tower_digest=digest, modality=modality, feature_dim=dim, media=media,
                            skipped_rows=skipped, metrics={"media": float(media), "skipped_rows": float(skipped)})

