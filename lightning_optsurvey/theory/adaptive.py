"""Adaptive methods: AdaGrad's regret (9), Adam's non-convergence (10) and Adam's non-convex rate (27).

Both are online convex problems on a box, run with the registry's ``adagrad``, ``adam`` and
``amsgrad``; after each step the parameter is clipped back onto the box. For a diagonal
preconditioner the projection in the preconditioner's norm onto a box is the coordinate-wise clip, so
this is exactly the projected method the theorems analyse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lightning_optsurvey.theory._run import run_optimizer
from lightning_optsurvey.theory.decisions import (
    MC_Z,
    bound_violations,
    loglog_slope,
    mc_bound_violations,
    mean_and_stderr,
)
from lightning_optsurvey.theory.fields import flag, integer, integers, positive, real
from lightning_optsurvey.theory.problems import DTYPE, BoundedGradientFunction, ReddiOnline, generator
from lightning_optsurvey.theory.result import CheckOutcome, Result, register_result

__all__ = ["AdaGradRegret", "AdamFailsAMSGradConverges", "AdamNonConvex"]

#: Relative slack on the regret bound: float64 round-off only.
REGRET_RTOL = 1e-9
#: Adam must end within this distance of the wrong end +1, AMSGrad of the right end -1 (mean over the
#: last third of the rounds).
ENDPOINT_ATOL = 0.1
#: AMSGrad's average regret at T must be below this fraction of Adam's limit 2(C - 2)/3.
AMSGRAD_REGRET_FRACTION = 0.1
#: Allowed distance between the measured log-log exponent of Adam's E||grad F||^2 and the bound's.
EXPONENT_ATOL = 0.15
#: The eps of Defossez et al.'s Adam (sqrt(eps + v) in the denominator) at which the bound is evaluated:
#: below float64's resolution of every v_n seen, so that torch's eps = 0 computes that algorithm exactly.
ADAM_EPS = 1e-30


@dataclass(frozen=True)
class _OnlineMedian:
    r"""Online absolute loss :math:`f_t(x) = \|x - z_t\|_1` on the box :math:`[-B, B]^d`."""

    targets: torch.Tensor
    box: float

    @property
    def diameter(self) -> float:
        r""":math:`D_\infty`: the box's side."""
        return 2.0 * self.box


@register_result
class AdaGradRegret(Result):
    """Projected diagonal AdaGrad has O(sqrt(T)) regret on online convex problems."""

    number = 9
    name = "adagrad_regret"
    statement = (
        "convex online losses on a box of l_inf-diameter D, diagonal AdaGrad with step eta: "
        "Regret_T <= (D^2/(2 eta) + eta) sum_i ||g_(1:T,i)||_2 (+ D^2 d delta/(2 eta)) <= "
        "(D^2/(2 eta) + eta) d G sqrt(T)"
    )
    reference = "Duchi, Hazan & Singer 2011, jmlr.org/papers/v12/duchi11a, Thm. 5 (diagonal case; delta = torch's eps)"
    criterion = (
        f"regret against the best fixed point in hindsight (the coordinate-wise median of z_1..z_T) "
        f"below the bound at every T = 1..rounds (slack {REGRET_RTOL:g}); losses ||x - z_t||_1 have "
        "|g_ti| = 1, so the bound is exactly (D^2/(2 eta) + eta) d sqrt(T)"
    )

    dim: int = integer(5)
    rounds: int = integer(2000, low=10)
    box: float = positive(3.0)
    lr: float | None = positive(None)

    def _lr(self, problem: _OnlineMedian) -> float:
        return problem.diameter / math.sqrt(2.0) if self.lr is None else float(self.lr)

    def problem(self, seed: int = 0) -> _OnlineMedian:
        gen = generator(seed)
        centre = (2.0 * torch.rand(self.dim, generator=gen, dtype=DTYPE) - 1.0) * (self.box - 1.0)
        targets = centre + torch.randn(self.rounds, self.dim, generator=gen, dtype=DTYPE)
        return _OnlineMedian(targets.clamp(-self.box, self.box), self.box)

    def predict(self, problem: _OnlineMedian, k: int) -> float:
        lr, d = self._lr(problem), problem.diameter
        # torch's Adagrad divides by sqrt(sum g^2) + eps: the delta of Duchi et al. is eps = 1e-10.
        return (d * d / (2 * lr) + lr) * self.dim * math.sqrt(k) + d * d * self.dim * 1e-10 / (2 * lr)

    def check(self, seed: int = 0) -> CheckOutcome:
        p = self.problem(seed)
        lr = self._lr(p)
        xs, _ = run_optimizer(
            "adagrad", torch.zeros(self.dim, dtype=DTYPE), lambda x, k: torch.sign(x - p.targets[k]), self.rounds,
            project=lambda x: x.clamp(-p.box, p.box), lr=lr, eps=1e-10,
        )
        xs = xs[:-1]  # x_1 .. x_T, the points each loss is evaluated at
        losses = (xs - p.targets).abs().sum(1).cumsum(0)
        checkpoints = list(range(1, self.rounds + 1))
        regrets, bounds = [], []
        for t in checkpoints:
            comparator = p.targets[:t].median(0).values
            best = float((comparator - p.targets[:t]).abs().sum())
            regrets.append(float(losses[t - 1]) - best)
            bounds.append(self.predict(p, t))
        violations = bound_violations(regrets, bounds, REGRET_RTOL)
        return CheckOutcome(
            predicted=bounds[-1], measured=regrets[-1], holds=violations == 0, name=self.name,
            quantity=f"regret at T={self.rounds}",
            details=f"d={self.dim}, D_inf={p.diameter:g}, eta={lr:.4g}, G=1; regret/sqrt(T) at T: "
            f"{regrets[-1] / math.sqrt(self.rounds):.3g} (bound {bounds[-1] / math.sqrt(self.rounds):.3g}); "
            f"violations {violations}/{len(checkpoints)}",
            steps=checkpoints, predicted_curve=bounds, measured_curve=regrets, x_label="T", y_label="Regret_T",
            log_x=True,
        )


@register_result
class AdamFailsAMSGradConverges(Result):
    """Adam's average regret stays at 2(C-2)/3 on Reddi et al.'s problem; AMSGrad's goes to 0."""

    number = 10
    name = "adam_vs_amsgrad"
    statement = (
        "online f_t(x) = C x if t mod 3 = 1 else -x on [-1, 1], C > 2, beta1 = 0, beta2 = 1/(1 + C^2), "
        "step alpha/sqrt(t): Adam converges to x = +1 (average regret -> 2(C - 2)/3), AMSGrad to the "
        "optimum x = -1 (average regret -> 0)"
    )
    reference = "Reddi, Kale & Kumar 2018, arXiv:1904.09237, Sec. 3 (Thm. 1 example) and Thm. 4"
    criterion = (
        f"Adam's mean iterate over the last third within {ENDPOINT_ATOL:g} of +1 and its R_T/T within "
        f"{ENDPOINT_ATOL:g} of 2(C-2)/3; AMSGrad's within {ENDPOINT_ATOL:g} of -1 and R_T/T below "
        f"{AMSGRAD_REGRET_FRACTION:g} x 2(C-2)/3 (torch's bias correction and eps = 1e-8 included)"
    )

    C: float = positive(3.0)
    rounds: int = integer(1500, low=30)
    alpha: float = positive(0.5)
    beta2: float | None = real(None, low=0.0, high=1.0, high_open=True)

    def problem(self, seed: int = 0) -> ReddiOnline:
        return ReddiOnline(self.C)

    def predict(self, problem: ReddiOnline, k: int) -> float:
        """Adam's limiting average regret ``2(C-2)/3`` (AMSGrad's is 0)."""
        return 2.0 * (problem.C - 2.0) / 3.0

    def _run(self, name: str, problem: ReddiOnline) -> tuple[list[float], list[float]]:
        beta2 = 1.0 / (1.0 + problem.C**2) if self.beta2 is None else self.beta2

        def schedule(optimizer: torch.optim.Optimizer, k: int) -> None:
            optimizer.param_groups[0]["lr"] = self.alpha / math.sqrt(k + 1)

        xs, _ = run_optimizer(
            name, torch.zeros(1, dtype=DTYPE), lambda x, k: torch.full_like(x, problem.coefficient(k + 1)),
            self.rounds, before_step=schedule, project=lambda x: x.clamp(-1.0, 1.0), lr=self.alpha,
            betas=(0.0, beta2),
        )
        x = xs[:-1, 0]
        slopes = torch.tensor([problem.coefficient(t) for t in range(1, self.rounds + 1)], dtype=DTYPE)
        regret = (slopes * x).cumsum(0) + slopes.cumsum(0).abs()
        average = (regret / torch.arange(1, self.rounds + 1, dtype=DTYPE)).tolist()
        return x.tolist(), average

    def check(self, seed: int = 0) -> CheckOutcome:
        p = self.problem(seed)
        limit = self.predict(p, self.rounds)
        tail = slice(2 * self.rounds // 3, None)
        adam_x, adam_avg = self._run("adam", p)
        ams_x, ams_avg = self._run("amsgrad", p)
        adam_end = sum(adam_x[tail]) / len(adam_x[tail])
        ams_end = sum(ams_x[tail]) / len(ams_x[tail])
        holds = (
            p.C > 2
            and abs(adam_end - 1.0) <= ENDPOINT_ATOL
            and abs(adam_avg[-1] - limit) <= ENDPOINT_ATOL
            and abs(ams_end + 1.0) <= ENDPOINT_ATOL
            and ams_avg[-1] <= AMSGRAD_REGRET_FRACTION * limit
        )
        steps = list(range(1, self.rounds + 1))
        return CheckOutcome(
            predicted=limit, measured=adam_avg[-1], holds=holds, name=self.name,
            quantity=f"Adam's average regret R_T/T at T={self.rounds}",
            details=f"C={p.C:g}, alpha={self.alpha:g}; Adam ends at x={adam_end:.3f}, R_T/T={adam_avg[-1]:.3f}; "
            f"AMSGrad ends at x={ams_end:.3f}, R_T/T={ams_avg[-1]:.4f}",
            steps=steps, predicted_curve=[limit] * len(steps), measured_curve=adam_avg,
            extra_curves={"AMSGrad R_t/t": tuple(ams_avg)}, x_label="t", y_label="R_t / t", log_x=True,
            log_y=False,
        )


@dataclass(frozen=True)
class _AdamProblem:
    function: BoundedGradientFunction
    noise: float
    start: torch.Tensor

    @property
    def R(self) -> float:
        """``sup ||stochastic gradient||_inf``: the function's bound plus the noise's."""
        return self.function.gradient_bound + self.noise


@register_result
class AdamNonConvex(Result):
    """Adam (beta1 = 0) on a smooth non-convex function: E||grad F(x_tau)||^2 = O(d ln N / sqrt N)."""

    number = 27
    name = "adam_nonconvex"
    statement = (
        "F L-smooth, bounded below by F*, stochastic gradients with ||g||_inf <= R a.s.; Adam with beta1 = 0, "
        "step alpha_n = alpha sqrt((1 - beta2^n)/(1 - beta2)) (torch's bias correction) and tau uniform in "
        "{0..N-1}: E||grad F(x_tau)||^2 <= 2R(F(x_0) - F*)/(alpha N) + E (ln(1 + R^2/((1 - beta2) eps))/N - "
        "ln beta2), E = 4dR^2/sqrt(1 - beta2) + alpha d R L/(1 - beta2); with beta2 = 1 - 1/N and alpha = "
        "alpha_0/sqrt(N) the bound is O(d ln N / sqrt N)"
    )
    reference = "Defossez, Bottou, Bach & Usunier 2022, arXiv:2003.02395, Thm. 2 (Adam without momentum)"
    criterion = (
        f"at every horizon N the Monte-Carlo mean of (1/N) sum_(n<N) ||grad F(x_n)||^2 below the bound ({MC_Z:g} "
        f"standard errors allowance), and its log-log slope over the horizons within {EXPONENT_ATOL:g} of the "
        "bound's (the ln N / sqrt N shape); F = sum_j sqrt(1 + x_j^2) + a cos(b x_j) (non-convex, "
        "||grad F||_inf <= 1 + ab, L = 1 + ab^2) plus Rademacher noise of size c: R = 1 + ab + c. The registry's "
        "'adam' with betas (0, beta2) and eps = 0 is Defossez et al.'s Adam with eps -> 0; the bound is taken at "
        f"eps = {ADAM_EPS:g}, below float64's resolution of every v_n (checked: v_1 > {ADAM_EPS / 2**-53:.0e})"
    )

    dim: int = integer(2)
    runs: int = integer(100, low=10)
    horizons: tuple[int, ...] = integers((64, 256, 1024), low=2, min_length=2)
    alpha0: float = positive(1.0)
    noise: float = positive(1.0)
    scaled: bool = flag(True)

    def problem(self, seed: int = 0) -> _AdamProblem:
        start = 3.0 * (2.0 * torch.rand(self.dim, generator=generator(seed), dtype=DTYPE) - 1.0)
        return _AdamProblem(BoundedGradientFunction(self.dim, 0.5, 2.0), self.noise, start)

    def hyperparameters(self, horizon: int) -> tuple[float, float]:
        """``(alpha, beta2)``: ``alpha_0/sqrt(N)`` and ``1 - 1/N`` (at the smallest horizon when not ``scaled``)."""
        n = horizon if self.scaled else min(self.horizons)
        return self.alpha0 / math.sqrt(n), 1.0 - 1.0 / n

    def predict(self, problem: _AdamProblem, k: int) -> float:
        """Defossez et al.'s bound at horizon ``N = k``."""
        f, r, d = problem.function, problem.R, self.dim
        alpha, beta2 = self.hyperparameters(k)
        gap = float(f.value(problem.start)) - f.infimum
        e = 4 * d * r * r / math.sqrt(1 - beta2) + alpha * d * r * f.L / (1 - beta2)
        return 2 * r * gap / (alpha * k) + e * (math.log1p(r * r / ((1 - beta2) * ADAM_EPS)) / k - math.log(beta2))

    def check(self, seed: int = 0) -> CheckOutcome:
        p = self.problem(seed)
        f = p.function
        gen = generator(seed + 1)
        measured, bounds, lines, ok = [], [], [], True
        smallest_first = math.inf

        def noisy(x: torch.Tensor, k: int) -> torch.Tensor:
            signs = torch.randint(2, x.shape, generator=gen).to(DTYPE) * 2.0 - 1.0
            return f.gradient(x) + p.noise * signs

        for horizon in self.horizons:
            alpha, beta2 = self.hyperparameters(horizon)
            xs, gs = run_optimizer(
                "adam", p.start.expand(self.runs, self.dim), noisy, horizon, lr=alpha, betas=(0.0, beta2), eps=0.0,
            )
            smallest_first = min(smallest_first, float(gs[0].square().min()))
            norms = f.gradient(xs[:-1]).square().sum(-1)  # ||grad F(x_n)||^2, n = 0..N-1
            mean, err = map(float, mean_and_stderr(norms.mean(0)))
            bound = self.predict(p, horizon)
            ok = ok and mc_bound_violations([mean], [err], [bound]) == 0
            measured.append(mean)
            bounds.append(bound)
            lines.append(f"N={horizon}: {mean:.4g} +- {err:.1g} <= {bound:.4g}")
        slope = loglog_slope(list(self.horizons), measured)
        predicted_slope = loglog_slope(list(self.horizons), bounds)
        resolved = smallest_first > ADAM_EPS / 2**-53
        holds = ok and abs(slope - predicted_slope) <= EXPONENT_ATOL and resolved
        return CheckOutcome(
            predicted=predicted_slope, measured=slope, holds=holds, name=self.name,
            quantity="log-log slope of E||grad F(x_tau)||^2 against N",
            details=f"d={self.dim}, L={f.L:g}, R={p.R:g}, F(x0) - F* = {float(f.value(p.start)) - f.infimum:.4g}, "
            f"alpha={self.alpha0:g}/sqrt(N), beta2=1-1/N{'' if self.scaled else ' (fixed at the smallest N)'}, "
            f"{self.runs} runs; " + "; ".join(lines) + f"; min v_1 = {smallest_first:.1e}",
            steps=list(self.horizons), predicted_curve=bounds, measured_curve=measured, x_label="N",
            y_label="E||grad F(x_tau)||^2", log_x=True,
        )
