"""Flow-matching losses and weightings for Flux.2 training, as plain tensor functions.

Rectified flow: ``x_t = (1 - sigma) * x_0 + sigma * noise`` and the model predicts the velocity
``noise - x_0``. Two knobs shape the objective, following diffusers' SD3/Flux training scripts:

* the *base* per-element loss: ``mse``, ``l1``, ``huber`` (pseudo-Huber
  ``sqrt(d**2 + c**2) - c``) or ``logcosh``;
* the *weighting scheme*: ``sigma_sqrt`` (``sigma**-2``) and ``cosmap``
  (``2 / (pi * (1 - 2 sigma + 2 sigma**2))``) weight the loss and sample sigma uniformly;
  ``logit_normal`` and ``mode`` change how sigma is *sampled* and weight the loss by 1;
  ``none`` is uniform sampling, weight 1.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

BaseLoss = Literal["mse", "l1", "huber", "logcosh"]
Weighting = Literal["none", "sigma_sqrt", "logit_normal", "mode", "cosmap"]


def base_loss(pred: torch.Tensor, target: torch.Tensor, kind: BaseLoss = "mse", huber_c: float = 0.1) -> torch.Tensor:
    """Element-wise loss between ``pred`` and ``target`` (same shape as the inputs)."""
    import torch.nn.functional as F

    d = pred.float() - target.float()
    if kind == "mse":
        return d * d
    if kind == "l1":
        return d.abs()
    if kind == "huber":
        return (d * d + huber_c * huber_c).sqrt() - huber_c
    if kind == "logcosh":
        # log(cosh(d)) = |d| + softplus(-2|d|) - log 2, which never overflows
        a = d.abs()
        return a + F.softplus(-2 * a) - math.log(2.0)
    raise ValueError(f"unknown base loss {kind!r}")


def sigmas_from_uniform(u: torch.Tensor, weighting: Weighting = "none", *, logit_mean: float = 0.0,
                        logit_std: float = 1.0, mode_scale: float = 1.29, normal: torch.Tensor | None = None,
                        shift: float = 1.0) -> torch.Tensor:
    """Map draws to sigmas in (0, 1) by the scheme's sampling density, then apply a time shift.

    ``u`` are uniform draws; ``logit_normal`` uses ``normal`` (standard normal draws) instead:
    ``sigmoid(logit_mean + logit_std * normal)``. ``mode`` is SD3's
    ``1 - u - mode_scale * (cos(pi u / 2)**2 - 1 + u)``. ``shift`` > 1 moves mass to high noise:
    ``shift * s / (1 + (shift - 1) * s)``.
    """
    import torch

    if weighting == "logit_normal":
        if normal is None:
            raise ValueError("logit_normal sampling needs standard normal draws")
        s = torch.sigmoid(logit_mean + logit_std * normal)
    elif weighting == "mode":
        s = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    else:
        s = u
    if shift != 1.0:
        s = shift * s / (1 + (shift - 1) * s)
    return s


def sample_sigmas(batch: int, weighting: Weighting, generator: torch.Generator | None = None, *,
                  logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29,
                  shift: float = 1.0) -> torch.Tensor:
    """Draw ``batch`` sigmas by the weighting scheme's density (see :func:`sigmas_from_uniform`)."""
    import torch

    u = torch.rand(batch, generator=generator)
    normal = torch.randn(batch, generator=generator) if weighting == "logit_normal" else None
    s = sigmas_from_uniform(u, weighting, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale,
                            normal=normal, shift=shift)
    # keep sigma strictly inside (0, 1): sigma**-2 weighting and the scheduler's t=1000*sigma need it
    return s.clamp(1e-4, 1 - 1e-4)


def loss_weighting(sigmas: torch.Tensor, weighting: Weighting = "none") -> torch.Tensor:
    """Per-sample loss weight for ``sigmas`` under the scheme (1 for sampling-only schemes)."""
    import torch

    if weighting == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if weighting == "cosmap":
        bot = 1 - 2 * sigmas.float() + 2 * sigmas.float() ** 2
        return 2 / (math.pi * bot)
    return torch.ones_like(sigmas, dtype=torch.float32)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``(1 - sigma) * x0 + sigma * noise`` with sigma broadcast over the non-batch dims."""
    s = sigmas.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor, *,
                       base: BaseLoss = "mse", weighting: Weighting = "none", huber_c: float = 0.1,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample weighted loss, shape ``(batch,)``: the element loss averaged over each sample.

    ``mask`` (``(batch, tokens)``, 1 = train on this token) restricts the average to the masked
    tokens of ``pred``/``target`` (``(batch, tokens, channels)``); a sample with an empty mask adds 0.
    """
    return masked_mean(base_loss(pred, target, base, huber_c), mask) * loss_weighting(sigmas, weighting)


def masked_mean(elements: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of each sample's ``(tokens, channels)`` elements, over the tokens where ``mask`` is set."""
    if mask is None:
        return elements.reshape(elements.shape[0], -1).mean(dim=1)
    m = mask.to(elements.dtype).unsqueeze(-1)
    total = (elements * m).reshape(elements.shape[0], -1).sum(dim=1)
    return total / (m.reshape(m.shape[0], -1).sum(dim=1) * elements.shape[-1]).clamp_min(1.0)


def resolution_shift(sigmas: torch.Tensor, image_seq_len: int, *, base_seq_len: int = 256,
                     max_seq_len: int = 4096, base_shift: float = 0.5, max_shift: float = 1.15) -> torch.Tensor:
    """Resolution-dependent time shift (SD3/Flux): more noise for more image tokens.

    ``mu`` is linear in the token count between (``base_seq_len``, ``base_shift``) and
    (``max_seq_len``, ``max_shift``) -- the numbers of the pipeline's scheduler config -- and
    ``sigma' = e**mu / (e**mu + 1/sigma - 1)``, the shift the scheduler applies at inference.
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    mu = base_shift + slope * (image_seq_len - base_seq_len)
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def prior_preservation_loss(per_sample: torch.Tensor, prior_weight: float) -> torch.Tensor:
    """DreamBooth: the batch is instance rows then class rows, equal halves; instance + weight * class."""
    if per_sample.shape[0] % 2:
        raise ValueError(f"prior preservation needs an even batch, got {per_sample.shape[0]}")
    inst, prior = per_sample.chunk(2)
    return inst.mean() + prior_weight * prior.mean()


def distillation_loss(flow: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, *, flow_weight: float,
                      distillation_weight: float, base: BaseLoss = "mse", huber_c: float = 0.1) -> torch.Tensor:
    """``flow_weight * flow + distillation_weight * mean(base(student, teacher))``; the teacher is frozen."""
    return flow_weight * flow + distillation_weight * base_loss(student, teacher.detach(), base, huber_c).mean()
