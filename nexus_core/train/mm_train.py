"""Multimodal training stages on a composed (omni) or any LLaVA-style model, as LLaVA trains them:

- ``mm_align`` — projector alignment on caption pairs: the vision tower and the LLM are frozen, only
  ``multi_modal_projector`` learns to map image features into the LLM's embedding space.
- ``mm_sft`` — visual (or audio) instruction tuning: LoRA adapters on the LLM's linear layers (never the tower's
  or the projector's), the projector trained in full beside them (peft ``modules_to_save``);
  ``train_vision_tower`` unfreezes the tower too. ``finetune: full`` trains the whole LLM instead. With
  ``kd:`` it distils a frozen multimodal ``teacher`` on the same batches (:mod:`nexus_core.train.mm_kd`).

Data: ``messages`` + ``images`` rows (:mod:`nexus_core.train.mm_data`). Before any work the stage checks
that the model takes every modality the data needs (``modality validation failed`` otherwise) and reads
every image. Training runs in ``transformers.Trainer`` under the same controller as the text stages
(:func:`nexus_core.train.control.fit`: pause/resume signals, checkpoints in the step's work dir, resume).

The audio composite (``Qwen2AudioForConditionalGeneration``, an omni section with ``audio:``) trains the
same way on ``messages`` + ``audios`` rows (:mod:`nexus_core.train.audio_data`): its ``multi_modal_projector``
aligns, LoRA goes on its ``language_model``, ``train_vision_tower`` unfreezes its ``audio_tower``; it loads
with ``AutoModelForSeq2SeqLM``, the Auto class transformers registers ``qwen2_audio`` under.

Output: the model artifact: the merged model + processor at the root (``AutoModelForImageTextToText``
/ ``AutoProcessor`` load it), ``adapter/`` for LoRA (adapters + the trained projector), config.yaml.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from nexus_core.artifacts import ArtifactRef, atomic_write_text
from nexus_core.config import PathOrName
from nexus_core.context import StepContext
from nexus_core.contract import directory, step, table
from nexus_core.contract import model as model_input
from nexus_core.errors import InputError
from nexus_core.train.audio import AudioSpec, audio_spec, is_audio_model
from nexus_core.train.audio_data import AudioCollator, audio_records, encode_audio_mm
from nexus_core.train.common import (
    StageBase,
    TrainResult,
    checkpoint_dir,
    model_dir,
    param_delta,
    param_snapshot,
    preflight,
    saved_dtype,
    trainer_kwargs,
    use_bf16,
)
from nexus_core.train.data import load_rows, need
from nexus_core.train.feature_shards import check_features, train_from_features
from nexus_core.train.launch import run_stage
from nexus_core.train.mm_data import MMCollator, encode_mm, mm_records
from nexus_core.train.mm_kd import MMKDSettings, check_teacher, trainer_class
from nexus_core.train.modalities import detect_modalities, modality_problems, needed_by_columns
from nexus_core.train.video import VideoSampling

PROJECTOR = "multi_modal_projector"


class MMStageBase(StageBase):
    """What both multimodal stages share besides the common hyper-parameters."""

    media_dir: PathOrName | None = Field(default=None, description="Folder the rows' media paths are relative "
                                         "to (default: the data file's folder, or the dataset artifact's)")
    max_skipped: float = Field(default=0.0, ge=0, le=1, description="Share of rows with bad media that may be "
                               "skipped and counted; 0: the first bad row stops the stage")
    max_audio_seconds: float = Field(default=30.0, gt=0, description="A longer audio clip is bad media (named "
                                     "row); the encoder's window (Whisper: 30 s) caps it too")
    resample_audio: bool = Field(default=True, description="Resample clips to the encoder's rate; false: "
                                 "another rate is bad media ('wrong sample rate')")
    train_vision_tower: bool = Field(default=False, description="Unfreeze the vision tower too")
    assistant_only_loss: bool = Field(default=True, description="Loss on the assistant turns only")
    video_fps: float = Field(default=1.0, gt=0, description="Video frames sampled per second of play time "
                             "(each frame is one <image> block in the prompt)")
    video_max_frames: int = Field(default=8, ge=1, description="Most frames taken from one video, spread evenly")
    video_max_seconds: float = Field(default=600.0, gt=0, description="A longer video is bad media (named row)")
    precomputed: bool = Field(default=False, description="Train from tower features precomputed into MDS shards "
                              "(the llm_train flow runs the mm features step first; needs a frozen tower)")
    features: PathOrName | None = Field(default=None, description="An existing mm features artifact (NAME@vN or "
                                        "dir) to train from; implies precomputed")

    def video_sampling(self) -> VideoSampling:
        """How this stage samples a row's videos into frames."""
        return VideoSampling(self.video_fps, self.video_max_frames, self.video_max_seconds)

    @model_validator(mode="after")
    def _supported(self) -> MMStageBase:
        if self.quantized:
            raise ValueError("finetune: qlora / load_in_4bit is not built for the multimodal stages yet")
        if self.chat_template:
            raise ValueError("chat_template: a multimodal stage renders chats with its model's processor; set "
                             "chat_template on the omni section instead")
        if (self.precomputed or self.features) and self.train_vision_tower:
            raise ValueError("precomputed: stored tower features need a frozen tower; train_vision_tower: true "
                             "trains it (turn one of them off)")
        return self


class MMAlignConfig(MMStageBase):
    """Projector alignment: only the projector trains."""

    method: Literal["mm_align"] = Field(default="mm_align", description="Stage method")
    finetune: Literal["full", "lora", "qlora"] = Field(default="full", description="Must be full: the projector's "
                                                       "own weights train, nothing else")
    learning_rate: float = Field(default=1e-3, gt=0, description="Peak learning rate (LLaVA aligns at 1e-3)")

    @model_validator(mode="after")
    def _full(self) -> MMAlignConfig:
        if self.finetune != "full":
            raise ValueError("finetune: mm_align trains the projector's full weights; set finetune: full")
        return self


class MMSFTConfig(MMStageBase):
    """Visual instruction tuning: LoRA on the LLM (or full), projector trainable."""

    method: Literal["mm_sft"] = Field(default="mm_sft", description="Stage method")
    kd: MMKDSettings | None = Field(default=None, description="Distil the 'teacher' input (a multimodal model "
                                    "with the student's processor) on each batch; none: plain instruction tuning")

    @model_validator(mode="after")
    def _kd_on_media(self) -> MMSFTConfig:
        if self.kd is not None and (self.precomputed or self.features):
            raise ValueError("kd: the teacher runs its own tower on the raw media; precomputed / features "
                             "train from stored features (turn one of them off)")
        return self


class MMResult(TrainResult):
    """A trained multimodal model."""

    trainable_params: int = 0
    total_params: int = 0
    skipped_rows: int = 0


def media_root(cfg: MMStageBase, data: ArtifactRef) -> Path:
    """Where relative media paths point: ``media_dir``, else the data file's folder (or the artifact dir)."""
    if cfg.media_dir:
        return Path(cfg.media_dir)
    return data.path.parent if data.path.is_file() else data.path


def check_modalities(model_path: Path, columns: list[str], method: str) -> None:
    """Stop before work when the data needs a modality the model lacks."""
    problems = modality_problems(needed_by_columns(columns), detect_modalities(model_path), f"model {model_path}",
                                 method)
    if problems:
        raise InputError(problems[0])


@step(area="train", kind="model", inputs={"model": model_input(description="a model with a vision tower"),
                                          "data": table(one_of=[("messages", "images"), ("messages", "audios"),
                                                                ("messages", "videos")]),
                                          "features": directory(optional=True, description="precomputed tower "
                                                                "features (mm_features)"),
                                          "teacher": model_input(optional=True, description="mm_sft kd: the "
                                                                 "teacher (same processor as the model)")})
def run_mm_train(cfg: MMAlignConfig | MMSFTConfig, *, inputs: dict[str, ArtifactRef], out_uri: str,
                 ctx: StepContext) -> MMResult:
    """Check modalities and every image, train (here or in child processes), save the model artifact."""
    base = model_dir(inputs.get("model"))
    df, where = load_rows(inputs["data"])
    check_modalities(base, df.columns, cfg.method)
    kd = cfg.kd if isinstance(cfg, MMSFTConfig) else None
    if kd is not None:
        if "features" in inputs:
            raise InputError(f"{cfg.method}: kd needs the raw media for the teacher's tower, not a 'features' input")
        check_teacher(base, model_dir(need(inputs, "teacher", "mm_sft kd"), "teacher"), cfg.method)
    elif "teacher" in inputs:
        raise InputError(f"{cfg.method}: a 'teacher' input but no kd settings (mm_sft train.kd: {{alpha, "
                         "temperature, divergence}})")
    if cfg.precomputed or cfg.features or "features" in inputs:  # rows and media come from the shards
        if "features" not in inputs:
            raise InputError(f"{cfg.method}: precomputed: true needs the 'features' input (run_mm_features; the "
                             "llm_train flow makes it)")
        skipped = int(check_features(inputs["features"], base, cfg).get("skipped_rows", 0))
        preflight(cfg)
        m = run_stage(_train, cfg, inputs, out_uri, cfg.method, ctx)
        return MMResult.from_metrics(m, method=cfg.method, trainable_params=int(m["trainable_params"]),
                                     total_params=int(m["total_params"]), skipped_rows=skipped)
    if is_audio_model(base):  # the audio sibling: clips decoded and checked instead of images
        _, skipped = audio_records(df, where, media_root(cfg, inputs["data"]), stage_audio(cfg, base), cfg.max_skipped)
        if skipped:
            ctx.info(f"{cfg.method}: skipped {skipped} of {df.height} rows with bad audio (max_skipped={cfg.max_skipped})")
        preflight(cfg)
        m = run_stage(_train, cfg, inputs, out_uri, cfg.method, ctx)
        return MMResult.from_metrics(m, method=cfg.method, trainable_params=int(m["trainable_params"]),
                                     total_params=int(m["total_params"]), skipped_rows=skipped)
    _, skipped = mm_records(df, where, media_root(cfg, inputs["data"]), cfg.max_skipped, cfg.video_sampling())
    if skipped:
        ctx.info(f"{cfg.method}: skipped {skipped} of {df.height} rows with bad media (max_skipped={cfg.max_skipped})")
    preflight(cfg)
    m = run_stage(_train, cfg, inputs, out_uri, cfg.method, ctx)
    return MMResult.from_metrics(m, method=cfg.method, trainable_params=int(m["trainable_params"]),
                                 total_params=int(m["total_params"]), skipped_rows=skipped)


def lora_targets(model) -> str:  # noqa: ANN001
    """A peft regex for the LLM's linear layers only (not the tower's, not the projector's)."""
    import torch

    if model.config.model_type == "qwen2_audio":  # Qwen2-Audio: language_model is the whole causal LM
        llm, prefix = model.language_model.model, r"^language_model\.model\."
    else:
        llm, prefix = model.model.language_model, r"^model\.language_model\."
    leaves = sorted({n.rsplit(".", 1)[-1] for n, mod in llm.named_modules() if isinstance(mod, torch.nn.Linear)})
    return rf"{prefix}.*\.({'|'.join(map(re.escape, leaves))})$"


def prepare_model(cfg: MMAlignConfig | MMSFTConfig, base: Path):  # noqa: ANN201
    """The model with the stage's trainable set: projector (always), LoRA or full LLM (mm_sft), tower."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoModelForSeq2SeqLM

    dtype = torch.bfloat16 if cfg.precision == "pure_bf16" or (cfg.adapters and use_bf16(cfg)) else torch.float32
    audio = is_audio_model(base)  # qwen2_audio is registered under AutoModelForSeq2SeqLM
    model = (AutoModelForSeq2SeqLM if audio else AutoModelForImageTextToText).from_pretrained(str(base), dtype=dtype)
    model.requires_grad_(False)
    if cfg.method == "mm_sft" and cfg.adapters:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=lora_targets(model), modules_to_save=[PROJECTOR])
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
        torch.manual_seed(cfg.seed)  # the adapters' init, whatever ran in this process before
        model = get_peft_model(model, lora)
        inner: Any = model.base_model.model
    elif audio:  # Qwen2-Audio keeps its parts at the top: projector, language_model (with lm_head)
        inner = model
        getattr(inner, PROJECTOR).requires_grad_(True)
        if cfg.method == "mm_sft":
            inner.language_model.requires_grad_(True)
    else:
        inner = model
        getattr(inner.model, PROJECTOR).requires_grad_(True)
        if cfg.method == "mm_sft":  # full: the whole LLM
            inner.model.language_model.requires_grad_(True)
            inner.lm_head.requires_grad_(True)
    if cfg.train_vision_tower:
        (inner.audio_tower if audio else inner.model.vision_tower).requires_grad_(True)
    return model


def _train(cfg: MMAlignConfig | MMSFTConfig, inputs: dict[str, ArtifactRef], out_uri: str,
           ctx: StepContext) -> dict[str, float]:
    """One process's share of the stage; rank 0 saves the artifact."""
    from transformers import AutoProcessor

    base = model_dir(inputs["model"])
    if "features" in inputs:
        return train_from_features(cfg, inputs, out_uri, ctx, base, prepare_model, save)
    if is_audio_model(base):
        return _train_audio(cfg, inputs, out_uri, ctx, base)
    df, where = load_rows(inputs["data"])
    records, _ = mm_records(df, where, media_root(cfg, inputs["data"]), cfg.max_skipped, cfg.video_sampling())
    processor = AutoProcessor.from_pretrained(str(base))
    model = prepare_model(cfg, base)
    seq = int(model.config.image_seq_length)
    rows = _encoded(records, where, lambda r: encode_mm(processor.tokenizer, r, seq, cfg.max_length,
                                                        cfg.assistant_only_loss))
    collator = MMCollator(processor.image_processor, processor.tokenizer.pad_token_id)
    return _fit_and_save(cfg, inputs, out_uri, ctx, base, model, processor, rows, collator)


def _encoded(records: list[dict], where: str, encode) -> list[dict]:  # noqa: ANN001
    """Each record encoded for training; an encoding error names its row."""
    rows = []
    for i, r in enumerate(records):
        try:
            rows.append(encode(r))
        except InputError as exc:
            raise InputError(f"{where}: row {i}: {exc}") from None
    return rows


def _fit_and_save(cfg: MMAlignConfig | MMSFTConfig, inputs: dict[str, ArtifactRef], out_uri: str,
                  ctx: StepContext, base: Path, model, processor, rows: list[dict],  # noqa: ANN001
                  collator) -> dict[str, float]:  # noqa: ANN001
    """Train the stage's Trainer on encoded ``rows``, measure what changed, and save on rank 0."""
    from datasets import Dataset
    from transformers import TrainingArguments

    from nexus_core.train.common import is_main_process
    from nexus_core.train.control import fit

    args = TrainingArguments(**trainer_kwargs(cfg, checkpoint_dir(ctx.work_dir), remove_unused_columns=False))
    trainer = _trainer_class(cfg, inputs, model)(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                                 data_collator=collator, processing_class=processor)
    before = param_snapshot(model)
    metrics = fit(trainer, cfg, ctx)
    metrics.update(param_delta(before, model))
    metrics["trainable_params"] = float(sum(t.numel() for t in before.values()))
    metrics["total_params"] = float(sum(p.numel() for p in model.parameters()))
    if is_main_process():
        save(cfg, trainer.accelerator.unwrap_model(trainer.model), processor, base, Path(out_uri))
    return metrics


def _trainer_class(cfg: MMAlignConfig | MMSFTConfig, inputs: dict[str, ArtifactRef], model) -> type:  # noqa: ANN001
    """The stage's Trainer: plain, or distilling the teacher (mm_sft with kd) in the model's dtype."""
    kd = cfg.kd if isinstance(cfg, MMSFTConfig) else None
    return trainer_class(kd, model_dir(inputs["teacher"], "teacher") if kd else None, model.dtype)


def save(cfg: MMAlignConfig | MMSFTConfig, model, processor, base: Path, out: Path) -> None:  # noqa: ANN001
    """Merged weights + processor at the root (in the base's dtype), ``adapter/`` for LoRA, config.yaml."""
    if cfg.method == "mm_sft" and cfg.adapters:
        model.save_pretrained(out / "adapter", safe_serialization=True)
        model = model.merge_and_unload()
    model.to(saved_dtype(cfg, base)).save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(
        {"method": cfg.method, "base_model": str(base), **cfg.model_dump(mode="json")}, sort_keys=False))


def stage_audio(cfg: MMStageBase, base: Path) -> AudioSpec:
    """How this stage reads clips for the audio model in ``base`` (its rate and window, the stage's limits)."""
    return audio_spec(base, cfg.max_audio_seconds, cfg.resample_audio)


def _train_audio(cfg: MMAlignConfig | MMSFTConfig, inputs: dict[str, ArtifactRef], out_uri: str,
                 ctx: StepContext, base: Path) -> dict[str, float]:
    """:func:`_train` for the audio composite: ``audios`` rows, clip tokens, ``input_features`` batches."""
    from transformers import AutoProcessor

    df, where = load_rows(inputs["data"])
    spec = stage_audio(cfg, base)
    records, _ = audio_records(df, where, media_root(cfg, inputs["data"]), spec, cfg.max_skipped)
    processor = AutoProcessor.from_pretrained(str(base))
    model = prepare_model(cfg, base)
    rows = _encoded(records, where, lambda r: encode_audio_mm(processor, r, spec, cfg.max_length,
                                                              cfg.assistant_only_loss))
    collator = AudioCollator(processor.feature_extractor, processor.tokenizer.pad_token_id, spec)
    return _fit_and_save(cfg, inputs, out_uri, ctx, base, model, processor, rows, collator)
