"""Results checked on networks trained through Lightning's ``Trainer``: results 28 and 35-38.

Unlike the synthetic checks, these train a real (small) network on the digits task with a registered
optimizer, through ``Trainer.fit`` with the package's ``DigitsDataModule`` and measuring callbacks, and
compare what is measured with the theorem's prediction:

- the edge of stability (full-batch GD with MSE reaches ``eta lambda_max = 2`` and hovers there), read
  from the :class:`~lightning_optsurvey.callbacks.EdgeOfStability` callback;
- a PAC-Bayes bound built from :func:`~lightning_optsurvey.measures.pac_bayes_sigma` that must upper-bound
  the held-out error of the stochastic network;
- K-FAC's step equals the natural-gradient step where the Kronecker factorization is exact (one linear
  layer, Gaussian inputs, Gaussian likelihood), so its error contracts by ``1 - eta`` whatever the
  conditioning, measured on the optimizer registered as ``"kfac"``;
- SAM's sharpness at a trained minimum is ``rho^2 lambda_max / 2`` to second order, with ``lambda_max``
  read from the :class:`~lightning_optsurvey.callbacks.HessianSpectrum` callback and the sharpness from
  :func:`~lightning_optsurvey.measures.worst_case_sharpness`;
- D-PSGD's consensus distance contracts by ``|lambda_2(W)|^2`` per gossip round on the ring, with the
  mixing matrix of :class:`~lightning_optsurvey.strategies.Topology`. The ranks are simulated in one
  process (each a real network with its own registered optimizer, mixed by ``X <- W X`` as
  ``GossipStrategy`` does after its step): a multi-process gloo run costs seconds of start-up alone,
  beyond this check's budget; the strategy's own tests check that its rounds are this arithmetic.

The networks are initialized from a seeded generator and training runs inside ``torch.random.fork_rng``,
so the checks leave the global RNG as they found it.
"""

from __future__ import annotations

import logging
import math
import warnings
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.func import functional_call

from lightning_optsurvey.averaging import Topology
from lightning_optsurvey.callbacks import EdgeOfStability, HessianSpectrum
from lightning_optsurvey.measures import FlatObjective, pac_bayes_sigma, worst_case_sharpness
from lightning_optsurvey.optim import create_optimizer
from lightning_optsurvey.tasks import ClassifierModule, DigitsDataModule
from lightning_optsurvey.theory.decentralized import second_eigenvalue_modulus
from lightning_optsurvey.theory.decisions import MC_Z, loglog_slope
from lightning_optsurvey.theory.fields import choice, flag, integer, positive, positives, real
from lightning_optsurvey.theory.landscape import edge_of_stability_outcome
from lightning_optsurvey.theory.problems import generator
from lightning_optsurvey.theory.result import CheckOutcome, Result, register_result

__all__ = [
    "EdgeOfStabilityDigits",
    "GossipConsensusDigits",
    "KFACNaturalGradient",
    "PACBayesDigits",
    "SAMSharpnessDigits",
    "kl_inverse",
]

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

    lr: float = positive(3.0)
    steps: int = integer(300, low=20)
    width: int = integer(32)
    every: int = integer(15)

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
        early = min(ratios[: max(len(ratios) // 4, 1)])
        bands = (EOS_DIGITS_START, EOS_DIGITS_REACH, EOS_DIGITS_MEDIAN_BAND, EOS_DIGITS_RANGE_BAND)
        return edge_of_stability_outcome(
            self.name, threshold, ratios, "lowest early", early, bands, steps=steps, measured_curve=values,
            quantity="median eta lambda_max over the second half of training",
            details=(f"eta={self.lr:g}, threshold {threshold:g} (rule of stability_scaling); eta lambda_max/2: ",
                     f"{len(values)} measurements"),
            y_label="eta lambda_max (EdgeOfStability callback)",
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

    epochs: int = integer(3)
    lr: float = positive(0.05)
    hidden: int = integer(32)
    max_deviation: float = positive(0.3)
    draws: int = integer(100, low=10)
    delta: float = real(0.05, low=0.0, high=1.0, low_open=True, high_open=True)
    grid: int = integer(20)
    shift: bool = flag(False)

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

    samples: int = integer(2048, low=16)
    inputs: int = integer(8, low=2)
    outputs: int = integer(3)
    lr: float = positive(0.5)
    steps: int = integer(12, low=3)
    fisher: str = choice("mc", ("mc", "empirical"))

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
            layer, "kfac", lr=self.lr, momentum=0.0, damping=1e-10, stat_decay=0.0, inv_every=1, stat_every=1,
            kl_clip=None, pi_correction=False, fisher=self.fisher, seed=seed,
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


#: SAM sharpness on digits: at each radius, |S(rho) - rho^2 lambda_max / 2| must be at most the measured
#: gradient term rho ||grad L|| plus this fraction of rho^2 lambda_max / 2 (the Taylor remainder and the
#: ascent's shortfall together; seen 0.1 % - 4 % on seeds 0-2) ...
SAM_DIGITS_RTOL = 0.1
#: ... and the exponent of S in rho (log-log slope over the radii) within this distance of 2, the order of
#: the leading term (a point far from a minimum shows 1: the gradient term rho ||grad L|| dominates).
SAM_DIGITS_EXPONENT_ATOL = 0.15


@register_result
class SAMSharpnessDigits(Result):
    """At a minimum reached by training a digits network, SAM's sharpness is rho^2 lambda_max / 2."""

    number = 37
    name = "sam_sharpness_digits"
    statement = (
        "at a point w of a twice differentiable loss, L(w + e) - L(w) = grad L(w)^T e + e^T H e / 2 + O(||e||^3), "
        "so at a minimum (grad L = 0) max_(||e|| <= rho) L(w + e) - L(w) = rho^2 lambda_max(H)/2 + O(rho^3); near "
        "a minimum the gradient term adds at most rho ||grad L(w)||"
    )
    reference = (
        "Foret, Kleiner, Mobahi & Neyshabur 2021, arXiv:2010.01412, Sec. 2 (SAM's sharpness and its second-order "
        "reading); survey Sec. 4.1"
    )
    criterion = (
        "the network trained through Trainer.fit (plain LightningModule, MSE on one-hot labels, DigitsDataModule "
        "with 269 training images in one batch, the registry's 'sgd' with heavy-ball momentum 0.9); lambda_max "
        "read from the HessianSpectrum callback at the last step (Lanczos on the same full batch); worst-case "
        "sharpness S(rho) (measures.worst_case_sharpness, Auto-PGD) on that batch for each radius: "
        f"|S(rho) - rho^2 lambda_max / 2| <= rho ||grad L(w)|| + {SAM_DIGITS_RTOL:g} rho^2 lambda_max / 2, and the "
        f"log-log slope of S against rho within {SAM_DIGITS_EXPONENT_ATOL:g} of 2"
    )

    steps: int = integer(150)
    lr: float = positive(0.5)
    width: int = integer(32)
    radii: tuple[float, ...] = positives((0.02, 0.05, 0.1, 0.2), min_length=2)
    ascent_steps: int = integer(100)

    def problem(self, seed: int = 0) -> tuple[DigitsDataModule, nn.Module]:
        # 15 % of the 1797 images for training: one full batch of 269.
        data = DigitsDataModule(batch_size=1797, val_fraction=0.4, test_fraction=0.45, seed=seed)
        return data, _network((64, self.width, 10), generator(seed))

    def predict(self, problem: Any, k: int, lam: float | None = None) -> float:
        """``rho^2 lambda_max / 2`` for the radius of index ``k`` (``lam`` measured on the trained network)."""
        if lam is None:
            raise ValueError("sam_sharpness_digits predicts from the trained network's lambda_max; pass lam")
        return 0.5 * self.radii[k] ** 2 * lam

    def check(self, seed: int = 0) -> CheckOutcome:
        data, net = self.problem(seed)
        spectrum = HessianSpectrum(top_k=2, every_n_epochs=None, every_n_steps=self.steps, num_batches=1, tol=1e-4,
                                   seed=seed)
        module = _MSEModule(net, "sgd", lr=self.lr, momentum=0.9)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            trainer = _quiet_trainer(max_steps=self.steps, callbacks=[spectrum], limit_val_batches=0)
            _fit(trainer, module, data)
        (last,) = [h for h in spectrum.history if "hessian/eig_1" in h][-1:]
        lam, lam2 = last["hessian/eig_1"], last["hessian/eig_2"]
        batches = [data.train_set.tensors]
        objective = FlatObjective(net, _mse_one_hot, batches)
        loss, grad = objective.loss_and_grad()
        grad_norm = float(grad.norm())
        measured = [
            worst_case_sharpness(net, _mse_one_hot, batches, rho=rho, steps=self.ascent_steps,
                                 generator=generator(seed + 1))
            for rho in self.radii
        ]
        predicted = [self.predict(None, k, lam) for k in range(len(self.radii))]
        within = [abs(s - q) <= rho * grad_norm + SAM_DIGITS_RTOL * q
                  for s, q, rho in zip(measured, predicted, self.radii, strict=True)]
        exponent = loglog_slope(self.radii, measured)
        holds = all(within) and abs(exponent - 2.0) <= SAM_DIGITS_EXPONENT_ATOL
        return CheckOutcome(
            predicted=predicted[-1], measured=measured[-1], holds=holds, name=self.name,
            quantity=f"worst-case sharpness at rho={self.radii[-1]:g} against rho^2 lambda_max / 2",
            details=f"after {self.steps} steps: loss {float(loss):.3g}, ||grad L|| = {grad_norm:.2g}, lambda_max = "
            f"{lam:.4g} (lambda_2 = {lam2:.4g}, HessianSpectrum); S / (rho^2 lambda_max/2): "
            + ", ".join(f"rho={rho:g}: {s / q:.3f} (gradient term <= {rho * grad_norm / q:.2g})"
                        for rho, s, q in zip(self.radii, measured, predicted, strict=True))
            + f"; exponent of S in rho {exponent:.3f}",
            steps=list(self.radii), predicted_curve=predicted, measured_curve=measured, x_label="rho",
            y_label="max_(||e||<=rho) L(w+e) - L(w)", log_x=True,
        )


#: Gossip on digits: slack of the per-round bound ||(I - J) W Y|| <= |lambda_2| ||(I - J) Y|| (float32
#: parameters mixed in float64: the rounding of the written-back parameters) ...
GOSSIP_DIGITS_RTOL = 1e-5
#: ... and two-sided relative band on the geometric mean of the per-round contraction of the squared
#: consensus distance against |lambda_2|^2 (seen within 0.3 %), over the rounds after a burn-in in which
#: the faster modes of W die out (until (|lambda'| / |lambda_2|)^(2k) <= GOSSIP_DIGITS_MODE_DECAY, lambda' the
#: next smaller eigenvalue modulus: 4 rounds on the ring of 8, where it is 1/3 against 0.80) and in which
#: the local steps' disagreement eta ||(I - J) G_k|| is at most GOSSIP_DIGITS_SMALL of ||(I - J) X_k|| (the
#: theorem's contraction is that of the mixing; the steps add disagreement back, which takes over once
#: the consensus distance is down to their level: a floor, seen from round ~20 at eta = 0.01).
GOSSIP_DIGITS_RATE_RTOL = 0.03
GOSSIP_DIGITS_MODE_DECAY = 1e-3
GOSSIP_DIGITS_SMALL = 0.05
#: Rounds the rate must be fitted on, at least.
GOSSIP_DIGITS_MIN_ROUNDS = 3
#: Mixing matrices the check can apply: Topology.mixing_matrix (doubly stochastic, the assumption) or
#: Topology.push_sum_matrix (column-stochastic only, without push-sum's de-biasing weights).
GOSSIP_DIGITS_MIXINGS = ("metropolis", "push_sum")


@register_result
class GossipConsensusDigits(Result):
    """D-PSGD on digits networks: the consensus distance contracts by |lambda_2(W)|^2 per gossip round."""

    number = 38
    name = "gossip_consensus_digits"
    statement = (
        "D-PSGD (adapt then combine), X_(k+1) = W (X_k - eta G_k) with W symmetric doubly stochastic on a "
        "connected graph: (I - J) W = W (I - J) and ||W - J|| = |lambda_2(W)| < 1 (J = 11^T/N), so the squared "
        "consensus distance obeys ||(I - J) X_(k+1)||^2 <= |lambda_2|^2 ||(I - J)(X_k - eta G_k)||^2 <= "
        "|lambda_2|^2 (||(I - J) X_k|| + eta ||(I - J) G_k||)^2, and contracts by |lambda_2|^2 per round while "
        "the disagreement of the local steps is small"
    )
    reference = (
        "Lian, Zhang, Zhang, Hsieh, Zhang & Liu 2017, arXiv:1705.09056, Sec. 4 (the consensus term of Thm. 1, "
        "rho = |lambda_2(W)|^2 in their notation); Xiao & Boyd 2004, Sec. 2"
    )
    criterion = (
        "N = 8 networks (tanh MLP 64-16-10, independently initialized) on disjoint shards of the digits, each "
        "with its own optimizer from the registry ('sgd', eta = 0.01, batches of 16, cross-entropy), mixed after "
        "each local step with row i of Topology('ring', 8).mixing_matrix() (GossipStrategy's arithmetic, the "
        "ranks simulated in one process); at every round ||(I - J) W Y_k||^2 <= |lambda_2|^2 ||(I - J) Y_k||^2 "
        f"(Y_k the parameters after the local steps; slack {GOSSIP_DIGITS_RTOL:g} relative), and the geometric "
        "mean of ||(I - J) X_(k+1)||^2 / ||(I - J) X_k||^2 within "
        f"{GOSSIP_DIGITS_RATE_RTOL:g} (relative) of |lambda_2|^2 (|lambda_2| from torch.linalg.eigvals(W)), over "
        f"the rounds k after a burn-in (the smaller moduli decayed by {GOSSIP_DIGITS_MODE_DECAY:g} against "
        f"|lambda_2|^(2k): k >= 4 on the ring of 8) where eta ||(I - J) G_k|| <= {GOSSIP_DIGITS_SMALL:g} "
        f"||(I - J) X_k||, at least {GOSSIP_DIGITS_MIN_ROUNDS} of them"
    )

    world_size: int = integer(8, low=3)
    kind: str = "ring"
    mixing: str = choice("metropolis", GOSSIP_DIGITS_MIXINGS)
    rounds: int = integer(20, low=4)
    lr: float = positive(0.01)
    batch_size: int = integer(16)
    width: int = integer(16)

    def validate(self) -> None:
        topology = Topology(self.kind, self.world_size)  # refuses unknown kinds and impossible sizes
        if topology.is_time_varying:
            raise ValueError(f"gossip_consensus_digits needs a static graph; {self.kind!r} is time-varying")
        if second_eigenvalue_modulus(self.problem()[0]) <= 1e-12:
            raise ValueError(f"{self.kind!r} on {self.world_size} ranks averages exactly in one round "
                             "(|lambda_2| = 0): no contraction rate to compare")

    def problem(self, seed: int = 0) -> tuple[torch.Tensor, list[nn.Module], torch.Tensor, torch.Tensor]:
        """The mixing matrix, the N independently initialized networks and the digits training set."""
        topology = Topology(self.kind, self.world_size)
        w = topology.mixing_matrix(0) if self.mixing == "metropolis" else topology.push_sum_matrix(0)
        gen = generator(seed)
        nets = [_network((64, self.width, 10), gen) for _ in range(self.world_size)]
        data = DigitsDataModule(batch_size=self.batch_size, val_fraction=0.1, test_fraction=0.1, seed=seed)
        data.setup()
        x, y = data.train_set.tensors
        return w, nets, x, y

    def predict(self, problem: Any, k: int) -> float:
        """The pure-gossip factor ``|lambda_2(W)|^(2k)`` on the squared consensus distance."""
        return second_eigenvalue_modulus(problem[0]) ** (2 * k)

    @staticmethod
    def burn_in(w: torch.Tensor) -> int:
        """Rounds until the modes below ``|lambda_2|`` have decayed by ``GOSSIP_DIGITS_MODE_DECAY`` against it."""
        moduli = torch.linalg.eigvals(w).abs().sort(descending=True).values.tolist()[1:]
        lam2 = moduli[0]
        below = [m for m in moduli if m < lam2 * (1.0 - 1e-9)]
        if not below or below[0] <= 0.0:
            return 1
        return max(1, math.ceil(math.log(GOSSIP_DIGITS_MODE_DECAY) / (2.0 * math.log(below[0] / lam2))))

    def check(self, seed: int = 0) -> CheckOutcome:
        w, nets, x, y = self.problem(seed)
        lam2 = second_eigenvalue_modulus(w)
        burn_in = self.burn_in(w)
        n = self.world_size
        optimizers = [create_optimizer("sgd", net.parameters(), lr=self.lr) for net in nets]
        gen = generator(seed + 1)
        shards = torch.randperm(len(y), generator=gen).chunk(n)

        def stacked() -> torch.Tensor:
            return torch.stack([torch.cat([p.detach().reshape(-1) for p in net.parameters()]) for net in nets]).double()

        def distance2(params: torch.Tensor) -> float:
            return float((params - params.mean(0, keepdim=True)).square().sum())

        distances, ratios, violations, used = [distance2(stacked())], [], 0, []
        for k in range(self.rounds):
            before_step = stacked()
            for net, optimizer, shard in zip(nets, optimizers, shards, strict=True):
                batch = shard[torch.randint(len(shard), (self.batch_size,), generator=gen)]
                optimizer.zero_grad()
                F.cross_entropy(net(x[batch]), y[batch]).backward()
                optimizer.step()  # adapt ...
            after_step = stacked()
            mixed = w @ after_step  # ... then combine: x_i <- sum_j W_ij y_j
            with torch.no_grad():
                for net, row in zip(nets, mixed, strict=True):
                    torch.nn.utils.vector_to_parameters(row.to(torch.float32), net.parameters())
            now, before = distance2(stacked()), distance2(after_step)
            violations += now > lam2**2 * before * (1.0 + GOSSIP_DIGITS_RTOL)
            if k >= burn_in and distance2(after_step - before_step) <= GOSSIP_DIGITS_SMALL**2 * distances[-1]:
                used.append(k)
                ratios.append(now / distances[-1])
            distances.append(now)
        rate = math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else math.nan
        predicted = lam2**2
        holds = (violations == 0 and len(used) >= GOSSIP_DIGITS_MIN_ROUNDS
                 and abs(rate - predicted) <= GOSSIP_DIGITS_RATE_RTOL * predicted)
        ks = list(range(self.rounds + 1))
        rows, columns = w.sum(1), w.sum(0)
        window = f"rounds {used[0]}-{used[-1]}" if used else "no round"
        anchor = used[0] if used else 0  # the predicted line through the first round of the fitted window
        return CheckOutcome(
            predicted=predicted, measured=rate, holds=holds, name=self.name,
            quantity=f"per-round contraction of the squared consensus distance ({self.kind}, N={n})",
            details=f"{self.mixing} W (row sums in [{float(rows.min()):.3g}, {float(rows.max()):.3g}], column sums "
            f"in [{float(columns.min()):.3g}, {float(columns.max()):.3g}]), |lambda_2|^2 = {predicted:.4f}; "
            f"contraction {rate:.4f} over {len(used)} rounds (burn-in {burn_in}; {window}); bound violated at "
            f"{violations} of {self.rounds} rounds; consensus distance^2 {distances[0]:.3g} -> {distances[-1]:.3g}",
            steps=ks, predicted_curve=[distances[anchor] * predicted ** (k - anchor) for k in ks],
            measured_curve=distances, extra_curves={"|lambda_2|^(2k) from round 0": [distances[0] * predicted**k
                                                                                     for k in ks]},
            x_label="gossip round", y_label="||X_k - 1 xbar_k||_F^2",
        )
