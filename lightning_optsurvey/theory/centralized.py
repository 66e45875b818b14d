"""Centralized distributed methods: local SGD against mini-batch SGD (17) and EASGD's stability (18).

EASGD runs :func:`~lightning_optsurvey.strategies.easgd.easgd_step`, the update rule that
``EASGDStrategy`` applies on every rank, on all workers at once. ``LocalSGDStrategy`` exposes no update
function (its averaging is an all-reduce inside the strategy), so local SGD is simulated exactly as
the synchronous method analysed in the papers: ``N`` workers each take ``H`` steps of the registry's
``sgd`` on their own samples (the workers are rows of one parameter; torch's SGD is coordinate-wise),
then every worker is replaced by the workers' average, which is what the strategy's all-reduce does.
"""

from __future__ import annotations

import cmath
import math
from dataclasses import dataclass

import torch

from lightning_optsurvey.strategies.easgd import easgd_is_stable, easgd_step
from lightning_optsurvey.theory._run import run_optimizer
from lightning_optsurvey.theory.problems import DTYPE, NoisyQuadratic, Quadratic, generator
from lightning_optsurvey.theory.result import (
    MC_Z,
    CheckOutcome,
    Result,
    _positive_float,
    _positive_int,
    mean_and_stderr,
    register_result,
    tail_rate,
)

__all__ = ["EASGDStability", "LocalSGDvsMinibatch", "easgd_spectral_radius"]

#: Grid points whose predicted spectral radius is within this distance of 1 are not classified (the
#: decay or growth is too slow to see in the simulated steps).
STABILITY_MARGIN = 0.02
#: Relative band on the growth rate fitted on the last half of the steps against the spectral radius
#: (complex pairs make the norm oscillate around the rate).
EASGD_RATE_RTOL = 0.05


def _minibatch_expectation(problem: NoisyQuadratic, lr: float, batch: int, steps: int) -> list[float]:
    """``E f(x_t) - f*`` for ``t = 0..steps`` of SGD with a batch of ``batch`` draws (with replacement), from 0.

    Mean and covariance of the error follow ``m <- (I - lr A) m`` and
    ``C <- (I - lr A) C (I - lr A) + lr^2 Sigma / batch`` exactly on the quadratic.
    """
    q = problem.quadratic
    contraction = torch.eye(q.dim, dtype=DTYPE) - lr * q.matrix
    mean = -q.minimizer.clone()
    covariance = torch.zeros(q.dim, q.dim, dtype=DTYPE)
    values = []
    for _ in range(steps + 1):
        values.append(0.5 * float(mean @ q.matrix @ mean + (q.matrix * covariance).sum()))
        mean = contraction @ mean
        covariance = contraction @ covariance @ contraction + lr**2 * problem.covariance / batch
    return values


@register_result
@dataclass(frozen=True)
class LocalSGDvsMinibatch(Result):
    """On quadratics, local SGD's average is mini-batch SGD with batch N, whatever the number of local steps."""

    number = 17
    name = "local_sgd_vs_minibatch"
    statement = (
        "quadratic f, N workers, unbiased noise of covariance Sigma, step eta: local SGD with H local steps "
        "and R rounds has E f(xbar) of mini-batch SGD with batch N after HR steps (same gradients) for every "
        "H, because the average follows xbar <- xbar - eta (A(xbar - x*) + mean_i xi_i); mini-batch SGD "
        "with batch NH and R steps (same gradients and rounds) follows its own closed form"
    )
    reference = (
        "Woodworth, Patel, Stich, Dai, Bullins, McMahan, Shamir & Srebro 2020, arXiv:2002.07839 "
        "(local SGD on quadratic objectives); Stich 2019, arXiv:1805.09767"
    )
    criterion = (
        f"for H in the list, E f(xbar) - f* at every synchronization within {MC_Z:g} standard errors of the "
        "closed-form mini-batch-N value (mean and covariance recursions), and mini-batch SGD with batch NH "
        f"within {MC_Z:g} standard errors of its own closed form"
    )

    dim: int = 5
    workers: int = 4
    rounds: int = 20
    local_steps: tuple[int, ...] = (1, 4, 16)
    lr: float = 0.1
    runs: int = 200
    sigma2: float = 1.0

    def __post_init__(self) -> None:
        _positive_int("dim", self.dim)
        _positive_int("workers", self.workers, 2)
        _positive_int("rounds", self.rounds)
        if not self.local_steps:
            raise ValueError("local_steps must hold at least one H")
        for h in self.local_steps:
            _positive_int("local_steps[i]", h)
        _positive_float("lr", self.lr)
        _positive_int("runs", self.runs, 10)
        _positive_float("sigma2", self.sigma2)

    def problem(self, seed: int = 0) -> NoisyQuadratic:
        gen = generator(seed)
        q = Quadratic.with_spectrum(torch.linspace(0.1, 1.0, self.dim, dtype=DTYPE), gen)
        return NoisyQuadratic.build(q, 50, self.sigma2, gen)

    def predict(self, problem: NoisyQuadratic, k: int) -> float:
        """``E f - f*`` after ``k`` gradients per worker (mini-batch SGD with batch N, ``k`` steps)."""
        return _minibatch_expectation(problem, self.lr, self.workers, k)[k]

    def _local_sgd(self, p: NoisyQuadratic, h: int, gen: torch.Generator) -> torch.Tensor:
        q = p.quadratic

        taken = 0

        def average(x: torch.Tensor) -> torch.Tensor:
            # Applied after every step: every h-th step all workers are replaced by their average.
            nonlocal taken
            taken += 1
            return x.mean(-2, keepdim=True).expand_as(x) if taken % h == 0 else x

        values, _ = run_optimizer(
            "sgd", torch.zeros(self.runs, self.workers, self.dim, dtype=DTYPE),
            lambda x, k: p.stochastic_gradient(x, gen), h * self.rounds, project=average,
            record=lambda x: q.value(x.mean(-2)), lr=self.lr,
        )
        return values[::h]  # at the synchronizations, where every worker holds xbar

    def check(self, seed: int = 0) -> CheckOutcome:
        p = self.problem(seed)
        gen = generator(seed + 1)
        horizon = max(self.local_steps) * self.rounds
        exact = _minibatch_expectation(p, self.lr, self.workers, horizon)
        holds, lines, curves = True, [], {}
        largest = max(self.local_steps)
        for h in self.local_steps:
            mean, err = mean_and_stderr(self._local_sgd(p, h, gen))
            predicted = torch.tensor(exact[: h * self.rounds + 1 : h], dtype=DTYPE)
            worst = float(((mean - predicted).abs() - 1e-14).clamp_min(0.0).div(err.clamp_min(1e-300)).max())
            ok = bool(((mean - predicted).abs() <= MC_Z * err + 1e-14).all())
            holds = holds and ok
            lines.append(f"H={h}: E f = {float(mean[-1]):.4g} vs {float(predicted[-1]):.4g} (worst {worst:.2g} s.e.)")
            curves[h] = mean.tolist()
        big = self.workers * largest
        values, _ = run_optimizer(
            "sgd", torch.zeros(self.runs, self.dim, dtype=DTYPE),
            lambda x, k: p.stochastic_gradient(x, gen, batch=big), self.rounds, record=p.quadratic.value,
            lr=self.lr,
        )
        mean, err = mean_and_stderr(values)
        exact_big = torch.tensor(_minibatch_expectation(p, self.lr, big, self.rounds), dtype=DTYPE)
        ok_big = bool(((mean - exact_big).abs() <= MC_Z * err + 1e-14).all())
        holds = holds and ok_big
        lines.append(
            f"mini-batch {big} x {self.rounds} steps: E f = {float(mean[-1]):.4g} vs {float(exact_big[-1]):.4g}"
        )
        steps = [largest * r for r in range(self.rounds + 1)]
        extra = {
            f"mini-batch {big}, {self.rounds} steps (measured)": tuple(mean.tolist()),
            f"mini-batch {big} (closed form)": tuple(exact_big.tolist()),
        }
        return CheckOutcome(
            predicted=exact[-1], measured=curves[largest][-1], holds=holds, name=self.name,
            quantity=f"E f(xbar) - f* of local SGD with H={largest} after {self.rounds} rounds",
            details=f"N={self.workers}, eta={self.lr:g}, R={self.rounds}, {self.runs} runs; " + "; ".join(lines),
            steps=steps, predicted_curve=[exact[t] for t in steps], measured_curve=curves[largest],
            extra_curves=extra, x_label="gradients per worker", y_label="E f(xbar) - f*",
        )


def easgd_spectral_radius(eta_h: float, alpha: float, workers: int) -> float:
    """Spectral radius of synchronous EASGD on ``f = h x^2 / 2``, from the eigenvalues in closed form.

    The deviations of the workers from their mean contract by ``1 - eta h - alpha``; the workers' mean
    and the center follow the 2x2 matrix ``[[1 - eta h - alpha, alpha], [beta, 1 - beta]]``,
    ``beta = N alpha``, whose eigenvalues are the roots of ``z^2 - tr z + det``.
    """
    beta = workers * alpha
    a, b, c, d = 1.0 - eta_h - alpha, alpha, beta, 1.0 - beta
    trace, det = a + d, a * d - b * c
    root = cmath.sqrt(trace * trace - 4.0 * det)
    pair = max(abs((trace + root) / 2.0), abs((trace - root) / 2.0))
    return max(pair, abs(a)) if workers > 1 else pair


@register_result
@dataclass(frozen=True)
class EASGDStability(Result):
    """The stability region of synchronous EASGD on a quadratic."""

    number = 18
    name = "easgd_stability"
    statement = (
        "synchronous EASGD on f = h x^2/2 with N workers, x_i <- x_i - eta h x_i - alpha (x_i - c), "
        "c <- c + alpha sum_i (x_i - c): converges iff |1 - eta h - alpha| < 1 and the Jury conditions "
        "beta eta h > 0, 4 - 2 alpha - 2 beta - 2 eta h + beta eta h > 0, |(1 - beta)(1 - eta h) - alpha| < 1 "
        "hold (beta = N alpha); the elastic force can destabilize steps where SGD converges"
    )
    reference = (
        "Zhang, Choromanska & LeCun 2015, arXiv:1412.6651 (stability analysis of synchronous EASGD, quadratic case)"
    )
    criterion = (
        "over a grid of (eta h, alpha), the growth rate of ||state|| fitted on the last half of the steps of "
        f"strategies.easgd.easgd_step within {EASGD_RATE_RTOL:g} (relative) of the closed-form spectral radius, "
        f"divergence exactly where the radius exceeds 1 (points within {STABILITY_MARGIN:g} of 1 not "
        "classified), and strategies.easgd.easgd_is_stable agreeing with the radius"
    )

    workers: int = 4
    alphas: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)
    eta_h_max: float = 2.2
    grid: int = 23
    steps: int = 120

    def __post_init__(self) -> None:
        _positive_int("workers", self.workers, 1)
        if not self.alphas:
            raise ValueError("alphas must hold at least one moving rate")
        for alpha in self.alphas:
            _positive_float("alphas[i]", alpha)
        _positive_float("eta_h_max", self.eta_h_max)
        _positive_int("grid", self.grid, 2)
        _positive_int("steps", self.steps, 10)

    def _eta_h(self) -> torch.Tensor:
        return torch.linspace(self.eta_h_max / self.grid, self.eta_h_max, self.grid, dtype=DTYPE)

    def problem(self, seed: int = 0) -> torch.Tensor:
        """Random starting states ``(workers + 1, grid)``: the workers then the center, per grid point."""
        return torch.randn(self.workers + 1, self.grid, generator=generator(seed), dtype=DTYPE)

    def predict(self, problem: torch.Tensor, k: int, alpha: float | None = None) -> float:
        """Spectral radius at grid point ``k`` for ``alpha`` (default: the first)."""
        alpha = self.alphas[0] if alpha is None else alpha
        return easgd_spectral_radius(float(self._eta_h()[k]), alpha, self.workers)

    def check(self, seed: int = 0) -> CheckOutcome:
        start = self.problem(seed)
        eta_h = self._eta_h()
        holds, lines, curves, first = True, [], {}, None
        for alpha in self.alphas:
            workers, center = list(start[: self.workers]), start[self.workers]
            history = []
            for _ in range(self.steps + 1):
                history.append(torch.linalg.vector_norm(torch.stack([*workers, center]), dim=0))
                workers, center = easgd_step(workers, center, alpha, grads=[eta_h * x for x in workers], lr=1.0)
            history = torch.stack(history)  # (steps + 1, grid)
            rates, radii, mismatches, unstable_sgd_ok = [], [], 0, 0
            for j, value in enumerate(eta_h.tolist()):
                radius = easgd_spectral_radius(value, alpha, self.workers)
                rate = tail_rate(history[:, j].tolist(), self.steps // 2)
                rates.append(rate)
                radii.append(radius)
                classified = abs(radius - 1.0) > STABILITY_MARGIN
                agree = (rate < 1.0) == (radius < 1.0) if classified else True
                close = abs(rate - radius) <= EASGD_RATE_RTOL * radius
                library = easgd_is_stable(value, alpha, self.workers) == (radius < 1.0) if classified else True
                if not (agree and close and library):
                    mismatches += 1
                if radius > 1.0 + STABILITY_MARGIN and value < 2.0:
                    unstable_sgd_ok += 1
            holds = holds and mismatches == 0
            lines.append(f"alpha={alpha:g}: {mismatches} mismatches, {unstable_sgd_ok} points unstable with eta h < 2")
            curves[f"alpha={alpha:g} measured"] = rates
            if first is None:
                first = (alpha, rates, radii)
        alpha, rates, radii = first
        extra = {k: tuple(v) for k, v in curves.items() if not k.startswith(f"alpha={alpha:g} ")}
        largest = max(r for r in rates if math.isfinite(r))
        return CheckOutcome(
            predicted=max(radii), measured=largest, holds=holds, name=self.name,
            quantity=f"largest growth rate over eta h in (0, {self.eta_h_max:g}] at alpha={alpha:g}",
            details=f"N={self.workers}, {self.grid} values of eta h, {self.steps} steps; " + "; ".join(lines),
            steps=eta_h.tolist(), predicted_curve=radii, measured_curve=rates, extra_curves=extra,
            x_label="eta h", y_label="per-step growth rate of ||(x_1..x_N, c)||", log_y=False,
        )
