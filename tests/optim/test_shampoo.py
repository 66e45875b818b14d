"""Shampoo against scipy's fractional matrix powers (an independent route to the inverse roots)."""

from __future__ import annotations

import itertools

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
    opt = Shampoo([p], lr=lr, momentum=0.0, eps=eps, precondition_every=1, statistics_every=1, graft=False)
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


def test_roots_are_refreshed_only_every_precondition_every_steps():
    gen = torch.Generator().manual_seed(2)
    p = nn.Parameter(torch.randn(3, 3, generator=gen, dtype=DTYPE))
    opt = Shampoo([p], lr=0.1, momentum=0.0, precondition_every=3, statistics_every=1, graft=False)
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


def _blocks(x: torch.Tensor, size: int) -> list[tuple[tuple[slice, ...], torch.Tensor]]:
    """Every block of ``x`` (at most ``size`` along each dimension), with its index."""
    ranges = [[slice(s, min(s + size, n)) for s in range(0, n, size)] for n in x.shape]
    return [(idx, x[idx]) for idx in itertools.product(*ranges)]


@pytest.mark.parametrize("shape", [(5, 3), (3, 5, 2), (7,)])
def test_a_blocked_tensor_is_independent_shampoo_on_each_block(shape):
    """Blocking (with zero padding of the ragged last blocks) = one unblocked Shampoo per block."""
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(shape, generator=gen, dtype=DTYPE)
    grads = [torch.randn(shape, generator=gen, dtype=DTYPE) for _ in range(4)]
    kw = {"lr": 0.3, "momentum": 0.5, "eps": 0.1, "precondition_every": 2, "statistics_every": 1, "graft": "none"}
    p = nn.Parameter(w0.clone())
    opt = Shampoo([p], block_size=2, **kw)
    refs = []
    for idx, block in _blocks(w0, 2):
        q = nn.Parameter(block.clone())
        refs.append((idx, q, Shampoo([q], block_size=100, **kw)))
    for g in grads:
        _step(p, opt, g)
        for idx, q, ref in refs:
            _step(q, ref, g[idx])
    expected = torch.empty(shape, dtype=DTYPE)
    for idx, q, _ in refs:
        expected[idx] = q.detach()
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)


def test_unpreconditioned_dimensions_are_not_blocked():
    gen = torch.Generator().manual_seed(4)
    p = nn.Parameter(torch.randn(6, 40, generator=gen, dtype=DTYPE))
    opt = Shampoo([p], block_size=4, max_preconditioner_dim=10)
    _step(p, opt, torch.randn(6, 40, generator=gen, dtype=DTYPE))
    assert opt.state[p]["H_0"].shape == (2, 4, 4) and "H_1" not in opt.state[p]


@pytest.mark.parametrize(("graft", "reference"), [
    ("sgd", lambda q: torch.optim.SGD([q], lr=0.1, momentum=0.9)),
    ("adagrad", lambda q: torch.optim.Adagrad([q], lr=0.1, eps=1e-10)),
])
def test_a_preconditioner_that_never_starts_is_the_grafted_method(graft, reference):
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(4, 3, generator=gen, dtype=DTYPE)
    p, q = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    opt = Shampoo([p], lr=0.1, momentum=0.9 if graft == "sgd" else 0.0, graft=graft,
                  start_preconditioning_step=10**9)
    ref = reference(q)
    for _ in range(5):
        g = torch.randn(4, 3, generator=gen, dtype=DTYPE)
        _step(p, opt, g)
        q.grad = g.clone()
        ref.step()
    # SGD: bitwise. AdaGrad: torch fuses the division into addcdiv_, so one rounding may differ.
    atol = 0.0 if graft == "sgd" else 1e-14
    torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=atol)


def test_adagrad_grafting_gives_each_update_the_adagrad_norm():
    gen = torch.Generator().manual_seed(6)
    p = nn.Parameter(torch.randn(5, 4, generator=gen, dtype=DTYPE))
    opt = Shampoo([p], lr=1.0, momentum=0.0, graft="adagrad", precondition_every=2)
    total = torch.zeros(5, 4, dtype=DTYPE)
    for _ in range(4):
        before = p.detach().clone()
        g = torch.randn(5, 4, generator=gen, dtype=DTYPE)
        total += g * g
        _step(p, opt, g)
        expected = torch.linalg.vector_norm(g / (total.sqrt() + 1e-10))
        torch.testing.assert_close(torch.linalg.vector_norm(p - before), expected, rtol=1e-12, atol=0)


def test_statistics_are_gathered_every_statistics_every_steps():
    gen = torch.Generator().manual_seed(7)
    p = nn.Parameter(torch.randn(3, 2, generator=gen, dtype=DTYPE))
    opt = Shampoo([p], eps=0.5, statistics_every=2)
    grads = [torch.randn(3, 2, generator=gen, dtype=DTYPE) for _ in range(3)]
    for g in grads:
        _step(p, opt, g)
    expected = 0.5 * torch.eye(3, dtype=DTYPE) + grads[0] @ grads[0].T + grads[2] @ grads[2].T
    torch.testing.assert_close(opt.state[p]["H_0"][0], expected, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"graft": "adam"}, ValueError), ({"graft": 1}, TypeError), ({"block_size": 0}, ValueError),
    ({"statistics_every": 1.5}, TypeError), ({"start_preconditioning_step": -1}, ValueError),
])
def test_bad_options_are_refused(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        Shampoo([nn.Parameter(torch.zeros(2))], **kwargs)


def test_bfloat16_parameters_keep_float32_statistics():
    gen = torch.Generator().manual_seed(8)
    w0 = torch.randn(6, 5, generator=gen)
    grads = [torch.randn(6, 5, generator=gen) for _ in range(3)]
    low, ref = nn.Parameter(w0.to(torch.bfloat16)), nn.Parameter(w0.double())
    opts = [Shampoo([q], lr=0.1, statistics_every=1, precondition_every=1) for q in (low, ref)]
    for g in grads:
        _step(low, opts[0], g.to(torch.bfloat16))
        _step(ref, opts[1], g.to(torch.bfloat16).double())
    assert opts[0].state[low]["H_0"].dtype == torch.float32 and low.dtype == torch.bfloat16
    # a few bfloat16 ulps of weights of order 1 (one ulp at [1, 2) is 2**-7)
    torch.testing.assert_close(low.detach().double(), ref.detach(), rtol=0, atol=0.02)
