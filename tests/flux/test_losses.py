"""Each base loss, weighting and sampling scheme against hand-computed values."""

import math

import pytest
import torch

from nexus_core.flux import losses

PRED = torch.tensor([1.0, -2.0])
TARGET = torch.tensor([0.5, 0.0])  # differences 0.5 and -2


@pytest.mark.parametrize(("kind", "expected"), [
    ("mse", [0.25, 4.0]),
    ("l1", [0.5, 2.0]),
    ("huber", [math.sqrt(1.25) - 1, math.sqrt(5.0) - 1]),  # pseudo-Huber, c = 1
    ("logcosh", [math.log(math.cosh(0.5)), math.log(math.cosh(2.0))]),
])
def test_base_losses(kind, expected):
    got = losses.base_loss(PRED, TARGET, kind, huber_c=1.0)
    assert got.tolist() == pytest.approx(expected, rel=1e-5)


def test_logcosh_is_finite_for_large_differences():
    got = losses.base_loss(torch.tensor([200.0]), torch.tensor([0.0]), "logcosh")
    assert got.item() == pytest.approx(200 - math.log(2), rel=1e-6)


@pytest.mark.parametrize(("scheme", "expected"), [
    ("none", [1.0, 1.0]),
    ("logit_normal", [1.0, 1.0]),
    ("mode", [1.0, 1.0]),
    ("sigma_sqrt", [4.0, 16.0]),                                   # sigma ** -2
    ("cosmap", [2 / (math.pi * 0.5), 2 / (math.pi * 0.625)]),      # 1 - 2s + 2s^2 = 0.5, 0.625
])
def test_loss_weightings(scheme, expected):
    got = losses.loss_weighting(torch.tensor([0.5, 0.25]), scheme)
    assert got.tolist() == pytest.approx(expected, rel=1e-6)


def test_sampling_densities():
    u = torch.tensor([0.5, 0.25])
    assert losses.sigmas_from_uniform(u, "none").tolist() == pytest.approx([0.5, 0.25])
    # mode: 1 - u - 1.29 (cos^2(pi u / 2) - 1 + u); cos^2(pi/8) = 0.8535534
    assert losses.sigmas_from_uniform(u, "mode", mode_scale=1.29).tolist() == pytest.approx(
        [0.5, 1 - 0.25 - 1.29 * (0.8535534 - 0.75)], rel=1e-5)
    normal = torch.tensor([0.0, 1.0])
    assert losses.sigmas_from_uniform(u, "logit_normal", normal=normal).tolist() == pytest.approx(
        [0.5, 1 / (1 + math.exp(-1))], rel=1e-6)
    assert losses.sigmas_from_uniform(u, "logit_normal", normal=normal, logit_mean=1.0, logit_std=2.0)[1].item() \
        == pytest.approx(1 / (1 + math.exp(-3)), rel=1e-6)
    # shift 3 at 0.5: 1.5 / (1 + 2 * 0.5) = 0.75
    assert losses.sigmas_from_uniform(u, "none", shift=3.0)[0].item() == pytest.approx(0.75)
    with pytest.raises(ValueError):
        losses.sigmas_from_uniform(u, "logit_normal")


def test_sample_sigmas_stay_inside_the_open_interval():
    for scheme in ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap"):
        s = losses.sample_sigmas(256, scheme, torch.Generator().manual_seed(0))
        assert s.shape == (256,) and float(s.min()) > 0 and float(s.max()) < 1


def test_flow_matching_loss_is_weighted_per_sample_mean():
    pred = torch.tensor([[1.0, -2.0], [0.0, 0.0]])
    target = torch.tensor([[0.5, 0.0], [1.0, 1.0]])
    sig = torch.tensor([0.5, 0.25])
    # mse per sample: (0.25 + 4) / 2 = 2.125 and 1.0; sigma_sqrt weights 4 and 16
    got = losses.flow_matching_loss(pred, target, sig, base="mse", weighting="sigma_sqrt")
    assert got.tolist() == pytest.approx([8.5, 16.0])


def test_noisy_latents_interpolate_data_and_noise():
    x = losses.noisy_latents(torch.full((2, 1, 2), 2.0), torch.zeros(2, 1, 2), torch.tensor([0.25, 1.0]))
    assert x[0].flatten().tolist() == [1.5, 1.5] and x[1].abs().sum() == 0


def test_prior_preservation_splits_instance_and_class_halves():
    got = losses.prior_preservation_loss(torch.tensor([1.0, 2.0, 3.0, 5.0]), prior_weight=0.5)
    assert got.item() == pytest.approx(1.5 + 0.5 * 4.0)
    with pytest.raises(ValueError, match="even"):
        losses.prior_preservation_loss(torch.tensor([1.0, 2.0, 3.0]), 1.0)


def test_distillation_mixes_flow_and_teacher_terms():
    got = losses.distillation_loss(torch.tensor(2.0), torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]),
                                   flow_weight=0.5, distillation_weight=2.0)
    assert got.item() == pytest.approx(0.5 * 2.0 + 2.0 * 2.5)  # mse(student, teacher) = (1 + 4) / 2
