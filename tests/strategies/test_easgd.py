"""EASGD's update rule and its stability on a quadratic, without processes; argument checks."""

from __future__ import annotations

import itertools

import pytest
import torch
from _support import assert_rejected
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_optsurvey  # noqa: F401  (registers the strategy names)
from lightning_optsurvey.strategies import EASGDStrategy
from lightning_optsurvey.strategies.easgd import (
    easgd_fixed_point,
    easgd_is_stable,
    easgd_quadratic_matrix,
    easgd_step,
)

EXACT_TOL = 1e-15  # one or two float64 roundings of O(1) numbers
FIXED_POINT_TOL = 1e-10  # after 600 contracting float64 iterations
BOUNDARY_MARGIN = 1e-9  # grid points this close to spectral radius 1 are not classified
DIVERGED = 1e6
N_VALUES = (1, 2, 4, 8)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_step_is_the_papers_update() -> None:
    g = _generator(0)
    workers = [torch.randn(5, generator=g, dtype=torch.float64) for _ in range(3)]
    grads = [torch.randn(5, generator=g, dtype=torch.float64) for _ in range(3)]
    center = torch.randn(5, generator=g, dtype=torch.float64)
    copies = [w.clone() for w in workers], center.clone()
    alpha, lr = 0.15, 0.3
    new_workers, new_center = easgd_step(workers, center, alpha, grads, lr)
    for x, gr, new in zip(workers, grads, new_workers):
        assert torch.allclose(new, x - lr * gr - alpha * (x - center), rtol=0, atol=EXACT_TOL)
    expected_center = center + alpha * ((workers[0] - center) + (workers[1] - center) + (workers[2] - center))
    assert torch.allclose(new_center, expected_center, rtol=0, atol=EXACT_TOL)
    assert all(torch.equal(a, b) for a, b in zip(workers, copies[0])) and torch.equal(center, copies[1])
    with pytest.raises(ValueError, match="at least one worker"):
        easgd_step([], center, alpha)
    with pytest.raises(ValueError, match="gradients"):
        easgd_step(workers, center, alpha, grads[:2], lr)


@pytest.mark.parametrize("num_workers", N_VALUES)
def test_matrix_is_the_step_on_a_quadratic(num_workers: int) -> None:
    eta_h, alpha, h = 0.7, 0.05, 2.0
    matrix = easgd_quadratic_matrix(eta_h, alpha, num_workers)
    for j in range(num_workers + 1):
        state = torch.zeros(num_workers + 1, dtype=torch.float64)
        state[j] = 1.0
        workers = [state[i : i + 1] for i in range(num_workers)]
        new_workers, new_center = easgd_step(workers, state[num_workers:], alpha, [h * x for x in workers],
                                             lr=eta_h / h)
        column = torch.cat([*new_workers, new_center])
        assert torch.allclose(matrix[:, j], column, rtol=0, atol=EXACT_TOL), j


def test_closed_form_stability_region_matches_the_spectral_radius() -> None:
    grid_eta_h = torch.linspace(0.0, 2.6, 53).tolist()
    grid_alpha = torch.linspace(0.0, 1.0, 41).tolist()
    classified = {True: 0, False: 0}
    for n, eta_h, alpha in itertools.product(N_VALUES, grid_eta_h, grid_alpha):
        radius = torch.linalg.eigvals(easgd_quadratic_matrix(eta_h, alpha, n)).abs().max().item()
        if abs(radius - 1.0) < BOUNDARY_MARGIN:
            continue
        stable = easgd_is_stable(eta_h, alpha, n)
        assert stable == (radius < 1.0), (n, eta_h, alpha, radius)
        classified[stable] += 1
    assert min(classified.values()) > 500  # both sides of the boundary are well represented


def test_converges_to_the_known_fixed_point() -> None:
    num_workers, h, lr, alpha = 4, 1.5, 0.4, 0.12
    assert easgd_is_stable(lr * h, alpha, num_workers)
    minimizers = torch.randn(num_workers, 3, generator=_generator(1), dtype=torch.float64)
    workers = list(torch.randn(num_workers, 3, generator=_generator(2), dtype=torch.float64))
    center = torch.zeros(3, dtype=torch.float64)
    for _ in range(600):
        grads = [h * (x - m) for x, m in zip(workers, minimizers)]
        workers, center = easgd_step(workers, center, alpha, grads, lr)
    fixed_workers, fixed_center = easgd_fixed_point(minimizers, lr * h, alpha)
    # Independent: the closed form is a fixed point of the step, and the center is the mean minimizer.
    again, again_center = easgd_step(list(fixed_workers), fixed_center, alpha,
                                     [h * (x - m) for x, m in zip(fixed_workers, minimizers)], lr)
    assert torch.allclose(torch.stack(again), fixed_workers, rtol=0, atol=EXACT_TOL * 10)
    assert torch.allclose(again_center, fixed_center, rtol=0, atol=EXACT_TOL * 10)
    assert torch.allclose(fixed_center, minimizers.mean(0), rtol=0, atol=EXACT_TOL)
    assert torch.allclose(torch.stack(workers), fixed_workers, rtol=0, atol=FIXED_POINT_TOL)
    assert torch.allclose(center, fixed_center, rtol=0, atol=FIXED_POINT_TOL)
    with pytest.raises(ValueError, match="positive"):
        easgd_fixed_point(minimizers, 0.0, 0.0)


@pytest.mark.parametrize(
    ("eta_h", "alpha", "num_workers"),
    [
        (0.5, 0.45, 4),  # plain SGD (eta h = 0.5) converges; the center's overshoot (N alpha = 1.8) does not
        (1.9, 0.3, 2),  # each worker's deviation: |1 - alpha - eta h| = 1.2
        (0.02, 0.7, 2),  # tiny step: the center's eigenvalue 1 - (N + 1) alpha = -1.1
    ],
)
def test_diverges_outside_the_stability_region(eta_h: float, alpha: float, num_workers: int) -> None:
    assert not easgd_is_stable(eta_h, alpha, num_workers)
    assert easgd_is_stable(eta_h, 0.05, num_workers)  # the same step size with a weaker coupling is fine
    h = 1.0
    for coupling, diverges in ((alpha, True), (0.05, False)):
        workers = list(torch.randn(num_workers, 2, generator=_generator(3), dtype=torch.float64))
        center = torch.randn(2, generator=_generator(4), dtype=torch.float64)
        for _ in range(400):
            workers, center = easgd_step(workers, center, coupling, [h * x for x in workers], lr=eta_h / h)
        size = max(torch.stack(workers).abs().max().item(), center.abs().max().item())
        assert (size > DIVERGED) == diverges, (coupling, size)


def test_invalid_arguments() -> None:
    assert_rejected(EASGDStrategy, "rho", (0, -0.1, float("nan"), float("inf")))
    assert_rejected(EASGDStrategy, "rho", ("0.1",), TypeError)
    assert_rejected(EASGDStrategy, "sync_every", (0,))
    assert_rejected(EASGDStrategy, "sync_every", (2.0,), TypeError)
    assert_rejected(EASGDStrategy, "moving_rate", (0.0, 1.0, -0.5))
    assert_rejected(EASGDStrategy, "beta", (0.0, 1.0, -0.5))
    assert_rejected(EASGDStrategy, "beta", ("0.9",), TypeError)
    assert_rejected(EASGDStrategy, "find_unused_parameters", (True,), TypeError)
    with pytest.raises(ValueError, match="num_workers"):
        easgd_quadratic_matrix(0.1, 0.1, 0)
    # (N + 1) alpha >= 2 diverges for any learning rate: refused in Trainer.__init__.
    with pytest.raises(ValueError, match="diverges"):
        Trainer(accelerator="cpu", devices=4, strategy=EASGDStrategy(moving_rate=0.45), logger=False)
    with pytest.raises(ValueError, match="sync_batchnorm"):
        Trainer(accelerator="cpu", devices=2, strategy="easgd", sync_batchnorm=True, logger=False)


class _Quadratic(LightningModule):
    def __init__(self, h: float, lr: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
        self.h, self.lr = h, lr

    def training_step(self, batch: object, batch_idx: int) -> torch.Tensor:
        return 0.5 * self.h * (self.w - torch.tensor([0.5, 0.25], dtype=torch.float64)).square().sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _one_worker_fit(
    strategy: EASGDStrategy, alpha: float, quiet: dict
) -> tuple[_Quadratic, torch.Tensor, torch.Tensor]:
    """Fit ``_Quadratic`` (h=2, lr=0.1) for 6 steps on one process; return it and the worker and center of the
    same recursion written out (gradient steps, an elastic step with ``alpha`` every 2nd)."""
    h, lr, tau, steps = 2.0, 0.1, 2, 6
    model = _Quadratic(h, lr)
    trainer = Trainer(devices=1, strategy=strategy, max_steps=steps, precision="64-true", **quiet)
    with pytest.warns(UserWarning, match="single process"):
        trainer.fit(model, DataLoader(TensorDataset(torch.zeros(steps, 1)), batch_size=1))
    x = torch.tensor([1.0, -2.0], dtype=torch.float64)
    center = x.clone()
    minimizer = torch.tensor([0.5, 0.25], dtype=torch.float64)
    for step in range(1, steps + 1):
        grad = h * (x - minimizer)
        if step % tau == 0:
            (x,), center = easgd_step([x], center, alpha=alpha, grads=[grad], lr=lr)
        else:
            x = x - lr * grad
    return model, x, center


def test_single_process_runs_easgd_with_one_worker(quiet_trainer_kwargs: dict) -> None:
    lr, rho, tau, steps = 0.1, 2.0, 2, 6
    strategy = EASGDStrategy(rho=rho, sync_every=tau)
    model, x, center = _one_worker_fit(strategy, lr * rho, quiet_trainer_kwargs)
    assert torch.allclose(model.w.detach(), x, rtol=0, atol=EXACT_TOL * 10)
    assert torch.allclose(strategy.center_tensors()["w"], center, rtol=0, atol=EXACT_TOL * 10)
    assert strategy.steps == steps and strategy.syncs == steps // tau


class _TwoGroupQuadratic(LightningModule):
    """Two parameters in two optimizer groups with different learning rates."""

    def __init__(self, h: float, lrs: tuple[float, float]) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
        self.h, self.lrs = h, lrs

    def training_step(self, batch: object, batch_idx: int) -> torch.Tensor:
        return 0.5 * self.h * (self.a.square().sum() + (self.b - 1.0).square().sum())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([{"params": [self.a], "lr": self.lrs[0]}, {"params": [self.b], "lr": self.lrs[1]}])


def test_moving_rate_follows_each_param_groups_learning_rate(quiet_trainer_kwargs: dict) -> None:
    h, lrs, rho, tau, steps = 2.0, (0.1, 0.025), 2.0, 2, 6
    model = _TwoGroupQuadratic(h, lrs)
    strategy = EASGDStrategy(rho=rho, sync_every=tau)
    trainer = Trainer(devices=1, strategy=strategy, max_steps=steps, precision="64-true", **quiet_trainer_kwargs)
    with pytest.warns(UserWarning, match="single process"):
        trainer.fit(model, DataLoader(TensorDataset(torch.zeros(steps, 1)), batch_size=1))
    # Reference: each parameter runs easgd_step with alpha = rho * (its own group's lr).
    starts = {"a": (torch.tensor([1.0, -2.0], dtype=torch.float64), 0.0, lrs[0]),
              "b": (torch.tensor([0.5], dtype=torch.float64), 1.0, lrs[1])}
    for name, (x, minimizer, lr) in starts.items():
        center = x.clone()
        for step in range(1, steps + 1):
            grad = h * (x - minimizer)
            if step % tau == 0:
                (x,), center = easgd_step([x], center, alpha=lr * rho, grads=[grad], lr=lr)
            else:
                x = x - lr * grad
        assert torch.allclose(getattr(model, name).detach(), x, rtol=0, atol=EXACT_TOL * 10), name
        assert torch.allclose(strategy.center_tensors()[name], center, rtol=0, atol=EXACT_TOL * 10), name


def test_default_moving_rate_is_beta_over_n(quiet_trainer_kwargs: dict) -> None:
    """The paper's rule (Sec. 5): beta = N * alpha = 0.9; on one process alpha = 0.9, regardless of lr."""
    strategy = EASGDStrategy(sync_every=2)
    assert strategy.alpha_rule == "beta/N" and strategy.beta == 0.9
    _, _, center = _one_worker_fit(strategy, 0.9, quiet_trainer_kwargs)
    assert torch.allclose(strategy.center_tensors()["w"], center, rtol=0, atol=EXACT_TOL * 10)


def test_lightning_cli_reads_the_synchronous_parameters_and_asynchronous_builds_the_async_strategy():
    from jsonargparse._parameter_resolvers import get_signature_parameters

    from lightning_optsurvey.strategies import AsyncEASGDStrategy

    names = [p.name for p in get_signature_parameters(EASGDStrategy, None)]
    assert {"rho", "sync_every", "moving_rate", "beta", "asynchronous"} <= set(names)
    assert "heartbeat_timeout" not in names  # an asynchronous-only argument is not a synchronous one
    built = EASGDStrategy(0.2, 3, asynchronous=True)
    assert type(built) is AsyncEASGDStrategy and built.rho == 0.2 and built.sync_every == 3
    assert type(EASGDStrategy(rho=0.2)) is EASGDStrategy
