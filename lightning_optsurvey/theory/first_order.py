r"""Deterministic first-order methods on quadratics: results 1-5 of the survey's list.

Every check runs torch's SGD from the registry (``sgd``, ``momentum``, ``nesterov``) with the exact
gradient of a quadratic :math:`f(x) = \tfrac12 (x - x^*)^\top A (x - x^*)` whose spectrum is chosen,
started at ``x_0 = 0``. Each method is run with the step size the theorem prescribes times
``lr_scale`` (1 by default); a scale outside the theorem's range makes the check fail, which the tests
use to show that the checks can fail.

Torch's ``nesterov=True`` is Sutskever et al.'s form: the parameter holds the point where the gradient
is evaluated, :math:`x_{k+1} = x_k - \eta g_k + \beta d_k`, :math:`d_k = \beta d_{k-1} - \eta g_k`.
With :math:`y_{k+1} = x_k - \eta g_k` this is exactly Nesterov's scheme
:math:`x_{k+1} = y_{k+1} + \beta (y_{k+1} - y_k)`, so the checks measure :math:`f(y_k)`, the
sequence Nesterov's bounds are about, computed from the parameter and the gradient torch applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import torch

from lightning_optsurvey.theory._run import run_optimizer
from lightning_optsurvey.theory.decisions import bound_violations, tail_rate
from lightning_optsurvey.theory.fields import integer, positive, real
from lightning_optsurvey.theory.problems import DTYPE, PLFunction, Quadratic, generator
from lightning_optsurvey.theory.result import CheckOutcome, Result, register_result

__all__ = [
    "GDConvex",
    "GDPolyakLojasiewicz",
    "GDStronglyConvex",
    "HeavyBall",
    "NesterovConvex",
    "NesterovStronglyConvex",
]

#: Relative slack on a bound checked at every step: float64 round-off only.
BOUND_RTOL = 1e-9
#: Two-sided relative band on GD's tail rate: the slowest mode dominates to ~1e-12 on the window.
GD_RATE_RTOL = 1e-3
#: Two-sided relative band on accelerated tail rates. At the optimal parameters the slowest mode is a
#: Jordan block (error ~ k r^k), which biases a rate fitted on [K/2, K] by (2)^(2/K) - 1 < 0.5 %.
ACCEL_RATE_RTOL = 1e-2


def _log_spectrum(dim: int, smallest: float, largest: float) -> torch.Tensor:
    return torch.logspace(math.log10(smallest), math.log10(largest), dim, dtype=DTYPE)


def _lin_spectrum(dim: int, smallest: float, largest: float) -> torch.Tensor:
    return torch.linspace(smallest, largest, dim, dtype=DTYPE)


def _bound_outcome(result: Result, q: Quadratic, gaps: list[float], point: str, note: str) -> CheckOutcome:
    """A convex bound ``result.predict(q, k)`` checked against ``gaps[k - 1] = f(point_k) - f*`` at every k."""
    ks = list(range(1, len(gaps) + 1))
    bound = [result.predict(q, k) for k in ks]
    violations = bound_violations(gaps, bound, BOUND_RTOL)
    worst = max(g / b for g, b in zip(gaps, bound, strict=True))
    return CheckOutcome(
        predicted=bound[-1], measured=gaps[-1], holds=violations == 0, name=result.name,
        quantity=f"f({point}_K) - f* at K={len(gaps)}",
        details=f"L={q.L:g}, lr={result.lr_scale:g}/L, {note}; max_k gap/bound = {worst:.3g}, "
        f"violations {violations}/{len(gaps)}",
        steps=ks, predicted_curve=bound, measured_curve=gaps, y_label=f"f({point}_k) - f*", log_x=True,
    )


@dataclass(frozen=True)
class _ConvexQuadraticCheck(Result):
    """Configuration shared by the convex (1/k, 1/k^2) checks: a log-spaced spectrum down to ~0."""

    dim: int = integer(40, low=2)
    steps: int = integer(300)
    smallest_eigenvalue: float = positive(1e-5)
    lr_scale: float = positive(1.0)

    def problem(self, seed: int = 0) -> Quadratic:
        # Eigenvalues spread log-uniformly down to ~0: every k meets modes with lambda ~ L/k, the
        # worst case of the 1/k bound, while the function stays (barely) strongly convex.
        return Quadratic.with_spectrum(_log_spectrum(self.dim, self.smallest_eigenvalue, 1.0), generator(seed))


@dataclass(frozen=True)
class _AcceleratedQuadraticCheck(Result):
    """Configuration shared by the accelerated-rate checks: a linear spectrum in [1/kappa, 1]."""

    dim: int = integer(30, low=2)
    steps: int = integer(400, low=10)
    kappa: float = real(1000.0, low=1.0, low_open=True)
    lr_scale: float = positive(1.0)

    def problem(self, seed: int = 0) -> Quadratic:
        return Quadratic.with_spectrum(_lin_spectrum(self.dim, 1.0 / self.kappa, 1.0), generator(seed))


@register_result
class GDConvex(_ConvexQuadraticCheck):
    """GD with step ``1/L`` on an L-smooth convex function."""

    number = 1
    name = "gd_convex"
    statement = (
        "f convex and L-smooth, GD with step s <= 1/L: f(x_k) - f* <= ||x_0 - x*||^2 / (2sk) for every k >= 1 "
        "(L ||x_0 - x*||^2 / (2k) at s = 1/L)"
    )
    reference = "Beck 2017, First-Order Methods in Optimization, Thm. 10.21; Nesterov 2004, Sec. 2.1.5 (2LR^2/(k+4))"
    criterion = f"bound with s = lr_scale/L checked at every k = 1..K (relative slack {BOUND_RTOL:g}, round-off)"

    def predict(self, problem: Quadratic, k: int) -> float:
        step = self.lr_scale / problem.L
        return float(problem.minimizer.square().sum()) / (2 * step * k)

    def check(self, seed: int = 0) -> CheckOutcome:
        q = self.problem(seed)
        xs, _ = run_optimizer(
            "sgd", torch.zeros(q.dim, dtype=DTYPE), lambda x, k: q.gradient(x), self.steps,
            lr=self.lr_scale / q.L,
        )
        return _bound_outcome(
            self, q, q.value(xs).tolist()[1:], "x",
            f"||x0-x*||^2={float(q.minimizer.square().sum()):.4g}",
        )


@register_result
class GDStronglyConvex(Result):
    """GD with step ``1/L`` on a mu-strongly convex, L-smooth function."""

    number = 2
    name = "gd_strongly_convex"
    statement = (
        "f mu-strongly convex and L-smooth, GD with step 1/L: f(x_k) - f* <= (1 - mu/L)^k (f(x_0) - f*); "
        "on a quadratic ||x_k - x*|| contracts at exactly 1 - mu/L"
    )
    reference = (
        "Bottou, Curtis & Nocedal 2018, arXiv:1606.04838, Thm. 4.6 with M = 0; "
        "Karimi, Nutini & Schmidt 2016, arXiv:1608.04636, Thm. 1"
    )
    criterion = (
        f"bound at every k (slack {BOUND_RTOL:g}) and tail rate of ||x_k - x*|| fitted on [K/2, K] "
        f"within {GD_RATE_RTOL:g} (relative) of 1 - mu/L"
    )

    dim: int = integer(20, low=2)
    steps: int = integer(1000, low=10)
    mu: float = real(0.01, low=0.0, high=1.0, low_open=True, high_open=True)  # below L = 1
    lr_scale: float = positive(1.0)

    def problem(self, seed: int = 0) -> Quadratic:
        return Quadratic.with_spectrum(_lin_spectrum(self.dim, self.mu, 1.0), generator(seed))

    def predict(self, problem: Quadratic, k: int) -> float:
        return (1.0 - problem.mu / problem.L) ** k * float(problem.value(torch.zeros(problem.dim, dtype=DTYPE)))

    def check(self, seed: int = 0) -> CheckOutcome:
        q = self.problem(seed)
        xs, _ = run_optimizer(
            "sgd", torch.zeros(q.dim, dtype=DTYPE), lambda x, k: q.gradient(x), self.steps,
            lr=self.lr_scale / q.L,
        )
        gaps = q.value(xs).tolist()
        ks = list(range(self.steps + 1))
        bound = [self.predict(q, k) for k in ks]
        violations = bound_violations(gaps, bound, BOUND_RTOL)
        rate = tail_rate(q.distance(xs).tolist(), self.steps // 2)
        predicted_rate = 1.0 - q.mu / q.L
        rate_ok = abs(rate - predicted_rate) <= GD_RATE_RTOL * predicted_rate
        return CheckOutcome(
            predicted=predicted_rate, measured=rate, holds=violations == 0 and rate_ok, name=self.name,
            quantity="per-step contraction of ||x_k - x*||",
            details=f"mu={q.mu:g}, L={q.L:g}, lr={self.lr_scale:g}/L; bound violations {violations}/{len(ks)}, "
            f"tail rate {rate:.6f} vs 1 - mu/L = {predicted_rate:.6f}",
            steps=ks, predicted_curve=bound, measured_curve=gaps, y_label="f(x_k) - f*",
        )


def _accelerated_outcome(
    result: Result, q: Quadratic, ks: list[int], gaps: list[float], bound: list[float] | None,
    distances: list[float], predicted_rate: float, details: str,
) -> CheckOutcome:
    rate = tail_rate(distances, len(distances) // 2)
    rate_ok = abs(rate - predicted_rate) <= ACCEL_RATE_RTOL * predicted_rate
    violations = 0 if bound is None else bound_violations(gaps, bound, BOUND_RTOL)
    curve = bound if bound is not None else [distances[0] * predicted_rate**k for k in ks]
    measured_curve = gaps if bound is not None else distances
    return CheckOutcome(
        predicted=predicted_rate, measured=rate, holds=rate_ok and violations == 0, name=result.name,
        quantity="per-step contraction of ||x_k - x*|| (tail fit)",
        details=f"{details}; tail rate {rate:.5f} vs predicted {predicted_rate:.5f}"
        + ("" if bound is None else f", bound violations {violations}/{len(ks)}"),
        steps=ks, predicted_curve=curve, measured_curve=measured_curve,
        y_label="f(y_k) - f*" if bound is not None else "||x_k - x*||",
    )


@register_result
class HeavyBall(_AcceleratedQuadraticCheck):
    """Polyak's heavy ball with the optimal constants on a quadratic."""

    number = 3
    name = "heavy_ball"
    statement = (
        "quadratic with spectrum in [mu, L], heavy ball with lr = 4/(sqrt(L)+sqrt(mu))^2, "
        "beta = ((sqrt(kappa)-1)/(sqrt(kappa)+1))^2: ||x_k - x*|| -> 0 at rate 1 - 2/(sqrt(kappa)+1)"
    )
    reference = (
        "Polyak 1964, doi:10.1016/0041-5553(64)90137-5; "
        "Lessard, Recht & Packard 2016, arXiv:1408.3595 (quadratics)"
    )
    criterion = (
        f"rate of ||x_k - x*|| fitted on [K/2, K] within {ACCEL_RATE_RTOL:g} (relative) of "
        "(sqrt(kappa)-1)/(sqrt(kappa)+1); torch's SGD momentum (v <- beta v + g, x <- x - lr v) is exactly "
        "the heavy ball"
    )

    def predict(self, problem: Quadratic, k: int) -> float:
        s = math.sqrt(problem.L / problem.mu)
        return float(problem.distance(torch.zeros(problem.dim, dtype=DTYPE))) * ((s - 1) / (s + 1)) ** k

    def check(self, seed: int = 0) -> CheckOutcome:
        q = self.problem(seed)
        s = math.sqrt(q.L / q.mu)
        lr = 4.0 / (math.sqrt(q.L) + math.sqrt(q.mu)) ** 2
        beta = ((s - 1) / (s + 1)) ** 2
        xs, _ = run_optimizer(
            "momentum", torch.zeros(q.dim, dtype=DTYPE), lambda x, k: q.gradient(x), self.steps,
            lr=self.lr_scale * lr, momentum=beta,
        )
        distances = q.distance(xs).tolist()
        ks = list(range(self.steps + 1))
        return _accelerated_outcome(
            self, q, ks, distances, None, distances, (s - 1) / (s + 1),
            f"kappa={s * s:g}, lr={self.lr_scale:g} x {lr:.5g}, beta={beta:.5g}",
        )


def _nesterov_run(q: Quadratic, steps: int, lr: float, momentum_at, rescale: bool) -> tuple[list, list]:
    """Run torch's ``nesterov`` and return ``f(y_k) - f*`` for k = 0..steps and ``||x_k - x*||``.

    ``momentum_at(k)`` is the extrapolation weight used at step ``k``. With ``rescale`` the momentum
    buffer is multiplied by ``beta_k / beta_{k+1}`` before step ``k`` so that the Sutskever recursion with
    a time-varying weight equals Nesterov's scheme (see :class:`NesterovConvex`).
    """

    def before(optimizer: torch.optim.Optimizer, k: int) -> None:
        group = optimizer.param_groups[0]
        new = momentum_at(k + 1)
        if rescale:
            state = optimizer.state[group["params"][0]]
            buffer = state.get("momentum_buffer")
            if buffer is not None:
                buffer.mul_(momentum_at(k) / new)
        group["momentum"] = new

    xs, gs = run_optimizer(
        "nesterov", torch.zeros(q.dim, dtype=DTYPE), lambda x, k: q.gradient(x), steps,
        before_step=before, lr=lr, momentum=momentum_at(1) if momentum_at(1) > 0 else 0.5,
    )
    ys = torch.cat([xs[:1], xs[:-1] - lr * gs])  # y_0 = x_0, y_{k+1} = x_k - lr g_k
    return q.value(ys).tolist(), q.distance(xs).tolist()


@register_result
class NesterovStronglyConvex(_AcceleratedQuadraticCheck):
    """Nesterov's method with constant momentum on a strongly convex quadratic."""

    number = 4
    name = "nesterov_strongly_convex"
    statement = (
        "f mu-strongly convex, L-smooth; Nesterov with lr 1/L, beta = (sqrt(L)-sqrt(mu))/(sqrt(L)+sqrt(mu)): "
        "f(y_k) - f* <= (1 - sqrt(mu/L))^k (f(x_0) - f* + mu/2 ||x_0 - x*||^2)"
    )
    reference = (
        "Nesterov 2004, Introductory Lectures on Convex Optimization, Sec. 2.2.1 (constant step scheme, mu > 0); "
        "Sutskever et al. 2013 (torch's form)"
    )
    criterion = (
        f"bound on f(y_k), y_(k+1) = x_k - g_k / L, at every k (slack {BOUND_RTOL:g}) and rate of ||x_k - x*|| "
        f"fitted on [K/2, K] within {ACCEL_RATE_RTOL:g} (relative) of 1 - sqrt(mu/L) (tight on quadratics)"
    )

    steps: int = integer(600, low=10)

    def predict(self, problem: Quadratic, k: int) -> float:
        x0 = torch.zeros(problem.dim, dtype=DTYPE)
        start = float(problem.value(x0)) + 0.5 * problem.mu * float(problem.distance(x0)) ** 2
        return (1.0 - math.sqrt(problem.mu / problem.L)) ** k * start

    def check(self, seed: int = 0) -> CheckOutcome:
        q = self.problem(seed)
        beta = (math.sqrt(q.L) - math.sqrt(q.mu)) / (math.sqrt(q.L) + math.sqrt(q.mu))
        gaps, distances = _nesterov_run(q, self.steps, self.lr_scale / q.L, lambda k: beta, rescale=False)
        ks = list(range(self.steps + 1))
        bound = [self.predict(q, k) for k in ks]
        return _accelerated_outcome(
            self, q, ks, gaps, bound, distances, 1.0 - math.sqrt(q.mu / q.L),
            f"kappa={q.L / q.mu:g}, lr={self.lr_scale:g}/L, beta={beta:.5g}",
        )


@register_result
class NesterovConvex(_ConvexQuadraticCheck):
    """Nesterov's method with the momentum schedule ``(k-1)/(k+2)`` on a convex quadratic."""

    number = 5
    name = "nesterov_convex"
    statement = (
        "f convex, L-smooth; Nesterov with lr s <= 1/L and momentum (k-1)/(k+2): "
        "f(y_k) - f* <= 2 ||x_0 - x*||^2 / (s (k+1)^2), i.e. O(1/k^2)"
    )
    reference = "Nesterov 1983; Su, Boyd & Candes 2016, arXiv:1503.01243 (the (k-1)/(k+2) scheme and its constant)"
    criterion = (
        f"bound on f(y_k) with s = lr_scale/L checked at every k = 1..K (slack {BOUND_RTOL:g}); torch's "
        "nesterov buffer is rescaled by beta_k/beta_(k+1) before step k so that the time-varying Sutskever form "
        "equals the scheme"
    )

    def predict(self, problem: Quadratic, k: int) -> float:
        step = self.lr_scale / problem.L
        return 2.0 * float(problem.minimizer.square().sum()) / (step * (k + 1) ** 2)

    def check(self, seed: int = 0) -> CheckOutcome:
        q = self.problem(seed)
        # The extrapolation weight after step k (1-based) is (k-1)/(k+2): beta_1 = 0, beta_2 = 1/4, ...
        gaps, _ = _nesterov_run(
            q, self.steps, self.lr_scale / q.L, lambda k: max(k - 1, 0) / (k + 2), rescale=True
        )
        gd_bound = GDConvex(lr_scale=self.lr_scale).predict(q, self.steps)
        return _bound_outcome(self, q, gaps[1:], "y", f"GD's 1/k bound at K would be {gd_bound:.3g}")


@register_result
class GDPolyakLojasiewicz(Result):
    """GD converges linearly on a non-convex function that satisfies the Polyak-Lojasiewicz inequality."""

    number = 24
    name = "gd_pl_linear_rate"
    statement = (
        "f L-smooth, possibly non-convex, with the PL inequality ||grad f(x)||^2 >= 2 mu (f(x) - f*): GD with step "
        "1/L has f(x_(k+1)) - f* <= (1 - mu/L) (f(x_k) - f*), hence f(x_k) - f* <= (1 - mu/L)^k (f(x_0) - f*)"
    )
    reference = "Karimi, Nutini & Schmidt 2016, arXiv:1608.04636, Thm. 1 (Polyak 1963)"
    criterion = (
        f"every one-step ratio (f(x_(k+1)) - f*)/(f(x_k) - f*) at most 1 - mu/L (slack {BOUND_RTOL:g}) while "
        "f(x_k) > 1e-12, and the bound at every k; on f = sum_j x_j^2 + 3 sin^2(x_j) (non-convex: f'' >= -4, "
        "L = 8, mu = inf f'^2/(2f) = 0.1755 computed in one dimension), started near the point where the PL "
        "inequality is tightest"
    )

    dim: int = integer(10)
    steps: int = integer(60, low=2)
    lr_scale: float = positive(1.0)

    def problem(self, seed: int = 0) -> tuple[PLFunction, torch.Tensor]:
        f = PLFunction(self.dim, 3.0)
        gen = generator(seed)
        signs = torch.where(torch.rand(self.dim, generator=gen) < 0.5, -1.0, 1.0).to(DTYPE)
        start = signs * (f.slowest_point + 0.3 * torch.rand(self.dim, generator=gen, dtype=DTYPE))
        return f, start

    def predict(self, problem: tuple[PLFunction, torch.Tensor], k: int) -> float:
        f, start = problem
        return (1.0 - f.mu / f.L) ** k * float(f.value(start))

    def check(self, seed: int = 0) -> CheckOutcome:
        f, start = self.problem(seed)
        xs, _ = run_optimizer("sgd", start, lambda x, k: f.gradient(x), self.steps, lr=self.lr_scale / f.L)
        gaps = f.value(xs).tolist()
        ks = list(range(self.steps + 1))
        bound = [self.predict((f, start), k) for k in ks]
        rate = 1.0 - f.mu / f.L
        ratios = [b / a for a, b in pairwise(gaps) if a > 1e-12]
        worst = max(ratios) if ratios else math.nan
        violations = bound_violations(gaps, bound, BOUND_RTOL)
        holds = violations == 0 and worst <= rate * (1.0 + BOUND_RTOL)
        return CheckOutcome(
            predicted=rate, measured=worst, holds=holds, name=self.name,
            quantity="largest one-step ratio of f(x_k) - f*",
            details=f"mu={f.mu:.4f}, L={f.L:g}, lr={self.lr_scale:g}/L, d={self.dim}; largest ratio {worst:.4f} "
            f"<= 1 - mu/L = {rate:.4f} over {len(ratios)} steps; bound violations {violations}/{len(ks)}; "
            f"f(x_K) = {gaps[-1]:.2e}",
            steps=ks, predicted_curve=bound, measured_curve=gaps, y_label="f(x_k) - f*",
        )
