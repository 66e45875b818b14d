"""Adaptive methods: AdaGrad's regret (result 9) and Adam's non-convergence (result 10).

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
from lightning_optsurvey.theory.problems import DTYPE, ReddiOnline, generator
from lightning_optsurvey.theory.result import (
    CheckOutcome,
    Result,
    _positive_float,
    _positive_int,
    bound_violations,
    register_result,
)

__all__ = ["AdaGradRegret", "AdamFailsAMSGradConverges"]

#: Relative slack on the regret bound: float64 round-off only.
REGRET_RTOL = 1e-9
#: Adam must end within this distance of the wrong end +1, AMSGrad of the right end -1 (mean over the
#: last third of the rounds).
ENDPOINT_ATOL = 0.1
#: AMSGrad's average regret at T must be below this fraction of Adam's limit 2(C - 2)/3.
AMSGRAD_REGRET_FRACTION = 0.1


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
@dataclass(frozen=True)
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

    dim: int = 5
    rounds: int = 2000
    box: float = 3.0
    lr: float | None = None

    def __post_init__(self) -> None:
        _positive_int("dim", self.dim)
        _positive_int("rounds", self.rounds, 10)
        _positive_float("box", self.box)
        if self.lr is not None:
            _positive_float("lr", self.lr)

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
@dataclass(frozen=True)
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

    C: float = 3.0
    rounds: int = 1500
    alpha: float = 0.5
    beta2: float | None = None

    def __post_init__(self) -> None:
        _positive_float("C", self.C)
        _positive_int("rounds", self.rounds, 30)
        _positive_float("alpha", self.alpha)
        if self.beta2 is not None and not 0.0 <= self.beta2 < 1.0:
            raise ValueError(f"beta2 must be in [0, 1), got {self.beta2!r}")

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
