"""Stochastic gradient descent: results 6-8 of the survey's list.

The problems are finite sums whose gradient noise is additive and known exactly (see
:class:`~lightning_optsurvey.theory.problems.NoisyQuadratic`): Bottou, Curtis & Nocedal's constants are
then ``M = sigma^2``, ``M_V = 0``, ``mu_G = mu_desc = 1``. Expectations are estimated over ``runs``
independent runs simulated as the rows of one parameter: torch's SGD is coordinate-wise, so each row is
exactly an independent run of the registry's ``sgd``. Bounds on expectations are checked with a
Monte-Carlo allowance of ``MC_Z`` standard errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lightning_optsurvey.theory._run import run_optimizer
from lightning_optsurvey.theory.decisions import MC_Z, loglog_slope, mc_bound_violations, mean_and_stderr
from lightning_optsurvey.theory.fields import integer, integers, positive, positives, real
from lightning_optsurvey.theory.problems import (
    DTYPE,
    LeastSquaresSum,
    NoisyQuadratic,
    PLFunction,
    Quadratic,
    WavyFunction,
    centred_shifts,
    generator,
)
from lightning_optsurvey.theory.result import CheckOutcome, Result, register_result

__all__ = [
    "MomentumNoiseFloor",
    "SGDConstantStep",
    "SGDDiminishingStep",
    "SGDNonConvex",
    "SGDPolyakLojasiewicz",
    "SVRGLinearRate",
    "momentum_stationary_gap",
]

#: Allowed distance of a fitted log-log exponent from the predicted one (transients, Monte-Carlo noise).
EXPONENT_ATOL = 0.15


@dataclass(frozen=True)
class _NoisyQuadraticCheck(Result):
    """Configuration shared by the strongly convex SGD checks: spectrum linear in [mu, 1], 100 components."""

    dim: int = integer(10, low=2)
    runs: int = integer(200, low=10)
    steps: int = integer(1000, low=16)
    mu: float = positive(0.1)
    sigma2: float = positive(1.0)

    def problem(self, seed: int = 0) -> NoisyQuadratic:
        gen = generator(seed)
        q = Quadratic.with_spectrum(torch.linspace(self.mu, 1.0, self.dim, dtype=DTYPE), gen)
        return NoisyQuadratic.build(q, 100, self.sigma2, gen)


@register_result
class SGDDiminishingStep(_NoisyQuadraticCheck):
    """SGD with steps ``beta/(gamma + k)`` on a strongly convex finite sum."""

    number = 6
    name = "sgd_diminishing_step"
    statement = (
        "f c-strongly convex, L-smooth, unbiased gradients with variance <= M; steps beta/(gamma+k), "
        "beta > 1/c, beta/(gamma+1) <= 1/L: E f(x_k) - f* <= nu/(gamma+k), "
        "nu = max(beta^2 L M / (2(beta c - 1)), (gamma+1)(f(x_1) - f*)), i.e. O(1/k)"
    )
    reference = "Bottou, Curtis & Nocedal 2018, arXiv:1606.04838, Thm. 4.7; Robbins & Monro 1951"
    criterion = (
        f"bound at every k with {MC_Z:g} standard errors of Monte-Carlo allowance, and the log-log slope of "
        f"E f(x_k) - f* on [K/8, K] within {EXPONENT_ATOL:g} of -1"
    )

    steps: int = integer(2000, low=16)
    beta_scale: float = positive(2.0)

    def _constants(self, p: NoisyQuadratic) -> tuple[float, float, float]:
        q = p.quadratic
        beta = self.beta_scale / q.mu
        gamma = beta * q.L - 1.0  # makes the first step exactly 1/L
        start = float(q.value(torch.zeros(q.dim, dtype=DTYPE)))
        nu = max(beta**2 * q.L * p.sigma2 / (2.0 * (beta * q.mu - 1.0)), (gamma + 1.0) * start)
        return beta, gamma, nu

    def predict(self, problem: NoisyQuadratic, k: int) -> float:
        beta, gamma, nu = self._constants(problem)
        return nu / (gamma + k) if beta * problem.quadratic.mu > 1 else math.inf

    def check(self, seed: int = 0) -> CheckOutcome:
        p = self.problem(seed)
        q = p.quadratic
        beta, gamma, nu = self._constants(p)
        gen = generator(seed + 1)

        def schedule(optimizer: torch.optim.Optimizer, k: int) -> None:
            optimizer.param_groups[0]["lr"] = beta / (gamma + k + 1)  # Bottou's k starts at 1

        values, _ = run_optimizer(
            "sgd", torch.zeros(self.runs, q.dim, dtype=DTYPE), lambda x, k: p.stochastic_gradient(x, gen),
            self.steps, before_step=schedule, record=q.value, lr=beta / (gamma + 1),
        )
        mean, stderr = mean_and_stderr(values)
        ks = list(range(1, self.steps + 2))  # xs[0] is Bottou's x_1
        bound = [nu / (gamma + k) for k in ks]
        violations = mc_bound_violations(mean.tolist(), stderr.tolist(), bound)
        tail = [i for i, k in enumerate(ks) if k >= self.steps // 8]
        slope = loglog_slope([ks[i] for i in tail], [float(mean[i]) for i in tail])
        holds = violations == 0 and abs(slope + 1.0) <= EXPONENT_ATOL and beta * q.mu > 1
        return CheckOutcome(
            predicted=-1.0, measured=slope, holds=holds, name=self.name,
            quantity="log-log slope of E f(x_k) - f*",
            details=f"c=mu={q.mu:g}, L={q.L:g}, M={p.sigma2:g}, beta={beta:g}, gamma={gamma:g}, nu={nu:.4g}, "
            f"{self.runs} runs; bound violations {violations}/{len(ks)}, at K: {float(mean[-1]):.3g} <= "
            f"{bound[-1]:.3g}",
            steps=ks, predicted_curve=bound, measured_curve=mean.tolist(), y_label="E f(x_k) - f*", log_x=True,
        )


@register_result
class SGDConstantStep(_NoisyQuadraticCheck):
    """SGD with a constant step converges linearly to a neighbourhood of size O(eta L M / c)."""

    number = 7
    name = "sgd_constant_step"
    statement = (
        "f c-strongly convex, L-smooth, gradient variance M, constant step eta <= 1/L: "
        "E f(x_k) - f* <= eta L M/(2c) + (1 - eta c)^(k-1) (f(x_1) - f* - eta L M/(2c))"
    )
    reference = "Bottou, Curtis & Nocedal 2018, arXiv:1606.04838, Thm. 4.6"
    criterion = (
        f"bound at every k for two step sizes ({MC_Z:g} standard errors allowance), and the plateau "
        "(mean over [K/2, K]) within the Monte-Carlo band of its exact value on the quadratic, "
        "(eta/2) sum_j Sigma_jj / (2 - eta lambda_j), which is linear in eta; runs start at x* (f(x_1) = f*), "
        "so the plateau is approached from below and the bound's transient term is active"
    )

    runs: int = integer(400, low=10)
    lrs: tuple[float, ...] = positives((0.5, 0.125))

    def predict(self, problem: NoisyQuadratic, k: int, lr: float | None = None) -> float:
        return self._bound(problem, [k], self.lrs[0] if lr is None else lr)[0]

    @staticmethod
    def _bound(problem: NoisyQuadratic, ks: list[int], lr: float) -> list[float]:
        q = problem.quadratic
        floor = lr * q.L * problem.sigma2 / (2.0 * q.mu)
        return [floor + (1.0 - lr * q.mu) ** (k - 1) * (0.0 - floor) for k in ks]  # f(x_1) - f* = 0

    @staticmethod
    def exact_plateau(problem: NoisyQuadratic, lr: float) -> float:
        """Stationary ``E f - f*`` of SGD on the quadratic: ``(lr/2) sum_j Sigma_jj / (2 - lr lambda_j)``."""
        q = problem.quadratic
        sigma_jj = torch.diagonal(q.basis.T @ problem.covariance @ q.basis)
        return float(0.5 * lr * (sigma_jj / (2.0 - lr * q.eigenvalues)).sum())

    def check(self, seed: int = 0) -> CheckOutcome:
        p = self.problem(seed)
        q = p.quadratic
        gen = generator(seed + 1)
        ks = list(range(1, self.steps + 2))
        lines, all_ok, measured_curve, predicted_curve = [], True, [], []
        plateau_measured = plateau_exact = math.nan
        for lr in self.lrs:
            values, _ = run_optimizer(
                "sgd", q.minimizer.expand(self.runs, q.dim), lambda x, k: p.stochastic_gradient(x, gen),
                self.steps, record=q.value, lr=lr,
            )
            mean, stderr = mean_and_stderr(values)
            bound = self._bound(p, ks, lr)
            violations = mc_bound_violations(mean.tolist(), stderr.tolist(), bound, atol=1e-15)
            plateau, plateau_err = map(float, mean_and_stderr(values[self.steps // 2 :].mean(0)))
            exact = self.exact_plateau(p, lr)
            plateau_ok = abs(plateau - exact) <= MC_Z * plateau_err and math.isfinite(plateau)
            all_ok = all_ok and violations == 0 and plateau_ok and lr <= 1.0 / q.L
            lines.append(
                f"eta={lr:g}: plateau {plateau:.4g} +- {plateau_err:.2g} vs exact {exact:.4g}, "
                f"bound's floor {lr * q.L * p.sigma2 / (2 * q.mu):.4g}, violations {violations}"
            )
            if not measured_curve:
                measured_curve, predicted_curve = mean.tolist(), bound
                plateau_measured, plateau_exact = plateau, exact
        return CheckOutcome(
            predicted=plateau_exact, measured=plateau_measured, holds=all_ok, name=self.name,
            quantity=f"plateau of E f(x_k) - f* at eta={self.lrs[0]:g}",
            details=f"c=mu={q.mu:g}, L={q.L:g}, M={p.sigma2:g}, {self.runs} runs; " + "; ".join(lines),
            steps=ks, predicted_curve=predicted_curve, measured_curve=measured_curve,
            y_label=f"E f(x_k) - f* (eta={self.lrs[0]:g})",
        )


@dataclass(frozen=True)
class _WavyNoise:
    function: WavyFunction
    shifts: torch.Tensor
    start: torch.Tensor

    @property
    def sigma2(self) -> float:
        return float((self.shifts * self.shifts).sum(1).mean())


@register_result
class SGDNonConvex(Result):
    """SGD with step ``c/sqrt(K)`` on a smooth non-convex function."""

    number = 8
    name = "sgd_nonconvex"
    statement = (
        "f L-smooth (non-convex), bounded below by f_inf, gradient variance M, K steps of size eta <= 1/L: "
        "E (1/K) sum_k ||grad f(x_k)||^2 <= eta L M + 2 (f(x_1) - f_inf)/(K eta); with eta = c/sqrt(K) "
        "this average, hence min_k E||grad f(x_k)||^2, is O(1/sqrt(K))"
    )
    reference = "Bottou, Curtis & Nocedal 2018, arXiv:1606.04838, Thm. 4.8; Ghadimi & Lan 2013, arXiv:1309.5549"
    criterion = (
        f"bound at each horizon K with {MC_Z:g} standard errors allowance, and the log-log slope of the "
        f"measured average over the horizons within {EXPONENT_ATOL:g} of -1/2"
    )

    dim: int = integer(5)
    runs: int = integer(200, low=10)
    horizons: tuple[int, ...] = integers((100, 400, 1600), min_length=2)
    c: float = positive(1.0)
    sigma2: float = positive(1.0)

    def problem(self, seed: int = 0) -> _WavyNoise:
        z = centred_shifts(100, self.dim, self.sigma2, generator(seed))
        start = 3.0 * torch.randn(self.dim, generator=generator(seed + 2), dtype=DTYPE)
        return _WavyNoise(WavyFunction(self.dim, 1.0, 2.0), z, start)

    def predict(self, problem: _WavyNoise, k: int) -> float:
        """The bound on the average ``E||grad f||^2`` over a horizon of ``k`` steps of size ``c/sqrt(k)``."""
        f = problem.function
        lr = self.c / math.sqrt(k)
        gap = float(f.value(problem.start)) - f.infimum
        return lr * f.L * problem.sigma2 + 2.0 * gap / (k * lr)

    def check(self, seed: int = 0) -> CheckOutcome:
        p = self.problem(seed)
        f = p.function
        gen = generator(seed + 1)
        x0 = p.start.expand(self.runs, self.dim)
        measured, bounds, lines, ok = [], [], [], True

        def noisy(x: torch.Tensor, k: int) -> torch.Tensor:
            idx = torch.randint(p.shifts.shape[0], x.shape[:-1], generator=gen)
            return f.gradient(x) + p.shifts[idx]

        for horizon in self.horizons:
            lr = self.c / math.sqrt(horizon)
            norms, _ = run_optimizer(
                "sgd", x0, noisy, horizon, record=lambda x: f.gradient(x).square().sum(-1), lr=lr
            )
            norms = norms[:-1]  # ||grad f(x_k)||^2, k = 1..K
            mean, err = map(float, mean_and_stderr(norms.mean(0)))
            bound = self.predict(p, horizon)
            ok = ok and mc_bound_violations([mean], [err], [bound]) == 0 and lr <= 1.0 / f.L
            measured.append(mean)
            bounds.append(bound)
            lines.append(f"K={horizon}: {mean:.4g} <= {bound:.4g} (min_k {float(norms.mean(1).min()):.3g})")
        slope = loglog_slope(list(self.horizons), measured)
        ok = ok and abs(slope + 0.5) <= EXPONENT_ATOL
        return CheckOutcome(
            predicted=-0.5, measured=slope, holds=ok, name=self.name,
            quantity="log-log slope of the average E||grad f||^2 against K",
            details=f"L={f.L:g}, M={p.sigma2:g}, f_inf={f.infimum:.4f}, eta={self.c:g}/sqrt(K), {self.runs} runs; "
            + "; ".join(lines),
            steps=list(self.horizons), predicted_curve=bounds, measured_curve=measured,
            x_label="K", y_label="(1/K) sum_k E||grad f(x_k)||^2", log_x=True,
        )


@register_result
class SVRGLinearRate(Result):
    """SVRG converges linearly on a strongly convex finite sum."""

    number = 13
    name = "svrg_linear_rate"
    statement = (
        "f = (1/n) sum f_i, each f_i convex and L-smooth, f mu-strongly convex, step eta < 1/(4L), m inner "
        "steps, snapshot = a uniformly drawn inner iterate (option II): E f(x~_s) - f* <= alpha^s (f(x~_0) - f*), "
        "alpha = 1/(mu eta (1 - 2 L eta) m) + 2 L eta/(1 - 2 L eta) < 1"
    )
    reference = "Johnson & Zhang 2013, papers.nips.cc/paper/4937, Thm. 1"
    criterion = (
        f"bound at every epoch s with {MC_Z:g} standard errors of Monte-Carlo allowance, alpha < 1 (the "
        "theorem's assumption), on regularized least squares with L = max_i ||a_i||^2 + lambda; the method is "
        "the registry's 'svrg' with its full gradient set by SVRG.snapshot()"
    )

    samples: int = integer(50, low=2)
    dim: int = integer(5)
    reg: float = positive(0.1)
    runs: int = integer(100, low=10)
    epochs: int = integer(4)
    lr_scale: float = positive(0.1)
    inner_scale: float = positive(1.0)

    def problem(self, seed: int = 0) -> LeastSquaresSum:
        return LeastSquaresSum.build(self.samples, self.dim, self.reg, generator(seed))

    def constants(self, problem: LeastSquaresSum) -> tuple[float, int, float]:
        """``(eta, m, alpha)``: ``eta = lr_scale / L``; ``m`` makes the first term of alpha ``1/inner_scale`` of 1/2."""
        lr = self.lr_scale / problem.L_max
        contraction = 1.0 - 2.0 * problem.L_max * lr
        inner = math.ceil(2.0 * self.inner_scale / (problem.mu * lr * contraction)) if contraction > 0 else 1
        alpha = (
            1.0 / (problem.mu * lr * contraction * inner) + 2.0 * problem.L_max * lr / contraction
            if contraction > 0
            else math.inf
        )
        return lr, inner, alpha

    def predict(self, problem: LeastSquaresSum, k: int) -> float:
        _, _, alpha = self.constants(problem)
        start = float(problem.value(torch.zeros(self.dim, dtype=DTYPE)) - problem.value(problem.minimizer))
        return alpha**k * start

    def check(self, seed: int = 0) -> CheckOutcome:
        from lightning_optsurvey.optim import create_optimizer

        p = self.problem(seed)
        lr, inner, alpha = self.constants(p)
        f_star = float(p.value(p.minimizer))
        gen = generator(seed + 1)
        param = torch.nn.Parameter(torch.zeros(self.runs, self.dim, dtype=DTYPE))
        optimizer = create_optimizer("svrg", [param], lr=lr)
        rows = torch.arange(self.runs)
        index = torch.zeros(self.runs, dtype=torch.long)

        def closure() -> torch.Tensor:
            # The closure is evaluated at x and at the snapshot with the same component index.
            param.grad = p.component_gradient(param.detach(), index)
            return torch.zeros((), dtype=DTYPE)

        snapshot = param.detach().clone()
        gaps = [(p.value(snapshot) - f_star)]
        for _ in range(self.epochs):
            with torch.no_grad():
                param.copy_(snapshot)
            param.grad = p.gradient(param.detach())
            optimizer.snapshot()
            iterates = []
            for _ in range(inner):
                iterates.append(param.detach().clone())
                index.copy_(torch.randint(self.samples, (self.runs,), generator=gen))
                optimizer.step(closure)
            pick = torch.randint(inner, (self.runs,), generator=gen)
            snapshot = torch.stack(iterates)[pick, rows]
            gaps.append(p.value(snapshot) - f_star)
        values = torch.stack(gaps)
        mean, stderr = mean_and_stderr(values)
        ks = list(range(self.epochs + 1))
        bound = [self.predict(p, k) for k in ks]
        violations = mc_bound_violations(mean.tolist(), stderr.tolist(), bound)
        rate = (float(mean[-1]) / float(mean[0])) ** (1.0 / self.epochs)
        return CheckOutcome(
            predicted=alpha, measured=rate, holds=violations == 0 and alpha < 1, name=self.name,
            quantity="per-epoch contraction of E f(x~_s) - f*",
            details=f"n={self.samples}, mu={p.mu:.4g}, L={p.L_max:.4g}, eta={lr:.4g}, m={inner}, "
            f"alpha={alpha:.4g}, {self.runs} runs; bound violations {violations}/{len(ks)}",
            steps=ks, predicted_curve=bound, measured_curve=mean.tolist(), x_label="epoch s",
            y_label="E f(x~_s) - f*",
        )


@register_result
class SGDPolyakLojasiewicz(Result):
    """SGD with a constant step converges linearly to a noise floor under the PL inequality alone."""

    number = 25
    name = "sgd_pl_constant_step"
    statement = (
        "f L-smooth, non-convex, PL with constant mu (||grad f||^2 >= 2 mu (f - f*)), unbiased gradients of "
        "variance M, constant step eta <= 1/L: E f(x_k) - f* <= eta L M/(2 mu) + (1 - eta mu)^(k-1) "
        "(f(x_1) - f* - eta L M/(2 mu)) (Bottou et al.'s Thm. 4.6, whose proof uses strong convexity only "
        "through the PL inequality)"
    )
    reference = (
        "Karimi, Nutini & Schmidt 2016, arXiv:1608.04636, Sec. 4 (SGD under PL); "
        "Bottou, Curtis & Nocedal 2018, arXiv:1606.04838, Thm. 4.6 and its proof"
    )
    criterion = (
        f"bound at every k with {MC_Z:g} standard errors of Monte-Carlo allowance and eta <= 1/L, on "
        "f = sum_j x_j^2 + 3 sin^2(x_j) (non-convex, L = 8, mu = 0.1755) with additive noise z_i (100 centred "
        "shifts, variance M exactly), runs started where the PL inequality is tightest"
    )

    dim: int = integer(5)
    runs: int = integer(200, low=10)
    steps: int = integer(300, low=10)
    sigma2: float = positive(0.1)
    lr_scale: float = positive(1.0)

    def problem(self, seed: int = 0) -> tuple[PLFunction, torch.Tensor, torch.Tensor]:
        f = PLFunction(self.dim, 3.0)
        gen = generator(seed)
        signs = torch.where(torch.rand(self.dim, generator=gen) < 0.5, -1.0, 1.0).to(DTYPE)
        return f, signs * f.slowest_point, centred_shifts(100, self.dim, self.sigma2, gen)

    def predict(self, problem: tuple[PLFunction, torch.Tensor, torch.Tensor], k: int) -> float:
        """The bound at ``k`` (1-based, Bottou's ``x_1`` is the start)."""
        f, start, shifts = problem
        lr = self.lr_scale / f.L
        floor = lr * f.L * float((shifts * shifts).sum(1).mean()) / (2.0 * f.mu)
        return floor + (1.0 - lr * f.mu) ** (k - 1) * (float(f.value(start)) - floor)

    def check(self, seed: int = 0) -> CheckOutcome:
        problem = self.problem(seed)
        f, start, shifts = problem
        gen = generator(seed + 1)
        lr = self.lr_scale / f.L

        def noisy(x: torch.Tensor, k: int) -> torch.Tensor:
            return f.gradient(x) + shifts[torch.randint(shifts.shape[0], x.shape[:-1], generator=gen)]

        values, _ = run_optimizer(
            "sgd", start.expand(self.runs, self.dim), noisy, self.steps, record=f.value, lr=lr,
        )
        mean, stderr = mean_and_stderr(values)
        ks = list(range(1, self.steps + 2))
        bound = [self.predict(problem, k) for k in ks]
        violations = mc_bound_violations(mean.tolist(), stderr.tolist(), bound)
        plateau = float(mean[self.steps // 2 :].mean())
        holds = violations == 0 and lr <= 1.0 / f.L and bool(torch.isfinite(mean).all())
        return CheckOutcome(
            predicted=bound[-1], measured=float(mean[-1]), holds=holds, name=self.name,
            quantity=f"E f(x_K) - f* at K={self.steps + 1}",
            details=f"mu={f.mu:.4f}, L={f.L:g}, M={self.sigma2:g}, eta={self.lr_scale:g}/L, {self.runs} runs; "
            f"floor eta L M/(2 mu) = {bound[-1]:.4g}, measured plateau {plateau:.4g}, start {bound[0]:.4g}; "
            f"bound violations {violations}/{len(ks)}",
            steps=ks, predicted_curve=bound, measured_curve=mean.tolist(), y_label="E f(x_k) - f*",
        )


def _momentum_map(name: str, lr: float, beta: float, curvature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T, b)`` of torch's momentum update on one eigenmode: ``(e, v) <- T (e, v) + b xi``.

    Heavy ball (``"momentum"``): ``v' = beta v + g``, ``e' = e - lr v'``; Nesterov (``"nesterov"``):
    ``v' = beta v + g``, ``e' = e - lr (g + beta v')``; ``g = curvature e + xi``.
    """
    if name == "momentum":
        t = [[1.0 - lr * curvature, -lr * beta], [curvature, beta]]
        b = [-lr, 1.0]
    else:
        t = [[1.0 - lr * (1.0 + beta) * curvature, -lr * beta * beta], [curvature, beta]]
        b = [-lr * (1.0 + beta), 1.0]
    return torch.tensor(t, dtype=DTYPE), torch.tensor(b, dtype=DTYPE)


def momentum_stationary_gap(problem: NoisyQuadratic, name: str, lr: float, beta: float) -> float:
    """Exact stationary ``E f - f*`` of torch's heavy ball (``"momentum"``) or ``"nesterov"`` on a noisy quadratic.

    Each eigenmode ``j`` of ``A`` is a linear system driven by the noise's component along it (variance
    ``Sigma_jj`` in the eigenbasis); its stationary covariance solves the Lyapunov equation
    ``C = T C T^T + Sigma_jj b b^T``, here as a 4x4 linear system, and ``E f - f* = sum_j lambda_j C_j[0, 0]/2``.
    ``inf`` when a mode is unstable (spectral radius of ``T`` at least 1).
    """
    q = problem.quadratic
    sigma_jj = torch.diagonal(q.basis.T @ problem.covariance @ q.basis)
    total = 0.0
    for curvature, variance in zip(q.eigenvalues.tolist(), sigma_jj.tolist(), strict=True):
        t, b = _momentum_map(name, lr, beta, curvature)
        if float(torch.linalg.eigvals(t).abs().max()) >= 1.0:
            return math.inf
        system = torch.eye(4, dtype=DTYPE) - torch.kron(t, t)
        c = torch.linalg.solve(system, variance * torch.outer(b, b).reshape(-1)).reshape(2, 2)
        total += 0.5 * curvature * float(c[0, 0])
    return total


@register_result
class MomentumNoiseFloor(_NoisyQuadraticCheck):
    """Stochastic heavy ball and Nesterov converge linearly to a noise floor ~ eta/(1 - beta) x SGD's."""

    number = 26
    name = "momentum_noise_floor"
    statement = (
        "quadratic f with spectrum in [mu, L], unbiased gradient noise of covariance Sigma, constant step eta and "
        "momentum beta inside the stability region: heavy ball and Nesterov reach a stationary E f - f* that is "
        "the Lyapunov solution of their linear dynamics, for heavy ball exactly "
        "sum_j (1 + beta) eta Sigma_jj / (2 (1 - beta) (2 (1 + beta) - eta lambda_j)), i.e. SGD's floor with "
        "the effective step eta/(1 - beta); the error contracts at the spectral radius of the dynamics"
    )
    reference = (
        "Yang, Lin & Li 2016, arXiv:1604.03257 (unified stochastic momentum: O(eta/(1-beta)) floor); "
        "Kidambi, Netrapalli, Jain & Kakade 2018, arXiv:1803.05591 (stochastic heavy ball on quadratics)"
    )
    criterion = (
        f"for heavy ball and Nesterov, the plateau (mean of E f over [K/2, K], runs started at x*) within "
        f"{MC_Z:g} standard errors of the exact stationary value; the heavy-ball value also equal to the closed "
        "form (relative 1e-9); the registry's 'momentum' and 'nesterov'"
    )

    runs: int = integer(400, low=10)
    steps: int = integer(600, low=16)
    lr: float = positive(0.05)
    beta: float = real(0.9, low=0.0, high=1.0, high_open=True)

    def predict(self, problem: NoisyQuadratic, k: int) -> float:
        """The exact stationary heavy-ball ``E f - f*`` (the same for every ``k``)."""
        return momentum_stationary_gap(problem, "momentum", self.lr, self.beta)

    def closed_form(self, problem: NoisyQuadratic) -> float:
        """The heavy ball's stationary ``E f - f*`` from the AR(2) variance formula."""
        q = problem.quadratic
        sigma_jj = torch.diagonal(q.basis.T @ problem.covariance @ q.basis)
        eta, beta = self.lr, self.beta
        return float(((1 + beta) * eta * sigma_jj / (2 * (1 - beta) * (2 * (1 + beta) - eta * q.eigenvalues))).sum())

    def check(self, seed: int = 0) -> CheckOutcome:
        p = self.problem(seed)
        q = p.quadratic
        gen = generator(seed + 1)
        ks = list(range(self.steps + 1))
        holds, lines, curves = True, [], {}
        for name in ("momentum", "nesterov"):
            values, _ = run_optimizer(
                name, q.minimizer.expand(self.runs, q.dim), lambda x, k: p.stochastic_gradient(x, gen),
                self.steps, record=q.value, lr=self.lr, momentum=self.beta,
            )
            mean, _ = mean_and_stderr(values)
            plateau, err = map(float, mean_and_stderr(values[self.steps // 2 :].mean(0)))
            exact = momentum_stationary_gap(p, name, self.lr, self.beta)
            ok = math.isfinite(plateau) and abs(plateau - exact) <= MC_Z * err
            holds = holds and ok
            lines.append(f"{name}: plateau {plateau:.4g} +- {err:.2g} vs exact {exact:.4g}")
            curves[name] = (mean.tolist(), plateau, exact)
        closed = self.closed_form(p)
        heavy_exact = curves["momentum"][2]
        holds = holds and abs(closed - heavy_exact) <= 1e-9 * abs(heavy_exact)
        sgd_floor = SGDConstantStep.exact_plateau(p, self.lr)
        mean, plateau, exact = curves["momentum"]
        return CheckOutcome(
            predicted=exact, measured=plateau, holds=holds, name=self.name,
            quantity=f"stationary E f - f* of heavy ball (eta={self.lr:g}, beta={self.beta:g})",
            details=f"mu={q.mu:g}, L={q.L:g}, sigma^2={p.sigma2:g}, {self.runs} runs; " + "; ".join(lines)
            + f"; closed form {closed:.4g}; SGD's floor at eta {sgd_floor:.4g} (x {exact / sgd_floor:.3g})",
            steps=ks, predicted_curve=[exact] * len(ks), measured_curve=mean,
            extra_curves={"nesterov (measured)": tuple(curves["nesterov"][0]),
                          "nesterov (exact plateau)": tuple([curves["nesterov"][2]] * len(ks))},
            y_label="E f(x_k) - f*", log_y=False,
        )
