r"""Second-order methods: Newton's local quadratic convergence (11) and L-BFGS on a quadratic (12).

Newton's method is not an optimizer of the registry (no library ships the exact, dense Newton step for
deep learning, and the survey treats it as the reference point of the quasi-Newton family), so the
check takes the step :math:`x - \nabla^2 f(x)^{-1} \nabla f(x)` with the dense Hessian of the data term
from the package's :class:`~lightning_optsurvey.curvature.HessianOperator` (``op.matmat(I)``) plus the
ridge's :math:`\lambda I`, and the gradient from autograd. L-BFGS is the registry's ``lbfgs`` (torch's,
strong Wolfe line search).
"""

from __future__ import annotations

import math

import torch

from lightning_optsurvey.curvature import HessianOperator
from lightning_optsurvey.optim import create_optimizer
from lightning_optsurvey.theory.decisions import bound_violations
from lightning_optsurvey.theory.fields import integer, positive, real
from lightning_optsurvey.theory.problems import DTYPE, LogisticRegression, Quadratic, generator
from lightning_optsurvey.theory.result import CheckOutcome, Result, register_result

__all__ = ["LBFGSSuperlinear", "NewtonQuadratic"]

#: Errors below this are round-off and are not used to judge a rate.
ERROR_FLOOR = 1e-13
#: Relative slack on Newton's error bound (round-off in the solve).
NEWTON_RTOL = 1e-6
#: Absolute slack on Newton's error bound: the distance to x* is only known to ~100 ulp.
NEWTON_ATOL = 1e-14
#: Newton's empirical order p_k = log(e_(k+1)/e_k) / log(e_k/e_(k-1)) at the last step above the floor
#: must be at least this (2 in exact arithmetic).
NEWTON_MIN_ORDER = 1.8
#: L-BFGS must reach the tolerance in at most this fraction of the iterations that the optimal linear
#: rate of first-order methods, (sqrt(kappa) - 1)/(sqrt(kappa) + 1), needs.
LBFGS_SPEEDUP = 0.5
#: Superlinear: the geometric mean of the last LBFGS_TAIL error ratios must be at most this (0.05-0.12 seen
#: over seeds 0-7 with full memory; 0.2-0.45 with memory d, which is R-linear; 0.82 is the optimal linear rate).
LBFGS_SUPERLINEAR_RATIO = 0.2
LBFGS_TAIL = 5
#: Scale of x* (x_0 = 0) in the L-BFGS check, keeping torch's absolute curvature-pair test y^T s > 1e-10
#: satisfied down to the tolerance.
MINIMIZER_SCALE = 1e6


@register_result
class NewtonQuadratic(Result):
    """Newton's method converges quadratically near the minimizer."""

    number = 11
    name = "newton_quadratic"
    statement = (
        "f mu-strongly convex with M-Lipschitz Hessian: the Newton step satisfies "
        "||x_(k+1) - x*|| <= M/(2 mu) ||x_k - x*||^2 (local quadratic convergence)"
    )
    reference = "Nesterov 2004, Thm. 1.2.5; Nocedal & Wright 2006, Numerical Optimization, Thm. 3.5"
    criterion = (
        f"bound at every k with ||x_k - x*|| > {ERROR_FLOOR:g} (slack {NEWTON_RTOL:g}) and empirical order "
        f">= {NEWTON_MIN_ORDER:g} at the last step above the floor; on L2-regularized logistic regression, "
        "mu = lambda and M = mean ||a_i||^3 / (6 sqrt 3)"
    )

    samples: int = integer(100, low=2)
    dim: int = integer(5)
    reg: float = positive(0.1)
    steps: int = integer(7, low=3)
    lr_scale: float = positive(1.0)

    def problem(self, seed: int = 0) -> LogisticRegression:
        return LogisticRegression.build(self.samples, self.dim, self.reg, generator(seed))

    def predict(self, problem: LogisticRegression, k: int, error: float | None = None) -> float:
        """Bound on the next error given the current one (``error``; default ``||x_0 - x*||`` with x_0 = 0)."""
        if error is None:
            error = float(torch.linalg.vector_norm(problem.minimizer))
        return problem.hessian_lipschitz / (2.0 * problem.mu) * error**2

    @staticmethod
    def _newton(problem: LogisticRegression, w: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        # Derivatives from the curvature engine and autograd, not the problem's closed forms (which x*
        # is computed with).
        eye = torch.eye(w.numel(), dtype=w.dtype)
        hessian = HessianOperator(*problem.data_term_model(w)).matmat(eye) + problem.reg * eye
        gradient = torch.autograd.functional.jacobian(problem.value, w)
        return w - scale * torch.linalg.solve(hessian, gradient)

    def check(self, seed: int = 0) -> CheckOutcome:
        p = self.problem(seed)
        w_star = p.minimizer
        w = torch.zeros(self.dim, dtype=DTYPE)
        errors = [float(torch.linalg.vector_norm(w - w_star))]
        for _ in range(self.steps):
            w = self._newton(p, w, self.lr_scale)
            errors.append(float(torch.linalg.vector_norm(w - w_star)))
        valid = [k for k in range(self.steps) if errors[k] > ERROR_FLOOR]
        bound = [self.predict(p, k, errors[k]) for k in valid]
        measured = [errors[k + 1] for k in valid]
        violations = bound_violations(measured, bound, NEWTON_RTOL, NEWTON_ATOL)
        orders = [
            math.log(errors[k + 1] / errors[k]) / math.log(errors[k] / errors[k - 1])
            for k in valid[1:]
            if errors[k + 1] > ERROR_FLOOR and errors[k - 1] != errors[k]
        ]
        order = orders[-1] if orders else math.nan
        holds = violations == 0 and order >= NEWTON_MIN_ORDER
        return CheckOutcome(
            predicted=2.0, measured=order, holds=holds, name=self.name, quantity="order of convergence",
            details=f"mu={p.mu:g}, M={p.hessian_lipschitz:.4g}, 2 mu/M={2 * p.mu / p.hessian_lipschitz:.3g}, "
            f"step scale {self.lr_scale:g}; errors "
            + ", ".join(f"{e:.1e}" for e in errors[: len(valid) + 1])
            + f"; bound violations {violations}/{len(valid)}",
            steps=[k + 1 for k in valid], predicted_curve=bound, measured_curve=measured,
            y_label="||x_(k+1) - x*||",
        )


@register_result
class LBFGSSuperlinear(Result):
    """L-BFGS whose memory covers every iteration (BFGS) converges superlinearly on a quadratic."""

    number = 12
    name = "lbfgs_superlinear"
    statement = (
        "strongly convex quadratic, L-BFGS with memory at least the number of iterations (BFGS from a scaled "
        "identity) and a Wolfe line search trying the unit step first: superlinear, e_(k+1)/e_k -> 0, "
        "whereas first-order methods are at best linear at (sqrt(kappa)-1)/(sqrt(kappa)+1); with a memory "
        "m shorter than the run L-BFGS is only R-linear"
    )
    reference = (
        "Liu & Nocedal 1989, doi:10.1007/BF01589116 (L-BFGS, R-linear for finite m); Powell 1976 and "
        "Dennis & More 1974 (BFGS with Wolfe steps is superlinear); Nesterov 2004, Thm. 2.1.13 "
        "(first-order lower bound)"
    )
    criterion = (
        f"iterations to ||x_k - x*|| <= tol ||x_0 - x*|| (tol = 1e-10) at most {LBFGS_SPEEDUP:g} x the count "
        "ceil(log(tol)/log((sqrt(kappa)-1)/(sqrt(kappa)+1))) of the optimal linear rate, and the geometric mean "
        f"of the last {LBFGS_TAIL} ratios e_(k+1)/e_k at most {LBFGS_SUPERLINEAR_RATIO:g} (the optimal linear "
        "rate is 0.82 here); the registry's 'lbfgs' (torch's, strong Wolfe) with memory = the iteration cap. "
        f"x* is scaled to norm ~{MINIMIZER_SCALE:g} so that y^T s stays above the absolute 1e-10 below which "
        "torch skips a curvature pair (at norm ~1 the pairs stop near e ~ 1e-5 and the rate freezes)"
    )

    dim: int = integer(10, low=2)
    kappa: float = real(100.0, low=1.0, low_open=True)
    tol: float = real(1e-10, low=0.0, high=1.0, low_open=True, high_open=True)
    history_size: int | None = integer(None)

    def problem(self, seed: int = 0) -> Quadratic:
        q = Quadratic.with_spectrum(torch.linspace(1.0 / self.kappa, 1.0, self.dim, dtype=DTYPE), generator(seed))
        return Quadratic(q.eigenvalues, q.basis, MINIMIZER_SCALE * q.minimizer)

    def predict(self, problem: Quadratic, k: int) -> float:
        """The optimal linear rate's error bound ``((sqrt(kappa)-1)/(sqrt(kappa)+1))^k ||x_0 - x*||``."""
        s = math.sqrt(problem.L / problem.mu)
        return ((s - 1) / (s + 1)) ** k * float(problem.distance(torch.zeros(problem.dim, dtype=DTYPE)))

    def check(self, seed: int = 0) -> CheckOutcome:
        q = self.problem(seed)
        s = math.sqrt(q.L / q.mu)
        linear_count = math.ceil(math.log(self.tol) / math.log((s - 1) / (s + 1)))
        cap = 2 * linear_count
        memory = cap if self.history_size is None else self.history_size
        param = torch.nn.Parameter(torch.zeros(q.dim, dtype=DTYPE))
        optimizer = create_optimizer(
            "lbfgs", [param], lr=1.0, max_iter=1, max_eval=25, tolerance_grad=0.0, tolerance_change=0.0,
            history_size=memory, line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = q.value(param)
            loss.backward()
            return loss

        errors = [float(q.distance(param.detach()))]
        while errors[-1] > self.tol * errors[0] and len(errors) <= cap:
            optimizer.step(closure)
            errors.append(float(q.distance(param.detach())))
        count = len(errors) - 1 if errors[-1] <= self.tol * errors[0] else math.inf
        ratios = [errors[k + 1] / errors[k] for k in range(len(errors) - 1)]
        last = ratios[-LBFGS_TAIL:]
        final_ratio = math.exp(sum(math.log(r) for r in last) / len(last)) if all(r > 0 for r in last) else 1.0
        holds = count <= LBFGS_SPEEDUP * linear_count and final_ratio <= LBFGS_SUPERLINEAR_RATIO
        ks = list(range(len(errors)))
        return CheckOutcome(
            predicted=linear_count, measured=count, holds=holds, name=self.name,
            quantity=f"iterations to reach {self.tol:g} relative error",
            details=f"d={q.dim}, kappa={s * s:g}, memory {memory}; geometric mean of the last {len(last)} ratios "
            f"{final_ratio:.3g}; last ratios e_(k+1)/e_k: " + ", ".join(f"{r:.2g}" for r in last),
            steps=ks, predicted_curve=[self.predict(q, k) for k in ks], measured_curve=errors,
            y_label="||x_k - x*||",
        )
