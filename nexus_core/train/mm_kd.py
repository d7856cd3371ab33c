"""Knowledge distillation for ``mm_sft``: the student learns from a frozen multimodal teacher's token
distribution on the same batch (same ``input_ids``, ``pixel_values`` or audio ``input_features``), mixed
with its ordinary loss on the assistant tokens — as the text ``kd`` stage does it:
``loss = alpha * T² * KL(teacher ‖ student) + (1 - alpha) * CE(assistant tokens)``.

The teacher is the stage's ``teacher`` input: a model of the same family and processor. Differing
vocabularies, media token ids, tokens per image (or per audio clip) or image/audio preprocessing stop the
stage before any compute, naming both models. Stored tower features (``precomputed``) are refused with
kd: the teacher runs its own tower on the raw media.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from nexus_core.config import NexusModel
from nexus_core.errors import InputError
from nexus_core.models.losses import distill_kl
from nexus_core.train.audio import audio_token_counts, is_audio_model


class MMKDSettings(NexusModel):
    """``mm_sft`` distillation settings (the text kd stage's fields of the same names)."""

    alpha: float = Field(default=0.5, ge=0, le=1, description="Weight of the KD term (1 - alpha for the hard labels)")
    temperature: float = Field(default=2.0, gt=0, description="Softening temperature for both distributions")
    divergence: Literal["forward", "reverse"] = Field(default="forward", description="KL(teacher‖student) or reverse")


def _signature(path: Path) -> dict[str, Any]:
    """What must match between teacher and student for logits on one batch to be comparable."""
    import numpy as np
    from transformers import AutoConfig, AutoProcessor

    config, processor = AutoConfig.from_pretrained(str(path)), AutoProcessor.from_pretrained(str(path))
    out: dict[str, Any] = {"model_type": config.model_type, "vocab": processor.tokenizer.get_vocab()}
    if is_audio_model(path):
        fe = processor.feature_extractor
        out |= {"audio_token_index": config.audio_token_index, "sampling_rate": fe.sampling_rate,
                "n_samples": fe.n_samples, "hop_length": fe.hop_length, "feature_size": fe.feature_size,
                "tokens per clip": audio_token_counts(fe, [np.zeros(fe.n_samples, dtype=np.float32)])[0]}
    else:
        ip = processor.image_processor
        out |= {"image_token_index": config.image_token_index, "image_seq_length": config.image_seq_length,
                "image size": repr(getattr(ip, "size", None)),
                "image mean/std": [list(ip.image_mean or []), list(ip.image_std or [])]}
    return out


def check_teacher(student: Path, teacher: Path, method: str) -> None:
    """Stop before compute unless ``teacher`` takes the student's batches and shares its vocabulary."""
    s, t = _signature(student), _signature(teacher)
    problems = []
    if s["vocab"] != t["vocab"]:
        diff = sorted(set(s["vocab"].items()) ^ set(t["vocab"].items()))[:5]
        problems.append(f"vocab {len(t['vocab'])} vs {len(s['vocab'])} tokens (e.g. {diff})")
    problems += [f"{k} {t.get(k)!r} vs {s.get(k)!r}" for k in sorted((set(s) | set(t)) - {"vocab"})
                 if s.get(k) != t.get(k)]
    if problems:
        raise InputError(f"{method}: kd: teacher {teacher} and student {student} differ (teacher vs student: "
                         f"{'; '.join(problems)}); multimodal distillation needs one processor: the same "
                         "vocabulary and the same media tokens for the same batch")


def mm_kd_loss(kd: MMKDSettings, logits: Any, labels: Any, teacher_logits: Any) -> Any:
    """alpha * T² * KL + (1 - alpha) * CE over labelled positions (logits at t predict token t+1)."""
    import torch.nn.functional as F

    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != -100
    s = logits[mask].float()
    ce = F.cross_entropy(s, labels[mask])
    t = kd.temperature
    s_lp, t_lp = F.log_softmax(s / t, -1), F.log_softmax(teacher_logits[:, :-1][mask].float() / t, -1)
    kl = distill_kl(s_lp, t_lp, kd.divergence).mean()
    return kd.alpha * t * t * kl + (1 - kd.alpha) * ce


def trainer_class(kd: MMKDSettings | None, teacher_dir: Path | None, dtype: Any) -> type:
    """``transformers.Trainer``, or (with ``kd``) a subclass whose loss distils the teacher in ``teacher_dir``
    (loaded here frozen, in eval mode, in ``dtype``; run without grad on each batch the student sees)."""
    from transformers import AutoModelForImageTextToText, AutoModelForSeq2SeqLM, Trainer

    if kd is None:
        return Trainer
    assert teacher_dir is not None
    auto = AutoModelForSeq2SeqLM if is_audio_model(teacher_dir) else AutoModelForImageTextToText
    teacher = auto.from_pretrained(str(teacher_dir), dtype=dtype).eval().requires_grad_(False)

    class MMKDTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001, ANN202
            import torch

            batch = {k: v for k, v in inputs.items() if k != "labels"}
            out = model(**batch)
            teacher.to(out.logits.device)
            with torch.no_grad():
                t_logits = teacher(**batch).logits
            loss = mm_kd_loss(kd, out.logits, inputs["labels"], t_logits)
            return (loss, out) if return_outputs else loss

    return MMKDTrainer
