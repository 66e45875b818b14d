"""Entropy-SGD and LPF-SGD: reference steps written from the papers, degenerate cases, noise law."""

from __future__ import annotations

import math

import pytest
import torch
from _support import make_closure
from torch import nn

from lightning_optsurvey.optim import LPFSGD, EntropySGD

DTYPE = torch.float64
#: Float64 recomputation of a few steps in a different order of operations.
TOL = 1e-12


def _problem(seed: int = 0, n: int = 6):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=gen, dtype=DTYPE)
    a = m @ m.T / n + 0.5 * torch.eye(n, dtype=DTYPE)
    b = torch.randn(n, generator=gen, dtype=DTYPE)
    w0 = torch.randn(n, generator=gen, dtype=DTYPE)
    return a, b, w0


def _closure(opt, w, a, b, record=None):
    def loss():
        if record is not None:
            record.append(w.detach().clone())
        return 0.5 * w @ a @ w - b @ w

    return make_closure(opt, loss)


# -------------------------------------------------------------------------------------------- Entropy-SGD

def test_entropy_sgd_matches_algorithm_1():
    a, b, w0 = _problem()
    lr, m, gamma, scoping, steps_l, eta, alpha = 0.5, 0.9, 0.7, 0.1, 3, 0.05, 0.75
    w = nn.Parameter(w0.clone())
    opt = EntropySGD([w], lr=lr, momentum=m, gamma=gamma, gamma_scoping=scoping, inner_steps=steps_l,
                     inner_lr=eta, noise=0.0, alpha=alpha)
    calls: list[torch.Tensor] = []
    x, buf = w0.clone(), None
    for t in range(3):
        opt.step(_closure(opt, w, a, b, calls))
        g_t = gamma * (1 + scoping) ** t
        xp, mu = x.clone(), x.clone()
        for _ in range(steps_l):
            dx = (a @ xp - b) - g_t * (x - xp)
            xp = xp - eta * dx
            mu = (1 - alpha) * mu + alpha * xp
        d = g_t * (x - mu)
        buf = d if buf is None else m * buf + d
        x = x - lr * buf
        torch.testing.assert_close(w.detach(), x, rtol=0, atol=TOL)
    assert len(calls) == 3 * steps_l
    torch.testing.assert_close(calls[0], w0, rtol=0, atol=0)  # the first evaluation is at x


def test_entropy_sgd_degenerate_setting_is_sgd_with_momentum():
    # L=1, alpha=1, no noise, no scoping: x - mu = eta' grad, so the step is SGD on lr * gamma * eta'.
    a, b, w0 = _problem(1)
    lr, gamma, eta, m = 0.8, 0.5, 0.1, 0.9
    w1, w2 = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    ent = EntropySGD([w1], lr=lr, momentum=m, gamma=gamma, gamma_scoping=0.0, inner_steps=1, inner_lr=eta,
                     noise=0.0, alpha=1.0)
    sgd = torch.optim.SGD([w2], lr=lr * gamma * eta, momentum=m)
    for _ in range(20):
        ent.step(_closure(ent, w1, a, b))
        sgd.step(_closure(sgd, w2, a, b))
    torch.testing.assert_close(w1, w2, rtol=0, atol=TOL)


def test_entropy_sgd_langevin_noise_has_the_right_scale():
    # With a zero loss, gamma -> 0 and one inner step, x' - x = sqrt(eta') * eps * xi exactly.
    n, eta, eps = 20000, 0.04, 0.3
    w = nn.Parameter(torch.zeros(n, dtype=DTYPE))
    opt = EntropySGD([w], lr=1.0, momentum=0.0, gamma=1e-300, gamma_scoping=0.0, inner_steps=2,
                     inner_lr=eta, noise=eps, alpha=1.0)
    seen: list[torch.Tensor] = []

    def closure():
        opt.zero_grad()
        seen.append(w.detach().clone())
        loss = 0.0 * w.sum()
        loss.backward()
        return loss

    opt.step(closure)
    std = float(seen[1].std())
    expected = math.sqrt(eta) * eps
    assert abs(std / expected - 1) < 5 / math.sqrt(2 * n)  # 5 standard errors of a sample std


# ---------------------------------------------------------------------------------------------- LPF-SGD

def test_lpf_sgd_sigma_zero_is_sgd_with_momentum():
    a, b, w0 = _problem(2)
    w1, w2 = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    lpf = LPFSGD([w1], lr=0.05, momentum=0.9, sigma=0.0, num_samples=3, weight_decay=1e-3)
    sgd = torch.optim.SGD([w2], lr=0.05, momentum=0.9, weight_decay=1e-3)
    for _ in range(20):
        lpf.step(_closure(lpf, w1, a, b))
        sgd.step(_closure(sgd, w2, a, b))
    torch.testing.assert_close(w1, w2, rtol=0, atol=TOL)


def test_lpf_sgd_step_is_the_mean_gradient_at_the_perturbed_points():
    a, b, w0 = _problem(3)
    lr, samples = 0.1, 5
    w = nn.Parameter(w0.clone())
    opt = LPFSGD([w], lr=lr, momentum=0.0, sigma=0.2, num_samples=samples)
    points: list[torch.Tensor] = []
    opt.step(_closure(opt, w, a, b, points))
    assert len(points) == samples
    mean_grad = torch.stack([a @ p - b for p in points]).mean(0)
    torch.testing.assert_close(w.detach(), w0 - lr * mean_grad, rtol=0, atol=TOL)
    # Restored exactly between samples: every perturbation is measured from w0.
    assert all(not torch.equal(p, w0) for p in points)


def test_lpf_sgd_perturbation_is_filter_wise_gaussian():
    rows, cols, sigma, samples = 4, 4000, 0.1, 3
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=DTYPE)
    weight = nn.Parameter(torch.randn(rows, cols, generator=gen, dtype=DTYPE) * scales[:, None])
    w0 = weight.detach().clone()
    opt = LPFSGD([weight], lr=1e-9, momentum=0.0, sigma=sigma, num_samples=samples)
    points: list[torch.Tensor] = []

    def closure():
        opt.zero_grad()
        points.append(weight.detach().clone())
        loss = weight.sum()
        loss.backward()
        return loss

    opt.step(closure)
    expected = sigma * torch.linalg.vector_norm(w0, dim=1)
    for p in points:
        std = (p - w0).std(dim=1)
        assert torch.all((std / expected - 1).abs() < 5 / math.sqrt(2 * cols))


def test_lpf_sgd_follows_its_sigma_schedule():
    w = nn.Parameter(torch.ones(1000, dtype=DTYPE))
    radii = []
    opt = LPFSGD([w], lr=1e-9, momentum=0.0, sigma=0.5, num_samples=1,
                 sigma_schedule=lambda step: [0.0, 0.01][step])

    def closure():
        opt.zero_grad()
        radii.append(float((w.detach() - 1).std()))
        loss = w.sum()
        loss.backward()
        return loss

    opt.step(closure)
    opt.step(closure)
    assert radii[0] == 0.0
    expected = 0.01 * math.sqrt(1000)  # sigma * ||w|| for a vector parameter
    assert abs(radii[1] / expected - 1) < 5 / math.sqrt(2000)
    bad = LPFSGD([w], sigma_schedule=lambda step: -1.0)
    with pytest.raises(ValueError, match="sigma_schedule"):
        bad.step(closure)


@pytest.mark.parametrize("cls", [EntropySGD, LPFSGD])
def test_closure_is_required(cls):
    opt = cls(nn.Linear(2, 1).parameters())
    with pytest.raises(ValueError, match="closure"):
        opt.step()


@pytest.mark.parametrize("cls", [EntropySGD, LPFSGD])
def test_same_seed_same_noise_and_seed_changes_it(cls):
    a, b, w0 = _problem(4)

    def run(seed):
        w = nn.Parameter(w0.clone())
        opt = cls([w], seed=seed, **({"noise": 0.1} if cls is EntropySGD else {"sigma": 0.1}))
        for _ in range(3):
            opt.step(_closure(opt, w, a, b))
        return w.detach()

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_lpf_sgd_honours_each_groups_num_samples():
    # Group 0 asks for 1 sample, group 1 for 3: the closure runs 3 times; group 0 is perturbed only in
    # its one sample (at w0 afterwards) and steps on that sample's gradient, group 1 on the mean of 3.
    a, b, w0 = _problem(4)
    lr, k = 0.1, 2
    u, v = nn.Parameter(w0[:k].clone()), nn.Parameter(w0[k:].clone())
    opt = LPFSGD([{"params": [u], "num_samples": 1}, {"params": [v], "num_samples": 3}],
                 lr=lr, momentum=0.0, sigma=0.2)
    points: list[torch.Tensor] = []

    def closure():
        opt.zero_grad()
        w = torch.cat([u, v])
        points.append(w.detach().clone())
        loss = 0.5 * w @ a @ w - b @ w
        loss.backward()
        return loss

    opt.step(closure)
    assert len(points) == 3
    assert not torch.equal(points[0][:k], w0[:k])
    assert all(torch.equal(p[:k], w0[:k]) for p in points[1:])
    grads = [a @ p - b for p in points]
    torch.testing.assert_close(u.detach(), w0[:k] - lr * grads[0][:k], rtol=0, atol=TOL)
    mean_v = torch.stack([g[k:] for g in grads]).mean(0)
    torch.testing.assert_close(v.detach(), w0[k:] - lr * mean_v, rtol=0, atol=TOL)
