"""Implicit bias (result 21) and uniform stability (result 22): what GD/SGD generalize to.

Both run the registry's ``sgd`` on logistic losses with closed-form gradients. For the stability check
many datasets are simulated at once as the rows of one parameter (torch's SGD is coordinate-wise), and
each row has a twin trained on the same dataset with one example replaced, with the same sample order:
the coupling of Hardt, Recht & Singer's proof.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lightning_optsurvey.theory._run import run_optimizer
from lightning_optsurvey.theory.decisions import MC_Z, loglog_slope, mc_bound_violations, mean_and_stderr
from lightning_optsurvey.theory.fields import flag, integer, positive
from lightning_optsurvey.theory.problems import DTYPE, SeparableLogistic, generator
from lightning_optsurvey.theory.result import CheckOutcome, Result, register_result

__all__ = ["ImplicitBiasMaxMargin", "UniformStabilityNonConvex", "UniformStabilitySGD"]

#: The residual r(k) = w(k) - w^ log k - w~ must decay at least like k^(-RESIDUAL_EXPONENT_FRACTION nu), nu the
#: exponent of the linearized residual dynamics (log-log slope fitted on [K/10, K]; seen -0.47 to -0.73
#: for nu = 0.5 over seeds 0-14 at K = 5000: the asymptotic power comes with log k corrections).
RESIDUAL_EXPONENT_FRACTION = 0.8


@register_result
class ImplicitBiasMaxMargin(Result):
    """GD on separable logistic regression converges in direction to the max-margin separator."""

    number = 21
    name = "implicit_bias_max_margin"
    statement = (
        "linearly separable data, logistic loss, GD with step eta < 2/beta: w(k) = w^ log k + w~ + o(1), with "
        "w^ the hard-margin SVM solution and eta exp(-z_n^T w~) = alpha_n on the support vectors, so "
        "w(k)/||w(k)|| -> w^/||w^|| at rate ~ 1/log k"
    )
    reference = (
        "Soudry, Hoffer, Nacson, Gunasekar & Srebro 2018, arXiv:1710.10345, Thm. 3 and the limit w~ of its residual"
    )
    criterion = (
        "the residual r(k) = w(k) - w^ log k - w~ vanishes (the theorem's o(1)): its log-log slope over "
        f"[K/10, K] is at most -{RESIDUAL_EXPONENT_FRACTION:g} nu, nu = min(lambda_min(sum_n alpha_n z_n z_n^T), "
        "theta - 1) the decay exponent of the residual's linearized dynamics dr/dk = -(1/k) sum_n alpha_n "
        "z_n z_n^T r + O(k^-theta) (theta the smallest margin of the other points); and the angle between w(K) "
        "and w^ within asin(||r(K)|| / ||w^ log K + w~||) of atan(|w~_2| / (log K + w~_1)), the o(1) term's "
        "whole effect on the direction; data built so that w^ = e_1 and the duals are known in closed form"
    )

    steps: int = integer(5000, low=100)
    lr_scale: float = positive(1.0)

    def problem(self, seed: int = 0) -> SeparableLogistic:
        return SeparableLogistic.build(generator(seed))

    def predict(self, problem: SeparableLogistic, k: int) -> float:
        """The predicted angle (radians) between ``w(k)`` and the max-margin direction."""
        offset = problem.offset(self.lr_scale / problem.smoothness)
        return math.atan2(abs(float(offset[1])), math.log(k) + float(offset[0]))

    @staticmethod
    def residual_exponent(problem: SeparableLogistic) -> float:
        """``nu = min(lambda_min(sum_n alpha_n z_n z_n^T), theta - 1)`` over the support vectors ``z_n``."""
        duals = torch.tensor(problem.duals, dtype=DTYPE)
        support = problem.points[:2]
        damping = float(torch.linalg.eigvalsh((support.T * duals) @ support)[0])
        theta = float((problem.points[2:] @ problem.max_margin).min()) if len(problem.points) > 2 else math.inf
        return min(damping, theta - 1.0)

    def check(self, seed: int = 0) -> CheckOutcome:
        p = self.problem(seed)
        lr = self.lr_scale / p.smoothness
        offset = p.offset(lr)
        ws, _ = run_optimizer("sgd", torch.zeros(2, dtype=DTYPE), lambda w, k: p.gradient(w), self.steps, lr=lr)
        checkpoints = sorted({round(t) for t in torch.logspace(1, math.log10(self.steps), 30).tolist()})
        angles = [math.atan2(abs(float(ws[t, 1])), float(ws[t, 0])) for t in checkpoints]
        predicted = [self.predict(p, t) for t in checkpoints]

        def residual(t: int) -> float:
            return float(torch.linalg.vector_norm(ws[t] - p.max_margin * math.log(t) - offset))

        nu = self.residual_exponent(p)
        window = [t for t in range(max(self.steps // 10, 1), self.steps + 1, max(self.steps // 100, 1))]
        slope = loglog_slope(window, [residual(t) for t in window])
        late = residual(self.steps)
        asymptote = float(torch.linalg.vector_norm(p.max_margin * math.log(self.steps) + offset))
        allowance = math.asin(min(1.0, late / asymptote))
        angle_ok = abs(angles[-1] - predicted[-1]) <= allowance
        holds = angle_ok and slope <= -RESIDUAL_EXPONENT_FRACTION * nu and lr < 2.0 / p.smoothness
        return CheckOutcome(
            predicted=predicted[-1], measured=angles[-1], holds=holds, name=self.name,
            quantity=f"angle(w(K), w^) at K={self.steps} (radians)",
            details=f"eta={lr:.4g} (smoothness {p.smoothness:.4g}), w^=(1, 0), w~=({float(offset[0]):.4f}, "
            f"{float(offset[1]):.4f}); residual {residual(window[0]):.3g} at K/10 -> {late:.3g} at K, log-log slope "
            f"{slope:.3f} (nu = {nu:.3g}); |angle - prediction| = {abs(angles[-1] - predicted[-1]):.2e} <= "
            f"{allowance:.2e}",
            steps=checkpoints, predicted_curve=predicted, measured_curve=angles, y_label="angle to w^ (rad)",
            log_x=True,
        )


@dataclass(frozen=True)
class _LogisticDistribution:
    """Features of norm at most 1 (so ``G = 1``, ``beta = 1/4``); linear labels flipped with probability ``noise``."""

    direction: torch.Tensor
    noise: float

    def sample(self, shape: tuple[int, ...], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.direction.numel()
        g = torch.randn(*shape, d, generator=gen, dtype=DTYPE) / math.sqrt(d) * 1.5
        x = g / torch.linalg.vector_norm(g, dim=-1, keepdim=True).clamp_min(1.0)
        y = torch.sign(x @ self.direction)
        flip = torch.rand(shape, generator=gen, dtype=DTYPE) < self.noise
        return x, torch.where(flip, -y, y)


def _logistic_loss(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample logistic losses of the runs ``w`` ``(R, d)`` on ``x`` ``(R, n, d)`` or shared ``(n, d)``."""
    logits = w @ x.T if x.ndim == 2 else torch.bmm(x, w.unsqueeze(-1)).squeeze(-1)
    return torch.nn.functional.softplus(-y * logits)


@dataclass(frozen=True)
class _CoupledSGDCheck(Result):
    """SGD from 0 on ``runs`` pairs of samples S, S' that differ in their first example, in the same order."""

    samples: int = integer(50, low=2)
    dim: int = integer(5)
    runs: int = integer(500, low=10)
    epochs: int = integer(2)
    test_size: int = integer(4000, low=10)

    def problem(self, seed: int = 0) -> _LogisticDistribution:
        gen = generator(seed)
        direction = torch.randn(self.dim, generator=gen, dtype=DTYPE)
        return _LogisticDistribution(direction / torch.linalg.vector_norm(direction), 0.2)

    def coupled_runs(self, seed: int, loss_slope: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     **hparams: Any) -> tuple[_LogisticDistribution, torch.Generator, int, torch.Tensor, torch.Tensor,
                                              torch.Tensor]:
        """Run the registry's ``sgd`` on the coupled samples, each step on one example ``(x, y)`` of each.

        Args:
            seed: The problem's seed (the samples and the order are drawn from ``seed + 1``).
            loss_slope: ``loss_slope(y, margin)``, the loss's derivative in ``w^T x`` (the gradient is
                ``loss_slope * x``).
            **hparams: Passed to :func:`run_optimizer` (``lr``, ``before_step``).

        Returns:
            The distribution, the generator (to draw test points from), the number of steps, the samples
            ``S`` (``x``, ``y``) and the iterates ``(steps + 1, 2 runs, dim)``: the runs on S, then on S'.
        """
        dist = self.problem(seed)
        gen = generator(seed + 1)
        steps = self.epochs * self.samples
        x, y = dist.sample((self.runs, self.samples), gen)
        x2, y2 = x.clone(), y.clone()
        x2[:, 0], y2[:, 0] = dist.sample((self.runs,), gen)
        features, labels = torch.cat([x, x2]), torch.cat([y, y2])
        order = torch.randint(self.samples, (steps, self.runs), generator=gen).repeat(1, 2)
        rows = torch.arange(2 * self.runs)

        def gradient(w: torch.Tensor, k: int) -> torch.Tensor:
            xi, yi = features[rows, order[k]], labels[rows, order[k]]
            return loss_slope(yi, (xi * w).sum(-1)).unsqueeze(-1) * xi

        iterates, _ = run_optimizer(
            "sgd", torch.zeros(2 * self.runs, self.dim, dtype=DTYPE), gradient, steps, **hparams
        )
        return dist, gen, steps, x, y, iterates


@register_result
class UniformStabilitySGD(_CoupledSGDCheck):
    """SGD on a convex, smooth, Lipschitz loss is uniformly stable, which bounds its generalization gap."""

    number = 22
    name = "sgd_uniform_stability"
    statement = (
        "loss convex, beta-smooth, G-Lipschitz, SGD with steps eta_t <= 2/beta for T steps on n samples: "
        "epsilon-uniformly stable with epsilon <= 2 G^2 sum_t eta_t / n, hence "
        "|E[R(w_T) - R_S(w_T)]| <= 2 G^2 sum_t eta_t / n"
    )
    reference = "Hardt, Recht & Singer 2016, arXiv:1509.01240, Thm. 3.8 and Thm. 2.2"
    criterion = (
        f"parameter stability G E||w_t - w'_t|| (coupled runs on S and S' differing in one example) below "
        f"2 G^2 eta t / n at every t, and the generalization gap (test set of 4000 fresh draws) below the bound "
        f"at T, both with {MC_Z:g} standard errors of Monte-Carlo allowance; logistic loss with ||x|| <= 1: "
        "G = 1, beta = 1/4"
    )

    lr: float = positive(0.5)

    def predict(self, problem: _LogisticDistribution, k: int) -> float:
        """``2 G^2 eta k / n`` with ``G = 1``: the stability bound after ``k`` steps."""
        return 2.0 * self.lr * k / self.samples

    def check(self, seed: int = 0) -> CheckOutcome:
        dist, gen, steps, x, y, iterates = self.coupled_runs(
            seed, lambda y, margin: -y * torch.sigmoid(-y * margin), lr=self.lr
        )
        distances = torch.linalg.vector_norm(iterates[:, : self.runs] - iterates[:, self.runs :], dim=-1)
        w = iterates[-1, : self.runs]
        mean_stab, err_stab = mean_and_stderr(distances)
        bound = [self.predict(dist, t) for t in range(steps + 1)]
        violations = mc_bound_violations(mean_stab.tolist(), err_stab.tolist(), bound)
        x_test, y_test = dist.sample((self.test_size,), gen)
        test = _logistic_loss(w, x_test, y_test).mean(1)
        train = _logistic_loss(w, x, y).mean(1)
        gap, gap_err = map(float, mean_and_stderr(test - train))
        holds = violations == 0 and abs(gap) - MC_Z * gap_err <= bound[-1] and self.lr <= 8.0
        return CheckOutcome(
            predicted=bound[-1], measured=gap, holds=holds, name=self.name,
            quantity=f"generalization gap after T={steps} steps (n={self.samples})",
            details=f"eta={self.lr:g}, T={steps}, n={self.samples}, {self.runs} datasets; gap {gap:.4f} +- "
            f"{gap_err:.2g}; stability G E||w_T - w'_T|| = {float(mean_stab[-1]):.4f} <= {bound[-1]:.4f}, "
            f"violations {violations}/{steps + 1}",
            steps=list(range(steps + 1)), predicted_curve=bound, measured_curve=mean_stab.tolist(),
            y_label="G E||w_t - w'_t||", log_y=False,
        )


def _sigmoid_loss(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample sigmoid losses ``sigmoid(-y w^T x)`` in [0, 1] (non-convex in ``w``); shapes as ``_logistic_loss``."""
    logits = w @ x.T if x.ndim == 2 else torch.bmm(x, w.unsqueeze(-1)).squeeze(-1)
    return torch.sigmoid(-y * logits)


@register_result
class UniformStabilityNonConvex(_CoupledSGDCheck):
    """SGD with steps c/t on a smooth, Lipschitz, bounded non-convex loss is uniformly stable."""

    number = 34
    name = "sgd_stability_nonconvex"
    statement = (
        "loss in [0, 1], L-Lipschitz and beta-smooth (non-convex), SGD with steps alpha_t <= c/t for T steps on n "
        "samples: epsilon-uniformly stable with epsilon <= (1 + 1/(beta c))/(n - 1) (2 c L^2)^(1/(beta c + 1)) "
        "T^(beta c/(beta c + 1)), hence |E[R(w_T) - R_S(w_T)]| <= epsilon"
    )
    reference = "Hardt, Recht & Singer 2016, arXiv:1509.01240, Thm. 3.12 (and Thm. 2.2)"
    criterion = (
        "the stability E|l(w_T; z) - l(w'_T; z)| of coupled runs on S and S' (one example replaced, same sample "
        "order), its largest value over 200 fresh points z, and the generalization gap (4000 fresh draws), all "
        f"below epsilon with {MC_Z:g} standard errors of Monte-Carlo allowance; sigmoid loss sigmoid(-y w^T x) with "
        "||x|| <= 1: L = 1/4, beta = 1/(6 sqrt 3); the registry's 'sgd' with its lr set to c/t before step t"
    )

    epochs: int = integer(4)
    c: float = positive(2.0)
    decaying: bool = flag(True)

    def predict(self, problem: _LogisticDistribution, k: int) -> float:
        """Hardt et al.'s epsilon after ``k`` steps with ``L = 1/4``, ``beta = 1/(6 sqrt 3)``."""
        lip, beta, c = 0.25, 1.0 / (6.0 * math.sqrt(3.0)), self.c
        exponent = beta * c / (beta * c + 1.0)
        return (1.0 + 1.0 / (beta * c)) / (self.samples - 1) * (2 * c * lip**2) ** (1 / (beta * c + 1)) * k**exponent

    def check(self, seed: int = 0) -> CheckOutcome:
        def sigmoid_slope(y: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
            s = torch.sigmoid(-y * margin)
            return -y * s * (1.0 - s)

        def schedule(optimizer: torch.optim.Optimizer, k: int) -> None:
            optimizer.param_groups[0]["lr"] = self.c / (k + 1) if self.decaying else self.c

        dist, gen, steps, x, y, iterates = self.coupled_runs(seed, sigmoid_slope, before_step=schedule, lr=self.c)
        w, w2 = iterates[-1, : self.runs], iterates[-1, self.runs :]
        probes, probe_labels = dist.sample((200,), gen)
        differences = (_sigmoid_loss(w, probes, probe_labels) - _sigmoid_loss(w2, probes, probe_labels)).abs()
        per_point, per_point_err = mean_and_stderr(differences.T)  # (200,): E over runs at each z
        worst = int(per_point.argmax())
        x_test, y_test = dist.sample((self.test_size,), gen)
        gaps = _sigmoid_loss(w, x_test, y_test).mean(1) - _sigmoid_loss(w, x, y).mean(1)
        gap, gap_err = map(float, mean_and_stderr(gaps))
        epsilon = self.predict(dist, steps)
        stable = float(per_point[worst]) - MC_Z * float(per_point_err[worst]) <= epsilon
        holds = stable and abs(gap) - MC_Z * gap_err <= epsilon and self.decaying
        ks = list(range(1, steps + 1))
        # Stability along the run, at the worst probe, for the figure.
        along = [
            float((_sigmoid_loss(iterates[t, : self.runs], probes[worst : worst + 1], probe_labels[worst : worst + 1])
                   - _sigmoid_loss(iterates[t, self.runs :], probes[worst : worst + 1],
                                   probe_labels[worst : worst + 1])).abs().mean())
            for t in ks
        ]
        return CheckOutcome(
            predicted=epsilon, measured=float(per_point[worst]), holds=holds, name=self.name,
            quantity=f"sup_z E|l(w_T; z) - l(w'_T; z)| after T={steps} steps (n={self.samples})",
            details=f"c={self.c:g}, steps {'c/t' if self.decaying else 'c (constant: outside the theorem)'}, "
            f"T={steps}, n={self.samples}, {self.runs} datasets; stability {float(per_point[worst]):.4f} (mean over "
            f"probes {float(per_point.mean()):.4f}), gap {gap:.4f} +- {gap_err:.2g}, epsilon {epsilon:.4f}",
            steps=ks, predicted_curve=[self.predict(dist, t) for t in ks], measured_curve=along,
            y_label="E|l(w_t; z) - l(w'_t; z)| (worst probe z)", log_y=False,
        )
