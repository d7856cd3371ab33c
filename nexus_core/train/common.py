"""What every training stage shares: the common config, pre-flight checks, checkpoints in the step's
work dir, TrainingArguments, model loading (full / LoRA / QLoRA) and saving the model artifact.

Stages use transformers / trl / peft directly; this module only holds the pieces that would
otherwise be copied seven times.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import Field, model_validator

from nexus_core.artifacts import ArtifactRef, atomic_write_text
from nexus_core.config import RESUME_NEUTRAL, ConfigPath, NexusModel, PathOrName, runtime_field
from nexus_core.costs import Cost
from nexus_core.errors import InputError, StepError
from nexus_core.runner import StepResult
from nexus_core.train.backends import backend_problems, model_kwargs

logger = logging.getLogger(__name__)


class LoraSpec(NexusModel):
    """LoRA adapter shape (peft.LoraConfig)."""

    r: int = Field(default=8, ge=1, description="Adapter rank")
    alpha: int = Field(default=16, ge=1, description="LoRA alpha (scale = alpha / r)")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the adapter input")
    target_modules: list[str] | str = Field(default="all-linear", description="Modules to adapt, or 'all-linear'")


class CheckpointSpec(NexusModel):
    """How often to checkpoint and how many checkpoints to keep."""

    save_steps: int = Field(default=50, ge=1, description="Write a checkpoint every N optimizer steps")
    save_total_limit: int = Field(default=2, ge=1, description="Keep at most this many checkpoints (older ones are "
                                  "deleted only once the newest is marked complete); all go once the model is published")


class ControlSpec(NexusModel):
    """Training controller knobs (signals are always on; see nexus_core.train.control)."""

    cooldown_every: int = Field(default=0, ge=0, description="Sleep every N steps (0 = never), e.g. for shared hosts")
    cooldown_seconds: float = Field(default=0.0, ge=0, description="How long each cooldown sleeps")
    gpu_max_temp_c: int = Field(default=85, description="Pause when any GPU is hotter than this (NVML)")
    gpu_resume_temp_c: int = Field(default=75, description="Resume once every GPU is at or below this")
    gpu_check_every: int = Field(default=10, ge=1, description="Read GPU temperatures every N steps")


class StageBase(NexusModel):
    """Hyper-parameters every method shares. Method configs add their own fields."""

    finetune: Literal["full", "lora", "qlora"] = Field(
        default="lora", description="full: all weights; lora: adapters; qlora: adapters on a 4-bit base (GPU)")
    load_in_4bit: bool = Field(default=False, description="Load the base in 4-bit (bitsandbytes); implied by qlora")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="Adapter shape for lora/qlora")
    max_steps: int = Field(default=-1, description="Optimizer steps; -1 trains for `epochs` instead",
                           json_schema_extra=RESUME_NEUTRAL)
    epochs: float = Field(default=1.0, gt=0, description="Passes over the data when max_steps is -1",
                          json_schema_extra=RESUME_NEUTRAL)
    learning_rate: float = Field(default=2e-4, gt=0, description="Peak learning rate")
    lr_scheduler: str = Field(default="linear", description="transformers scheduler name")
    warmup_ratio: float = Field(default=0.0, ge=0, le=1, description="Share of steps spent warming up")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay")
    batch_size: int = Field(default=4, ge=1, description="Per-device batch size")
    grad_accum: int = Field(default=1, ge=1, description="Gradient accumulation steps")
    max_length: int = Field(default=512, ge=8, description="Longest tokenized sequence (longer ones are truncated)")
    precision: Literal["auto", "fp32", "bf16", "fp16", "pure_bf16"] = Field(
        default="auto", description="Weights stay fp32 (the master copy the optimizer updates) under bf16/fp16 "
                                    "autocast; auto: bf16 autocast on a GPU that has it, else fp32; pure_bf16: "
                                    "weights and optimizer state in bf16 (half the memory; updates below bf16's "
                                    "resolution are lost, so a warning is logged)")
    gradient_checkpointing: bool = Field(default=False, description="Trade compute for activation memory "
                                         "(non-reentrant; with LoRA the inputs' gradients are enabled)")
    chat_template: PathOrName | None = Field(
        default=None, description="Chat template to set or override: a name under configs/chat_templates/ "
                                  "(chatml, qwen2.5, llama3) or a .jinja file; none: the model's own")
    seed: int = Field(default=0, description="Seed for weights init of new heads, shuffling and dropout")
    # Runtime fields (how a stage runs, not what it produces) stay out of the cache key, so changing
    # them reuses a finished model and finds the same work dir's checkpoints.
    logging_steps: int = runtime_field(1, "Log loss/lr/grad-norm every N steps", ge=1)
    # Resume-neutral fields (RESUME_NEUTRAL: max_steps, epochs, num_processes, checkpoint) change the
    # result but not whether checkpoints apply: left out of the work dir's key, so a killed run
    # re-started with more steps or processes continues from its checkpoints.
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpointing",
                                       json_schema_extra=RESUME_NEUTRAL)
    resume_from: ConfigPath | None = Field(
        default=None, description="Start from this checkpoint (a checkpoint-N dir of a stage of the same method, or "
                                  "a checkpoints dir: its newest complete one) instead of step 0; the stage's own "
                                  "newer checkpoints win after a kill")
    control: ControlSpec = Field(default_factory=ControlSpec, description="Pause/cooldown/GPU guard",
                                 json_schema_extra={"nexus_runtime": True})
    num_processes: int = Field(default=1, ge=1, description="Data-parallel processes per node (>1 launches "
                               "accelerate); a multi-node job (NEXUS_NNODES) runs this many on every node",
                               json_schema_extra=RESUME_NEUTRAL)
    isolate: bool = runtime_field(False, "Train in a child process even with one process: signal control "
                                         "under Prefect worker threads, memory returned when done")
    distributed: Literal["ddp", "fsdp"] = Field(default="ddp", description="Strategy when num_processes > 1: "
                                                "shorthand for accelerate_config ddp|fsdp (accelerate_config wins)")
    accelerate_config: PathOrName | None = Field(
        default=None, description="accelerate config file of a multi-process launch: a name under "
                                  "configs/accelerate/ (ddp, fsdp, deepspeed_zero2, deepspeed_zero3) or a YAML "
                                  "path; none: the file named by `distributed`. num_processes still comes from the "
                                  "stage, precision from `precision`")
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2", "flex_attention"] = Field(
        default="auto", description="Attention kernel of the trained model (from_pretrained's attn_implementation); "
                                    "auto: transformers' choice (sdpa where supported); flash_attention_2 needs a "
                                    "GPU and flash_attn (and keeps packed samples apart)",
        json_schema_extra=RESUME_NEUTRAL)
    liger_kernel: bool = Field(default=False, description="Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, "
                               "fused linear cross-entropy): less activation memory; needs a GPU and liger-kernel",
                               json_schema_extra=RESUME_NEUTRAL)

    @model_validator(mode="after")
    def _compatible(self) -> StageBase:
        if self.finetune == "full" and self.load_in_4bit:
            raise ValueError("load_in_4bit: QLoRA (a 4-bit base) trains LoRA adapters; it cannot be combined "
                             "with finetune=full")
        return self

    @property
    def quantized(self) -> bool:
        """True when the base is loaded in 4-bit (QLoRA)."""
        return self.finetune == "qlora" or self.load_in_4bit

    @property
    def adapters(self) -> bool:
        """True when the stage trains LoRA adapters rather than all weights."""
        return self.finetune in ("lora", "qlora")


# ---------------------------------------------------------------- pre-flight


def cuda_available() -> bool:
    """Whether a CUDA GPU is usable here."""
    import torch

    return torch.cuda.is_available()


def model_dir(ref: ArtifactRef | None, role: str = "model") -> Path:
    """Local HF directory of a model input; InputError if it is missing or not a model."""
    if ref is None:
        raise InputError(f"missing input {role!r}: a base model artifact or HF directory")
    path = ref.path
    if not path.exists():
        raise InputError(f"{path}: {role} path does not exist")
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: {role} is not a Hugging Face model directory (no config.json)")
    return path


def preflight(cfg: StageBase, problems: list[str] | None = None) -> None:
    """Checks that need no compute: GPU-only options on a CPU machine. Raises StepError listing all."""
    problems = list(problems or [])
    gpu = cuda_available()
    if cfg.quantized and not gpu:
        problems.append("finetune=qlora / load_in_4bit needs a CUDA GPU (bitsandbytes 4-bit); this machine has "
                        "none. Use finetune=lora on CPU.")
    if cfg.quantized and gpu:
        try:
            import bitsandbytes  # noqa: F401  # pyright: ignore[reportMissingImports]
        except ImportError:
            problems.append("finetune=qlora needs the bitsandbytes package (pip install bitsandbytes)")
    if cfg.precision == "fp16" and not gpu:
        problems.append("precision=fp16 needs a GPU; use fp32 or bf16 on CPU")
    problems += backend_problems(cfg, gpu)
    if cfg.resume_from:
        try:
            resume_checkpoint(cfg)
        except InputError as exc:
            problems.append(str(exc))
    if problems:
        raise StepError("cannot start training:\n" + "\n".join(f"  - {p}" for p in problems))


# ---------------------------------------------------------------- checkpoints


def checkpoint_dir(work: Path) -> Path:
    """Where a stage's trainer writes ``checkpoint-N``: under the step's work dir (``ctx.work_dir``),
    which the runner keys by the step's cache key and keeps until the artifact is published, so a
    killed run finds its checkpoints again."""
    return work / "checkpoints"


def last_checkpoint(ckpt_dir: Path) -> Path | None:
    """Newest checkpoint that finished writing (see :mod:`nexus_core.checkpoints`; transformers writes
    ``checkpoint-N`` in place, and the controller marks it complete only after the save returns)."""
    from nexus_core import checkpoints

    found = [(s, p) for s, p in checkpoints.complete(ckpt_dir) if (p / "trainer_state.json").is_file()]
    return found[-1][1] if found else None


def resume_checkpoint(cfg: StageBase) -> Path | None:
    """The checkpoint ``cfg.resume_from`` names, checked: it exists, is complete (its marker and
    ``trainer_state.json``) and was written by a stage of the same method. A ``checkpoints`` dir (or a
    work dir holding one) gives its newest complete checkpoint. InputError naming ``resume_from``."""
    from nexus_core import checkpoints

    if not cfg.resume_from:
        return None
    path = Path(cfg.resume_from)
    where = f"resume_from: {path}"
    if not path.is_dir():
        raise InputError(f"{where}: no such checkpoint directory")
    if (path / "checkpoints").is_dir():  # a stage's work dir
        path = path / "checkpoints"
    if not path.name.startswith("checkpoint-"):  # a checkpoints dir: its newest complete checkpoint
        newest = [p for _, p in checkpoints.complete(path, remove_partial=False) if (p / "trainer_state.json").is_file()]
        if not newest:
            raise InputError(f"{where}: holds no complete checkpoint-N directory")
        path = newest[-1]
    mark = checkpoints.marker(path)
    if mark is None or not (path / "trainer_state.json").is_file():
        raise InputError(f"{where}: not a complete training checkpoint (no {checkpoints.COMPLETE_MARKER} marker or "
                         "trainer_state.json: a kill while it was written)")
    method, wanted = mark.get("method"), getattr(cfg, "method", None)
    if method and wanted and method != wanted:
        raise InputError(f"{where}: written by a {method} stage; this stage is {wanted}")
    if not method:
        logger.warning("%s: the checkpoint does not record its method; resuming as %s", where, wanted)
    return path


# ---------------------------------------------------------------- trainer arguments


def use_bf16(cfg: StageBase) -> bool:
    """Whether to train in bf16 under the config's precision setting."""
    import torch

    if cfg.precision in ("bf16", "pure_bf16"):
        return True
    return cfg.precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def trainer_kwargs(cfg: StageBase, output_dir: Path, **extra: Any) -> dict[str, Any]:
    """Keyword arguments for any TrainingArguments subclass (SFTConfig, DPOConfig, ...)."""
    gpu = cuda_available()
    kw: dict[str, Any] = dict(
        output_dir=str(output_dir), max_steps=cfg.max_steps, num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler, warmup_ratio=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay, logging_steps=cfg.logging_steps, save_strategy="steps",
        # No rotation by the Trainer: it deletes old checkpoints before the controller marks the new one
        # complete, so a kill in between could leave none; the controller rotates after marking.
        save_steps=cfg.checkpoint.save_steps, save_total_limit=None,
        seed=cfg.seed, data_seed=cfg.seed, report_to=[], disable_tqdm=True, bf16=use_bf16(cfg),
        fp16=cfg.precision == "fp16", gradient_checkpointing=cfg.gradient_checkpointing,
        # Non-reentrant checkpointing needs no input that requires grad (frozen embeddings under LoRA).
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        use_cpu=not gpu, dataloader_num_workers=0, include_num_input_tokens_seen="non_padding",
        # gloo for CPU data parallelism; only inside a launched group (it would try to join one otherwise).
        ddp_backend="gloo" if not gpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        save_only_model=False,
    )
    # FSDP / DeepSpeed come from the accelerate config file the launch passes (see backends).
    if cfg.liger_kernel:
        kw["use_liger_kernel"] = True
    kw.update(extra)
    return kw


def peft_config(cfg: StageBase, task_type: str = "CAUSAL_LM"):  # noqa: ANN201 - peft.LoraConfig | None
    """peft LoraConfig for lora/qlora stages, None for full fine-tuning."""
    if not cfg.adapters:
        return None
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type=task_type)


def load_model(cfg: StageBase, path: Path, kind: Literal["causal", "reward"] = "causal",
               config_overrides: dict[str, Any] | None = None, frozen: bool = False):  # noqa: ANN201
    """Load a model for training: full fine-tuning keeps fp32 master weights (the trainer autocasts to
    bf16/fp16); bf16 only for ``pure_bf16``, or for weights that are never updated under bf16 autocast
    (a LoRA stage's frozen base, whose adapters peft keeps in fp32; a ``frozen`` teacher); 4-bit for
    QLoRA (GPU)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(str(path))
    for key, value in (config_overrides or {}).items():
        setattr(config, key, value)
    in_bf16 = cfg.precision == "pure_bf16" or ((frozen or cfg.adapters) and use_bf16(cfg))
    if cfg.precision == "pure_bf16" and not frozen:
        logger.warning("precision=pure_bf16: weights and optimizer state in bf16, no fp32 master copy; an update "
                       "smaller than half a bf16 step of its weight (about 0.4 % of it) is lost, so most updates "
                       "at fine-tuning learning rates vanish. Use precision=bf16 (fp32 master weights) unless "
                       "memory forces this")
    kw: dict[str, Any] = {"dtype": torch.bfloat16 if in_bf16 else torch.float32, **model_kwargs(cfg)}
    if cfg.quantized:
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    if kind == "reward":
        config.num_labels = 1
        return AutoModelForSequenceClassification.from_pretrained(str(path), config=config, **kw)
    return AutoModelForCausalLM.from_pretrained(str(path), config=config, **kw)


# ---------------------------------------------------------------- saving


def param_snapshot(model) -> dict[str, Any]:  # noqa: ANN001
    """Copies of the trainable parameters (in their own dtype), to prove training changed them."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def saved_dtype(cfg: StageBase, base_path: Path):  # noqa: ANN201 - torch.dtype
    """The dtype full weights are saved in: the base checkpoint's own (a bf16 release stays bf16, not
    twice its size in fp32), bf16 for pure_bf16; fp32 otherwise."""
    import json

    import torch

    if cfg.precision == "pure_bf16":
        return torch.bfloat16
    try:
        conf = json.loads((Path(base_path) / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    name = conf.get("torch_dtype") or conf.get("dtype") or conf.get("text_config", {}).get("torch_dtype")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(name), torch.float32)


def param_delta(before: dict[str, Any], model, dtype=None, state: dict[str, Any] | None = None) -> dict[str, float]:  # noqa: ANN001
    """How much training changed the trainable parameters, compared at the resolution they are saved in
    (``dtype``; None: each parameter's own): ``param_delta`` is the largest absolute change,
    ``param_changed_frac`` the share of values that differ (an fp32 master copy that moved by less than
    half a bf16 step saves as the same bf16 value: that is no change). ``state``: the full state dict
    gathered from sharded ranks (:func:`full_state_dict`), read instead of the model's local shards."""
    now = dict(model.named_parameters()) if state is None else state
    biggest, changed, total = 0.0, 0, 0
    for n, t in before.items():
        if n not in now:
            continue
        after = now[n].detach().cpu()
        a, b = (t, after) if dtype is None else (t.to(dtype), after.to(dtype))
        diff = a.float() - b.float()
        biggest = max(biggest, float(diff.abs().max()) if diff.numel() else 0.0)
        changed += int((diff != 0).sum())
        total += diff.numel()
    return {"param_delta": biggest, "param_changed_frac": changed / total if total else 0.0}


def add_lora(cfg: StageBase, model):  # noqa: ANN001, ANN201 - peft.PeftModel
    """Wrap ``model`` in LoRA adapters for a stage that builds its own trainer (cpt, kd): a 4-bit base
    is prepared for k-bit training, and under gradient checkpointing the embeddings' outputs require
    grad, so checkpointed blocks see an input that needs gradients although every base weight is frozen."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    lora = peft_config(cfg)
    assert lora is not None, "add_lora on a full fine-tuning stage"
    if cfg.quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, lora)


def full_state_dict(trainer) -> dict[str, Any] | None:  # noqa: ANN001
    """The trained model's full state dict when its parameters are sharded over the ranks (FSDP,
    DeepSpeed): gathered by accelerate, a collective that every rank must call (rank 0 gets the
    tensors). None when each rank holds the whole model (one process, DDP)."""
    if not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        return None
    return trainer.accelerator.get_state_dict(trainer.model)


def save_model_artifact(cfg: StageBase, trainer, tokenizer, base_path: Path, out_uri: str,  # noqa: ANN001
                        method: str, kind: Literal["causal", "reward"] = "causal",
                        state: dict[str, Any] | None = None) -> None:
    """Write the model artifact: HF dir at the root (merged weights), ``adapter/`` for LoRA, config.yaml.

    LoRA adapters are merged into a freshly loaded full-precision base, so QLoRA stages also produce
    ordinary weights that ``from_pretrained`` loads anywhere. ``state``: the full state dict gathered
    from sharded ranks (:func:`full_state_dict`), saved instead of the unwrapped model's own.
    """
    import torch

    out = Path(out_uri)
    model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
    dtype = saved_dtype(cfg, base_path)
    if cfg.adapters:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        model.save_pretrained(out / "adapter", safe_serialization=True, **({"state_dict": state} if state else {}))
        tokenizer.save_pretrained(out / "adapter")
        auto = AutoModelForSequenceClassification if kind == "reward" else AutoModelForCausalLM
        extra = {"num_labels": 1} if kind == "reward" else {}
        base = auto.from_pretrained(str(base_path), dtype=torch.float32, **extra)
        merged = PeftModel.from_pretrained(base, str(out / "adapter")).merge_and_unload()
        merged.to(dtype).save_pretrained(out, safe_serialization=True)
    elif state is not None:  # gathered from the shards: cast as below, on the gathered copy
        model.save_pretrained(out, safe_serialization=True,
                              state_dict={k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
    else:  # training is over: the fp32 master copy is cast to the dtype the base was released in
        model.to(dtype).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(
        {"method": method, "base_model": str(base_path), **cfg.model_dump(mode="json")}, sort_keys=False))


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, else max RSS."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    status = Path("/proc/self/status")
    if status.is_file():  # VmHWM can be reset (clear_refs), unlike ru_maxrss
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def is_main_process() -> bool:
    """Rank 0 (or not distributed)."""
    return int(os.environ.get("RANK", "0")) == 0


class TrainResult(StepResult):
    """What every training stage returns: steps run, where it resumed, metrics, GPU time."""

    method: str = Field(description="Stage method (sft, cpt, dpo, ...)")
    steps: int = Field(default=0, description="Optimizer steps at the end (global_step)")
    resumed_from_step: int = Field(default=0, description="Checkpoint step resumed from (0: a fresh start)")

    @classmethod
    def from_metrics(cls, metrics: dict[str, float], **extra: Any) -> Self:
        """Build the result from fit()'s metrics (GPU seconds go to ``cost`` for the ledger)."""
        return cls(steps=int(metrics["global_step"]), resumed_from_step=int(metrics["resumed_from_step"]),
                   metrics=metrics, cost=Cost(gpu_seconds=metrics.get("gpu_seconds", 0.0)), **extra)

