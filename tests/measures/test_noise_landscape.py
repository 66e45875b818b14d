"""Gradient noise scale on synthetic gradients, batch gradients, and loss-landscape slices."""

from __future__ import annotations

import math

import pytest
import torch
from _measures_helpers import Quadratic, classification_batches, cross_entropy, dummy_batches, mean_output, spd_matrix
from torch import nn

from lightning_optsurvey.measures import (
    batch_gradients,
    filter_normalized_direction,
    gradient_noise_scale,
    loss_surface,
)
from lightning_optsurvey.tasks import build_model

FLOAT64_RTOL = 1e-10
NUM_SE = 4.0


def test_noise_scale_is_exact_on_expected_squared_norms():
    # E|G_B|^2 = |G|^2 + tr(Sigma) / B: feeding the expectations must return tr(Sigma) / |G|^2 exactly.
    g2, tr = 2.5, 40.0
    est = gradient_noise_scale(g2 + tr / 8, 8, g2 + tr / 128, 128)
    assert est.grad_sq_norm == pytest.approx(g2, rel=FLOAT64_RTOL)
    assert est.trace_sigma == pytest.approx(tr, rel=FLOAT64_RTOL)
    assert est.b_simple == pytest.approx(tr / g2, rel=FLOAT64_RTOL)


def test_noise_scale_on_synthetic_gradients_with_known_mean_and_covariance():
    gen = torch.Generator().manual_seed(0)
    dim, b_small, n_small, trials = 6, 4, 16, 400
    mean = torch.linspace(-1, 1, dim, dtype=torch.float64)
    cov_sqrt = torch.randn(dim, dim, generator=gen, dtype=torch.float64) * 0.8
    cov = cov_sqrt @ cov_sqrt.T
    trs, norms = [], []
    for _ in range(trials):
        samples = mean + torch.randn(n_small * b_small, dim, generator=gen, dtype=torch.float64) @ cov_sqrt.T
        small = samples.view(n_small, b_small, dim).mean(dim=1)
        small_sq = small.pow(2).sum(dim=1).mean()
        big_sq = small.mean(dim=0).pow(2).sum()
        est = gradient_noise_scale(small_sq, b_small, big_sq, b_small * n_small)
        trs.append(est.trace_sigma)
        norms.append(est.grad_sq_norm)
    trs_t, norms_t = torch.tensor(trs), torch.tensor(norms)
    # both estimators are unbiased: their means over trials are within NUM_SE standard errors of the truth
    for values, truth in ((trs_t, float(torch.trace(cov))), (norms_t, float(mean.pow(2).sum()))):
        se = float(values.std()) / math.sqrt(trials)
        assert abs(float(values.mean()) - truth) <= NUM_SE * se
    ratio = float(trs_t.mean() / norms_t.mean())
    assert ratio == pytest.approx(float(torch.trace(cov) / mean.pow(2).sum()), rel=0.1)


def test_noise_scale_bad_batch_sizes():
    with pytest.raises(ValueError, match="small_batch_size"):
        gradient_noise_scale(1.0, 8, 1.0, 8)
    for bad in ("a", True):
        with pytest.raises(TypeError, match="small_batch_size must be a real number"):
            gradient_noise_scale(1.0, bad, 0.5, 8)
    with pytest.raises(ValueError, match="squared gradient norms must be finite"):
        gradient_noise_scale(float("nan"), 2, 0.5, 8)


def test_batch_gradients_match_autograd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    batches = classification_batches(n=3, num_batches=3)
    grads, sizes = batch_gradients(model, cross_entropy, batches)
    assert sizes == [3, 3, 3]
    for row, (x, y) in zip(grads, batches):
        model.zero_grad()
        cross_entropy(model(x), y).backward()
        expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(row, expected, rtol=1e-12, atol=1e-14)


def test_filter_normalized_direction_has_the_weights_filter_norms():
    torch.manual_seed(0)
    model = build_model("cnn_bn")
    d = filter_normalized_direction(model, torch.Generator().manual_seed(0))
    for name, p in model.named_parameters():
        if p.dim() <= 1:
            assert torch.count_nonzero(d[name]) == 0, name
        else:
            torch.testing.assert_close(d[name].flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1))


def test_loss_surface_on_a_quadratic():
    a = spd_matrix([3.0, 1.0, 0.5])
    w0 = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    model = Quadratic(a, w0)
    d1 = {"w": torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)}
    d2 = {"w": torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)}
    alphas = torch.linspace(-1, 1, 5, dtype=torch.float64)
    betas = torch.linspace(-0.5, 0.5, 3, dtype=torch.float64)

    def quad(w):
        return 0.5 * float(w @ a @ w)

    line = loss_surface(model, mean_output, dummy_batches(), [d1], alphas)
    torch.testing.assert_close(line, torch.tensor([quad(w0 + al * d1["w"]) for al in alphas], dtype=torch.float64))
    grid = loss_surface(model, mean_output, dummy_batches(), [d1, d2], alphas, betas)
    expected = torch.tensor([[quad(w0 + al * d1["w"] + be * d2["w"]) for be in betas] for al in alphas],
                            dtype=torch.float64)
    torch.testing.assert_close(grid, expected)
    with pytest.raises(ValueError, match="direction"):
        loss_surface(model, mean_output, dummy_batches(), [d1], alphas, betas)
