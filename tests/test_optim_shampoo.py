"""Shampoo against scipy's fractional matrix powers (an independent route to the inverse roots)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import fractional_matrix_power
from torch import nn

from lightning_optsurvey.optim import Shampoo

DTYPE = torch.float64
#: scipy's Schur-Pade fractional powers vs an eigendecomposition, on well-conditioned matrices.
TOL = 1e-9


def _root(h: np.ndarray, power: float) -> torch.Tensor:
    return torch.as_tensor(np.real(fractional_matrix_power(h, power)), dtype=DTYPE)


def _mode_product(m: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.movedim(torch.tensordot(m, torch.movedim(x, dim, 0), dims=([1], [0])), 0, dim)


def _step(p: nn.Parameter, opt: Shampoo, grad: torch.Tensor) -> None:
    p.grad = grad.clone()
    opt.step()


@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 4)])
def test_two_steps_match_the_reference(shape):
    gen = torch.Generator().manual_seed(0)
    eps, lr = 0.1, 0.5
    w0 = torch.randn(shape, generator=gen, dtype=DTYPE)
    g1, g2 = torch.randn(shape, generator=gen, dtype=DTYPE), torch.randn(shape, generator=gen, dtype=DTYPE)
    p = nn.Parameter(w0.clone())
    opt = Shampoo([p], lr=lr, momentum=0.0, eps=eps, update_every=1, graft=False)
    _step(p, opt, g1)
    _step(p, opt, g2)
    order = len(shape)
    w = w0.clone()
    stats = [eps * np.eye(n) for n in shape]
    for g in (g1, g2):
        update = g.clone()
        for i in range(order):
            unfolded = torch.movedim(g, i, 0).reshape(shape[i], -1).numpy()
            stats[i] = stats[i] + unfolded @ unfolded.T
            update = _mode_product(_root(stats[i], -1.0 / (2 * order)), update, i)
        w = w - lr * update
    torch.testing.assert_close(p.detach(), w, rtol=0, atol=TOL)


def test_grafting_gives_each_update_the_gradient_norm():
    gen = torch.Generator().manual_seed(1)
    p = nn.Parameter(torch.randn(5, 4, generator=gen, dtype=DTYPE))
    opt = Shampoo([p], lr=1.0, momentum=0.0)
    for _ in range(3):
        before = p.detach().clone()
        g = torch.randn(5, 4, generator=gen, dtype=DTYPE)
        _step(p, opt, g)
        torch.testing.assert_close(torch.linalg.vector_norm(p - before), torch.linalg.vector_norm(g),
                                   rtol=1e-12, atol=0)


def test_roots_are_refreshed_only_every_update_every_steps():
    gen = torch.Generator().manual_seed(2)
    p = nn.Parameter(torch.randn(3, 3, generator=gen, dtype=DTYPE))
    opt = Shampoo([p], lr=0.1, momentum=0.0, update_every=3, graft=False)
    roots = []
    for _ in range(4):
        _step(p, opt, torch.randn(3, 3, generator=gen, dtype=DTYPE))
        roots.append(opt.state[p]["root_0"].clone())
    assert torch.equal(roots[0], roots[1]) and torch.equal(roots[1], roots[2])
    assert not torch.equal(roots[2], roots[3])


def test_diverged_statistics_raise_a_clear_error():
    p = nn.Parameter(torch.zeros(2, 2, dtype=DTYPE))
    opt = Shampoo([p])
    with pytest.raises(FloatingPointError, match="diverged"):
        _step(p, opt, torch.full((2, 2), float("inf"), dtype=DTYPE))
