"""Results checked on networks trained through Lightning's ``Trainer``: results 35-37.

Unlike the synthetic checks, these train a real (small) network on the digits task with a registered
optimizer, through ``Trainer.fit`` with the package's ``DigitsDataModule`` and measuring callbacks, and
compare what is measured with the theorem's prediction:

- the edge of stability (full-batch GD with MSE reaches ``eta lambda_max = 2`` and hovers there), read
  from the :class:`~lightning_optsurvey.callbacks.EdgeOfStability` callback;
- a PAC-Bayes bound built from :func:`~lightning_optsurvey.measures.pac_bayes_sigma` that must upper-bound
  the held-out error of the stochastic network;
- K-FAC's step equals the natural-gradient step where the Kronecker factorization is exact (one linear
  layer, Gaussian inputs, Gaussian likelihood), so its error contracts by ``1 - eta`` whatever the
  conditioning, measured on the optimizer registered as ``"kfac"``.

The networks are initialized from a seeded generator and training runs inside ``torch.random.fork_rng``,
so the checks leave the global RNG as they found it.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.func import functional_call

from lightning_optsurvey.callbacks import EdgeOfStability
from lightning_optsurvey.measures import pac_bayes_sigma
from lightning_optsurvey.optim import create_optimizer
from lightning_optsurvey.tasks import ClassifierModule, DigitsDataModule
from lightning_optsurvey.theory.problems import generator
from lightning_optsurvey.theory.result import (
    MC_Z,
    CheckOutcome,
    Result,
    _positive_float,
    _positive_int,
    register_result,
)

__all__ = ["EdgeOfStabilityDigits", "KFACNaturalGradient", "PACBayesDigits", "kl_inverse"]

#: Edge of stability on digits: eta lambda_max / 2 must dip below this fraction early (progressive
#: sharpening has room to show) ...
EOS_DIGITS_START = 0.75
#: ... reach at least this fraction, and over the second half have its median in the band and every value
#: in the wider one (the same bands as the synthetic ``edge_of_stability``; seen 0.94-1.18 medians).
EOS_DIGITS_REACH = 0.95
EOS_DIGITS_MEDIAN_BAND = (0.85, 1.2)
EOS_DIGITS_RANGE_BAND = (0.4, 2.0)
#: K-FAC: the geometric mean of the per-step contraction of ||W - W*||_F must be within this relative
#: distance of 1 - eta (the Monte-Carlo Fisher's G factor is I up to O(1/sqrt(B)) noise) ...
KFAC_RATE_RTOL = 0.1
#: ... and its preconditioned step must equal the dense natural-gradient step (A (x) G)^-1 grad to this
#: relative accuracy (float32 training).
KFAC_STEP_RTOL = 1e-4


def _quiet_trainer(**kwargs: Any) -> Trainer:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, **kwargs,
    )


def _fit(trainer: Trainer, module: LightningModule, datamodule: Any = None, loader: Any = None) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*val_dataloader.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        if loader is not None:
            trainer.fit(module, train_dataloaders=loader)
        else:
            trainer.fit(module, datamodule=datamodule)


def _network(widths: tuple[int, ...], gen: torch.Generator, activation: type[nn.Module] = nn.Tanh) -> nn.Module:
    """A float32 MLP on flattened 8x8 digits, PyTorch's default uniform init drawn from ``gen``."""
    layers: list[nn.Module] = [nn.Flatten()]
    for fan_in, fan_out in pairwise(widths):
        layer = nn.Linear(fan_in, fan_out, device="meta").to_empty(device="cpu")  # no draw from the global RNG
        bound = 1.0 / math.sqrt(fan_in)
        with torch.no_grad():
            for tensor in (layer.weight, layer.bias):
                tensor.copy_((2.0 * torch.rand(tensor.shape, generator=gen) - 1.0) * bound)
        layers += [layer, activation()]
    return nn.Sequential(*layers[:-1])


def _mse_one_hot(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error against one-hot labels (Cohen et al.'s MSE setting)."""
    return F.mse_loss(outputs, F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype))


class _MSEModule(LightningModule):
    """A plain user LightningModule: a network, MSE on one-hot labels, one registered optimizer."""

    def __init__(self, net: nn.Module, optimizer: str, **hparams: Any) -> None:
        super().__init__()
        self.net, self.optimizer_name, self.hparams_ = net, optimizer, hparams
        self.loss_fn = _mse_one_hot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return create_optimizer(self.optimizer_name, self.net.parameters(), **self.hparams_)


@register_result
@dataclass(frozen=True)
class EdgeOfStabilityDigits(Result):
    """Full-batch GD on a digits network, trained through Lightning, sharpens to 2/eta and stays there."""

    number = 36
    name = "edge_of_stability_digits"
    statement = (
        "full-batch GD with step eta on a tanh MLP for the digits (MSE on one-hot labels): lambda_max of the "
        "training loss's Hessian rises (progressive sharpening) until eta lambda_max reaches 2, then hovers "
        "around 2 while the loss keeps decreasing"
    )
    reference = "Cohen, Kaur, Li, Kolter & Talwalkar 2021, arXiv:2103.00065, Sec. 3 (MSE on image classification)"
    criterion = (
        "eta lambda_max / 2 read from the EdgeOfStability callback (stability/sharpness_x_lr over "
        f"stability/threshold, every 15 steps on the full training batch) dips below {EOS_DIGITS_START:g} after "
        f"the first steps, reaches {EOS_DIGITS_REACH:g}, and over the second half of training has its median in "
        f"{list(EOS_DIGITS_MEDIAN_BAND)} and every value in {list(EOS_DIGITS_RANGE_BAND)}; Trainer.fit with a "
        "plain LightningModule, DigitsDataModule (270 training images in one batch) and the registry's 'sgd'"
    )

    lr: float = 3.0
    steps: int = 300
    width: int = 32
    every: int = 15

    def __post_init__(self) -> None:
        _positive_float("lr", self.lr)
        _positive_int("steps", self.steps, 20)
        _positive_int("width", self.width)
        _positive_int("every", self.every)

    def problem(self, seed: int = 0) -> tuple[DigitsDataModule, nn.Module]:
        # 15 % of the 1797 images for training: one full batch of 270.
        data = DigitsDataModule(batch_size=1797, val_fraction=0.4, test_fraction=0.45, seed=seed)
        return data, _network((64, self.width, self.width, 10), generator(seed))

    def predict(self, problem: Any, k: int) -> float:
        """The threshold ``eta lambda_max = 2`` (the same at every step)."""
        return 2.0

    def check(self, seed: int = 0) -> CheckOutcome:
        data, net = self.problem(seed)
        callback = EdgeOfStability(every_n_epochs=None, every_n_steps=self.every, num_batches=1, seed=seed)
        module = _MSEModule(net, "sgd", lr=self.lr)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            trainer = _quiet_trainer(max_steps=self.steps, callbacks=[callback], limit_val_batches=0)
            _fit(trainer, module, data)
        history = [h for h in callback.history if "stability/sharpness_x_lr" in h]
        steps = [int(h["step"]) for h in history]
        values = [h["stability/sharpness_x_lr"] for h in history]
        threshold = history[-1]["stability/threshold"]
        ratios = [v / threshold for v in values]
        half = ratios[len(ratios) // 2 :]
        median = sorted(half)[len(half) // 2]
        early = min(ratios[: max(len(ratios) // 4, 1)])
        holds = (
            early < EOS_DIGITS_START
            and max(ratios) >= EOS_DIGITS_REACH
            and EOS_DIGITS_MEDIAN_BAND[0] <= median <= EOS_DIGITS_MEDIAN_BAND[1]
            and all(EOS_DIGITS_RANGE_BAND[0] <= r <= EOS_DIGITS_RANGE_BAND[1] for r in half)
        )
        return CheckOutcome(
            predicted=threshold, measured=median * threshold, holds=holds, name=self.name,
            quantity="median eta lambda_max over the second half of training",
            details=f"eta={self.lr:g}, threshold {threshold:g} (rule of stability_scaling); eta lambda_max/2: lowest "
            f"early {early:.2f}, peak {max(ratios):.2f}, second half in [{min(half):.2f}, {max(half):.2f}] (median "
            f"{median:.2f}); {len(values)} measurements",
            steps=steps, predicted_curve=[threshold] * len(steps), measured_curve=values, x_label="GD step",
            y_label="eta lambda_max (EdgeOfStability callback)", log_y=False,
        )


def _kl_bernoulli(q: float, p: float) -> float:
    q, p = min(max(q, 1e-15), 1 - 1e-15), min(max(p, 1e-15), 1 - 1e-15)
    return q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))


def kl_inverse(q: float, budget: float) -> float:
    """``sup {p in [q, 1] : kl(q || p) <= budget}`` by bisection (the PAC-Bayes-kl inversion)."""
    if not budget >= 0:
        raise ValueError(f"budget must be >= 0, got {budget!r}")
    lo, hi = q, 1.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if _kl_bernoulli(q, mid) > budget else (mid, hi)
    return hi


@register_result
@dataclass(frozen=True)
class PACBayesDigits(Result):
    """A PAC-Bayes bound built from the PAC-Bayes sigma upper-bounds the held-out error of a digits network."""

    number = 35
    name = "pac_bayes_digits"
    statement = (
        "prior P = N(w_0, s^2 I) fixed before seeing the data (w_0 the initialization, s from a grid of G values "
        "fixed in advance), posterior Q = N(w, s^2 I): with probability 1 - delta over the n training samples, "
        "kl(e^_S(Q) || e(Q)) <= (||w - w_0||^2/(2 s^2) + ln(2 sqrt(n) G / delta)) / n for every s of the grid, "
        "and e^_S(Q) itself is bounded by a Monte-Carlo kl bound with m draws"
    )
    reference = (
        "McAllester 1999; Maurer 2004 (the 2 sqrt(n) constant); Dziugaite & Roy 2017, arXiv:1703.11008, Sec. 4 "
        "(Gaussian posterior, grid union bound, sample convergence bound)"
    )
    criterion = (
        "the bound (delta = 0.05 split evenly between the PAC-Bayes and the Monte-Carlo steps) at s = the largest "
        "grid value 2^(-j/2) <= pac_bayes_sigma(max_deviation=0.3) of the trained network is non-vacuous (< 1) "
        f"and above the held-out error of Q (the test split, {MC_Z:g} standard errors of the Monte-Carlo "
        "estimate allowed); the network trained through Trainer.fit with ClassifierModule, DigitsDataModule and "
        "the registry's 'sgd'"
    )

    epochs: int = 3
    lr: float = 0.05
    hidden: int = 32
    max_deviation: float = 0.3
    draws: int = 100
    delta: float = 0.05
    grid: int = 20
    shift: bool = False

    def __post_init__(self) -> None:
        _positive_int("epochs", self.epochs)
        _positive_float("lr", self.lr)
        _positive_int("hidden", self.hidden)
        _positive_float("max_deviation", self.max_deviation)
        _positive_int("draws", self.draws, 10)
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")
        _positive_int("grid", self.grid, 1)

    def problem(self, seed: int = 0) -> tuple[DigitsDataModule, nn.Module]:
        return DigitsDataModule(batch_size=32, seed=seed), _network((64, self.hidden, 10), generator(seed), nn.ReLU)

    def predict(self, problem: Any, k: int) -> float:
        """Not used on its own: the bound needs the trained network (see :meth:`check`)."""
        return math.nan

    def check(self, seed: int = 0) -> CheckOutcome:
        data, net = self.problem(seed)
        start = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).clone()
        module = ClassifierModule(model=net, optimizer="sgd", optimizer_kwargs={"lr": self.lr})
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            _fit(_quiet_trainer(max_epochs=self.epochs, limit_val_batches=0), module, data)
        net.eval()
        data.setup()
        x_train, y_train = data.train_set.tensors
        x_test, y_test = data.test_set.tensors
        if self.shift:  # a different distribution: the same images with their pixels permuted
            perm = torch.randperm(64, generator=generator(seed + 3))
            x_test = x_test.reshape(-1, 64)[:, perm].reshape(x_test.shape)
        n = len(y_train)
        gen = generator(seed + 1)
        sigma = pac_bayes_sigma(net, nn.CrossEntropyLoss(), [(x_train, y_train)], max_deviation=self.max_deviation,
                                generator=gen)
        grid = [2.0 ** (-j / 2) for j in range(self.grid)]
        below = [s for s in grid if s <= sigma]
        s = below[0] if below else grid[-1]
        w = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
        names = [name for name, _ in net.named_parameters()]
        shapes = [p.shape for p in net.parameters()]

        def error(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
            params, i = {}, 0
            for name, shape in zip(names, shapes, strict=True):
                params[name] = flat[i : i + shape.numel()].reshape(shape)
                i += shape.numel()
            with torch.no_grad():
                return float((functional_call(net, params, (x,)).argmax(1) != y).float().mean())

        train_errors = torch.tensor([error(w + s * torch.randn(w.shape, generator=gen), x_train, y_train)
                                     for _ in range(self.draws)])
        test_errors = torch.tensor([error(w + s * torch.randn(w.shape, generator=gen), x_test, y_test)
                                    for _ in range(self.draws)])
        half = self.delta / 2
        train_bound = kl_inverse(float(train_errors.mean()), math.log(2.0 / half) / self.draws)
        kl = float((w - start).square().sum()) / (2.0 * s * s)
        bound = kl_inverse(train_bound, (kl + math.log(2.0 * math.sqrt(n) * self.grid / half)) / n)
        test, test_err = float(test_errors.mean()), float(test_errors.std()) / math.sqrt(self.draws)
        holds = bound < 1.0 and test - MC_Z * test_err <= bound and bool(below)
        return CheckOutcome(
            predicted=bound, measured=test, holds=holds, name=self.name,
            quantity="held-out error of Q = N(w, s^2 I) against its PAC-Bayes bound",
            details=f"n={n}, {sum(p.numel() for p in net.parameters())} parameters, pac_bayes_sigma {sigma:.4g} -> "
            f"s={s:.4g}, ||w - w_0|| = {float((w - start).norm()):.3g}, KL = {kl:.4g}; train error of Q "
            f"{float(train_errors.mean()):.4f} (MC bound {train_bound:.4f}), held-out error of Q {test:.4f} +- "
            f"{test_err:.1g}{' (pixels permuted)' if self.shift else ''} <= bound {bound:.4f}",
            steps=[0, 1, 2], predicted_curve=[math.nan, math.nan, bound],
            measured_curve=[float(train_errors.mean()), train_bound, test],
            x_label="0: train error of Q, 1: its MC bound, 2: held-out error of Q", y_label="error", log_y=False,
        )


class _GaussianRegression(LightningModule):
    """A plain user LightningModule: a linear layer, the Gaussian negative log-likelihood (squared error / 2)."""

    def __init__(self, layer: nn.Linear, optimizer: str, **hparams: Any) -> None:
        super().__init__()
        self.layer, self.optimizer_name, self.hparams_ = layer, optimizer, hparams
        self.weights: list[torch.Tensor] = [layer.weight.detach().clone()]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        outputs = self.layer(x)
        sample_fisher = getattr(self.optimizers().optimizer, "sample_fisher", None)
        if sample_fisher is not None:
            # K-FAC's Monte-Carlo Fisher of the Gaussian likelihood (targets drawn from N(outputs, I)), sampled
            # here, before the backward: the OptimizerLoopAdapter's own (categorical) sampling comes later in
            # the step and finds the layer's statistics already taken, so this works with or without it.
            sample_fisher(outputs, "gaussian")
        return 0.5 * (outputs - y).square().sum(1).mean()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.weights.append(self.layer.weight.detach().clone())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return create_optimizer(self.optimizer_name, self.layer.parameters(), model=self.layer, **self.hparams_)


@register_result
@dataclass(frozen=True)
class KFACNaturalGradient(Result):
    """K-FAC is the natural gradient where the Kronecker factorization is exact, so it contracts by 1 - eta."""

    number = 28
    name = "kfac_natural_gradient"
    statement = (
        "one linear layer y = W x with Gaussian inputs and a Gaussian likelihood: the Fisher is exactly "
        "E[x x^T] (x) E[d d^T] = A (x) I (output gradients d ~ N(0, I) independent of x), so K-FAC's "
        "G^-1 grad A^-1 is the natural gradient; on this loss the Fisher is also the Hessian, so with step eta "
        "||W_k - W*|| contracts by exactly 1 - eta in every direction, whatever the conditioning of A "
        "(GD: 1 - eta lambda_min(A))"
    )
    reference = (
        "Martens & Grosse 2015, arXiv:1503.05671, Sec. 3 (exact for independent activations and derivatives); "
        "Amari 1998 (natural gradient); Martens 2020, arXiv:1412.1193 (Fisher = Gauss-Newton for Gaussian "
        "likelihoods)"
    )
    criterion = (
        f"geometric mean of ||W_(k+1) - W*||_F / ||W_k - W*||_F within {KFAC_RATE_RTOL:g} (relative) of 1 - eta while "
        "the error is above 1e-4 of its start (float32), trained through Trainer.fit with a plain LightningModule "
        "and the registry's 'kfac' (Monte-Carlo Fisher, damping 1e-10, no momentum, no KL clipping, statistics "
        "of the current batch); W* the least-squares solution; kappa(A) = 100, where GD would contract at "
        "1 - eta/100"
    )

    samples: int = 2048
    inputs: int = 8
    outputs: int = 3
    lr: float = 0.5
    steps: int = 12
    fisher: str = "mc"

    def __post_init__(self) -> None:
        _positive_int("samples", self.samples, 16)
        _positive_int("inputs", self.inputs, 2)
        _positive_int("outputs", self.outputs)
        _positive_float("lr", self.lr)
        _positive_int("steps", self.steps, 3)
        if self.fisher not in ("mc", "empirical"):
            raise ValueError(f"fisher must be 'mc' or 'empirical', got {self.fisher!r}")

    def problem(self, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, nn.Linear]:
        gen = generator(seed)
        scales = torch.logspace(-1, 0, self.inputs)  # input std 0.1..1: kappa(A) ~ 100
        x = torch.randn(self.samples, self.inputs, generator=gen) * scales
        truth = torch.randn(self.outputs, self.inputs, generator=gen)
        y = x @ truth.T + 0.1 * torch.randn(self.samples, self.outputs, generator=gen)
        layer = nn.Linear(self.inputs, self.outputs, bias=False, device="meta").to_empty(device="cpu")
        with torch.no_grad():
            layer.weight.copy_(torch.randn(self.outputs, self.inputs, generator=gen))
        return x, y, layer

    def predict(self, problem: Any, k: int) -> float:
        """``||W_k - W*|| / ||W_0 - W*||`` for the natural gradient: ``(1 - eta)^k``."""
        return (1.0 - self.lr) ** k

    def check(self, seed: int = 0) -> CheckOutcome:
        x, y, layer = self.problem(seed)
        x64, y64 = x.double(), y.double()
        optimum = torch.linalg.lstsq(x64, y64).solution.T  # W* (outputs, inputs)
        second_moment = x64.T @ x64 / self.samples
        module = _GaussianRegression(
            layer, "kfac", lr=self.lr, momentum=0.0, damping=1e-10, stat_decay=0.0, inv_every=1, kl_clip=None,
            pi_correction=False, fisher=self.fisher, seed=seed,
        )
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=self.samples)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            _fit(_quiet_trainer(max_steps=self.steps), module, loader=loader)
        errors = [float(torch.linalg.matrix_norm(w.double() - optimum)) for w in module.weights]
        used = [k for k in range(len(errors) - 1) if errors[k] > 1e-4 * errors[0]]
        rate = math.exp(sum(math.log(errors[k + 1] / errors[k]) for k in used) / len(used))
        predicted = 1.0 - self.lr
        smallest = float(torch.linalg.eigvalsh(second_moment)[0])
        gd = [float(torch.linalg.matrix_norm((module.weights[0].double() - optimum)
                                             @ torch.linalg.matrix_power(torch.eye(self.inputs, dtype=x64.dtype)
                                                                         - self.lr * second_moment, k)))
              for k in range(len(errors))]
        holds = abs(rate - predicted) <= KFAC_RATE_RTOL * predicted
        ks = list(range(len(errors)))
        return CheckOutcome(
            predicted=predicted, measured=rate, holds=holds, name=self.name,
            quantity="per-step contraction of ||W_k - W*||_F",
            details=f"eta={self.lr:g}, kappa(A)={float(torch.linalg.cond(second_moment)):.3g}, fisher={self.fisher!r}; "
            f"contraction {rate:.4f} vs 1 - eta = {predicted:.4f} over {len(used)} steps; GD would contract at "
            f"1 - eta lambda_min = {1 - self.lr * smallest:.4f}",
            steps=ks, predicted_curve=[errors[0] * predicted**k for k in ks], measured_curve=errors,
            extra_curves={"GD, same step (closed form)": tuple(gd)}, y_label="||W_k - W*||_F",
        )
