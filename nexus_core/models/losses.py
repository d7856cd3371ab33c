"""Losses shared by every step that distils one model into another (the kd training stage, and the
recovery fine-tuning after pruning): one definition of the KL term."""

from __future__ import annotations

from typing import Any, Literal


def distill_kl(student_logp: Any, teacher_logp: Any, divergence: Literal["forward", "reverse"] = "forward") -> Any:
    """Per-position KL divergence between teacher and student log-probabilities (last dim: vocabulary).

    ``forward`` is KL(teacher ‖ student), mean-seeking (classic distillation); ``reverse`` is
    KL(student ‖ teacher), mode-seeking. Both inputs are log-softmaxed, already divided by the
    temperature; callers scale by T² to keep gradient magnitudes comparable across temperatures.
    """
    if divergence == "forward":
        return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)
