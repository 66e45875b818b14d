r"""Decentralized optimization on heterogeneous data and with compressed gossip: four executable checks.

The problem (:class:`HeterogeneousQuadratics`): rank ``i`` of ``N`` on a ring minimizes
:math:`f_i(x) = \tfrac{a_i}{2}\lVert x - b_i\rVert^2` with its own curvature :math:`a_i` and minimizer
:math:`b_i`; the global minimizer of :math:`\sum_i f_i` is :math:`x^* = \sum_i a_i b_i / \sum_i a_i`.
Every iteration below is linear in the stacked state, so its limit and its rate are exact numbers:

- ``dpsgd_heterogeneity_bias``: D-PSGD (adapt then combine, the ``GossipStrategy`` default)
  :math:`X \leftarrow W(X - \alpha A(X - B))` stalls at the solution of
  :math:`(I - W + \alpha W A) X = \alpha W A B`, away from :math:`\mathbf 1 x^{*T}`.
- ``d2_exact_convergence``: D² :math:`X^{t+1} = M(2X^t - X^{t-1} - \alpha A (X^t - X^{t-1}))` with
  :math:`M = (I + W)/2` (the ring of 8 has :math:`\lambda_{\min}(W) = -1/3`, where ``W`` itself is
  unstable for D²; ``GossipStrategy(algorithm="d2")`` makes the same choice) converges to
  :math:`\mathbf 1 x^{*T}` at the rate given by the spectral radius of its companion matrix (the eigenvalue
  1 of the conserved quantity excluded).
- ``gradient_tracking_exact_convergence``: DIGing :math:`X^{t+1} = W X^t - \alpha Y^t`,
  :math:`Y^{t+1} = W Y^t + A(X^{t+1} - X^t)` likewise.
- ``choco_gossip_consensus``: CHOCO-Gossip with a :class:`~lightning_optsurvey.averaging.compression.Compressor`
  of quality :math:`\delta` on a graph with spectral gap :math:`\rho` and :math:`\beta = \lVert I - W\rVert_2`,
  at the theorem's step :math:`\gamma`, satisfies :math:`e_t \le (1 - \delta^2\rho/82)^t e_0`.

The mixing matrices are the strategies' own (:meth:`~lightning_optsurvey.strategies.Topology.mixing_matrix`),
and CHOCO uses the package's compressors, so the checks exercise the objects training runs with.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lightning_optsurvey.averaging import Topology
from lightning_optsurvey.averaging.compression import make_compressor
from lightning_optsurvey.theory.decisions import bound_violations, tail_rate
from lightning_optsurvey.theory.fields import flag, integer, positive
from lightning_optsurvey.theory.problems import DTYPE, generator
from lightning_optsurvey.theory.result import CheckOutcome, Result, register_result

__all__ = [
    "ChocoGossipConsensus",
    "D2ExactConvergence",
    "DPSGDHeterogeneityBias",
    "GradientTrackingExactConvergence",
    "HeterogeneousQuadratics",
]

#: Relative agreement between D-PSGD's measured plateau and the solved fixed point.
BIAS_RTOL = 1e-8
#: The plateau must be at least this far from the minimizer (relative to ||B - 1 x*||) to count as a stall.
MIN_BIAS = 1e-3
#: Relative error (to the start) that counts as converged to the exact minimizer.
EXACT_TOL = 1e-10
#: Two-sided relative band on the fitted tail rate against the predicted spectral radius.
RATE_RTOL = 2e-2
#: The rate is fitted where the relative error lies between these two values (transient and round-off excluded).
FIT_WINDOW = (1e-3, 1e-9)
#: Relative slack on CHOCO's bound (round-off).
CHOCO_RTOL = 1e-9


@dataclass(frozen=True)
class HeterogeneousQuadratics:
    """``f_i(x) = a_i ||x - b_i||^2 / 2`` on ``N`` ranks with mixing matrix ``w``.

    Attributes:
        w: The doubly stochastic mixing matrix ``(N, N)``.
        curvatures: ``a`` ``(N,)``.
        targets: ``B`` ``(N, d)``.
    """

    w: torch.Tensor
    curvatures: torch.Tensor
    targets: torch.Tensor

    @property
    def minimizer(self) -> torch.Tensor:
        """``x* = sum_i a_i b_i / sum_i a_i``."""
        a = self.curvatures
        return (a[:, None] * self.targets).sum(0) / a.sum()

    def gradients(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's gradient ``a_i (x_i - b_i)``, stacked."""
        return self.curvatures[:, None] * (x - self.targets)

    def error(self, x: torch.Tensor) -> float:
        """``||X - 1 x*^T||_F``."""
        return float(torch.linalg.vector_norm(x - self.minimizer))


def _quadratics(kind: str, world_size: int, dim: int, seed: int) -> HeterogeneousQuadratics:
    gen = generator(seed)
    curvatures = 0.5 + torch.rand(world_size, generator=gen, dtype=DTYPE)  # a_i in [0.5, 1.5)
    targets = 3.0 * torch.randn(world_size, dim, generator=gen, dtype=DTYPE)
    return HeterogeneousQuadratics(Topology(kind, world_size).mixing_matrix(0), curvatures, targets)


def _spectral_radius_without_one(matrix: torch.Tensor) -> float:
    """Largest eigenvalue modulus of ``matrix`` once its eigenvalue 1 (a conserved quantity) is removed."""
    eigenvalues = torch.linalg.eigvals(matrix)
    keep = (eigenvalues - 1).abs() > 1e-9
    return float(eigenvalues[keep].abs().max())


@dataclass(frozen=True)
class _HeterogeneousQuadraticsCheck(Result):
    """The configuration of the checks on :class:`HeterogeneousQuadratics`: a static graph of ``world_size``."""

    world_size: int = integer(8, low=3)
    dim: int = integer(5)
    lr: float = positive(0.2)
    steps: int = integer(600, low=10)
    kind: str = "ring"

    def validate(self) -> None:
        if Topology(self.kind, self.world_size).is_time_varying:  # also refuses unknown kinds and sizes
            raise ValueError(f"{self.name} needs a static topology, got {self.kind!r}")

    def problem(self, seed: int = 0) -> HeterogeneousQuadratics:
        return _quadratics(self.kind, self.world_size, self.dim, seed)


@register_result
class DPSGDHeterogeneityBias(_HeterogeneousQuadraticsCheck):
    """D-PSGD with a constant step stalls at a biased point on heterogeneous quadratics."""

    number = 16
    name = "dpsgd_heterogeneity_bias"
    statement = (
        "f_i(x) = a_i ||x - b_i||^2/2, D-PSGD X <- W(X - alpha grad F(X)) with constant alpha: converges to the "
        "solution X_inf of (I - W + alpha W A) X = alpha W A B, at distance ||X_inf - 1 x*|| > 0 from the minimizer "
        "(the heterogeneity bias; O(alpha zeta / (1 - lambda_2)))"
    )
    reference = (
        "Yuan, Ling & Yin 2016, On the convergence of decentralized gradient descent, Sec. 3; "
        "Tang et al. 2018, arXiv:1803.07068, Sec. 1 (D-PSGD's bias on decentralized data)"
    )
    criterion = (
        f"after `steps` iterations the distance to the minimizer equals the predicted ||X_inf - 1 x*|| within "
        f"{BIAS_RTOL:g} (relative), and that bias is at least {MIN_BIAS:g} ||B - 1 x*|| (a stall, not convergence)"
    )

    def fixed_point(self, problem: HeterogeneousQuadratics) -> torch.Tensor:
        """D-PSGD's limit: the solution of ``(I - W + alpha W A) X = alpha W A B``."""
        n = self.world_size
        wa = problem.w @ torch.diag(problem.curvatures)
        system = torch.eye(n, dtype=DTYPE) - problem.w + self.lr * wa
        return torch.linalg.solve(system, self.lr * wa @ problem.targets)

    def predict(self, problem: HeterogeneousQuadratics, k: int) -> float:
        """The bias ``||X_inf - 1 x*||_F`` (the same for every ``k`` past the transient)."""
        return problem.error(self.fixed_point(problem))

    def check(self, seed: int = 0) -> CheckOutcome:
        problem = self.problem(seed)
        x = torch.zeros_like(problem.targets)
        errors = []
        for _ in range(self.steps):
            x = problem.w @ (x - self.lr * problem.gradients(x))
            errors.append(problem.error(x))
        bias = self.predict(problem, self.steps)
        spread = problem.error(problem.targets)
        measured = errors[-1]
        holds = math.isfinite(measured) and abs(measured - bias) <= BIAS_RTOL * bias and bias >= MIN_BIAS * spread
        return CheckOutcome(
            predicted=bias, measured=measured, holds=holds, name=self.name,
            quantity="||X_T - 1 x*||_F after T steps",
            details=(f"N={self.world_size} {self.kind}, alpha={self.lr:g}, a_i in [0.5, 1.5): plateau {measured:.6g}, "
                     f"solved fixed point {bias:.6g}, ||B - 1 x*|| = {spread:.3g}"),
            steps=list(range(1, self.steps + 1)), predicted_curve=[bias] * self.steps, measured_curve=errors,
            y_label="||X_t - 1 x*||_F",
        )


class _ExactConvergence(_HeterogeneousQuadraticsCheck):
    """Shared check of D² and gradient tracking: exact limit, linear rate = spectral radius."""

    def iteration_matrix(self, problem: HeterogeneousQuadratics) -> torch.Tensor:
        raise NotImplementedError

    def iterates(self, problem: HeterogeneousQuadratics) -> Iterator[torch.Tensor]:
        """The method's iterates ``X_0, X_1, ..., X_steps`` (one row per node)."""
        raise NotImplementedError

    def run(self, problem: HeterogeneousQuadratics) -> list[float]:
        """``||X_t - 1 x*||_F`` for ``t = 0..steps``."""
        return [problem.error(x) for x in self.iterates(problem)]

    def predict(self, problem: HeterogeneousQuadratics, k: int) -> float:
        """The predicted rate: the spectral radius of the iteration matrix, eigenvalue 1 excluded."""
        return _spectral_radius_without_one(self.iteration_matrix(problem))

    def check(self, seed: int = 0) -> CheckOutcome:
        problem = self.problem(seed)
        rate = self.predict(problem, 0)
        errors = self.run(problem)
        start = errors[0]
        relative = [e / start for e in errors]
        high, low = FIT_WINDOW
        window = [k for k, r in enumerate(relative) if low <= r <= high]
        fitted = tail_rate(relative, window[0], window[-1] + 1) if len(window) >= 2 else math.nan
        final = relative[-1]
        holds = (rate < 1.0 and math.isfinite(final) and final <= EXACT_TOL
                 and abs(fitted - rate) <= RATE_RTOL * rate)
        anchor = window[0] if window else 0
        log_rate = math.log(rate)
        predicted_curve = [
            relative[anchor] * math.exp(min(700.0, (k - anchor) * log_rate)) for k in range(len(relative))
        ]
        return CheckOutcome(
            predicted=rate, measured=fitted, holds=holds, name=self.name,
            quantity="linear rate of ||X_t - 1 x*||",
            details=(f"N={self.world_size} {self.kind}, alpha={self.lr:g}: rate fitted on relative errors "
                     f"{high:g}..{low:g} = {fitted:.5f}, spectral radius {rate:.5f}; relative error after "
                     f"{len(relative)} steps {final:.1e}"),
            steps=list(range(len(relative))), predicted_curve=predicted_curve, measured_curve=relative,
            y_label="||X_t - 1 x*|| / ||X_0 - 1 x*||",
        )


@register_result
class D2ExactConvergence(_ExactConvergence):
    """D² converges to the exact minimizer on heterogeneous quadratics, at its companion matrix's rate."""

    number = 16
    name = "d2_exact_convergence"
    statement = (
        "f_i(x) = a_i ||x - b_i||^2/2, D2 X_(t+1) = M(2 X_t - X_(t-1) - alpha grad F(X_t) + alpha grad F(X_(t-1))) "
        "with M = (I + W)/2 (eigenvalues > -1/3): converges linearly to 1 x* (no heterogeneity bias), at the "
        "spectral radius of [[M(2I - alpha A), -M(I - alpha A)], [I, 0]] (eigenvalue 1 excluded)"
    )
    reference = (
        "Tang, Lian, Yan, Zhang & Liu 2018, arXiv:1803.07068, Alg. 1 and Thm. 1; Yuan et al. 2019, arXiv:1702.05122"
    )
    criterion = (
        f"relative error after `steps` <= {EXACT_TOL:g}, and the rate fitted where the relative error is in "
        f"[{FIT_WINDOW[1]:g}, {FIT_WINDOW[0]:g}] within {RATE_RTOL:g} (relative) of the predicted spectral radius < 1"
    )

    steps: int = integer(1500, low=10)
    lazy: bool = flag(True)

    def mixing(self, problem: HeterogeneousQuadratics) -> torch.Tensor:
        eye = torch.eye(self.world_size, dtype=DTYPE)
        return (eye + problem.w) / 2 if self.lazy else problem.w

    def iteration_matrix(self, problem: HeterogeneousQuadratics) -> torch.Tensor:
        n = self.world_size
        eye = torch.eye(n, dtype=DTYPE)
        m, a = self.mixing(problem), torch.diag(problem.curvatures)
        top = torch.cat([m @ (2 * eye - self.lr * a), -m @ (eye - self.lr * a)], dim=1)
        return torch.cat([top, torch.cat([eye, torch.zeros(n, n, dtype=DTYPE)], dim=1)])

    def iterates(self, problem: HeterogeneousQuadratics) -> Iterator[torch.Tensor]:
        m = self.mixing(problem)
        x_prev = torch.zeros_like(problem.targets)
        g_prev = problem.gradients(x_prev)
        x = m @ (x_prev - self.lr * g_prev)
        yield from (x_prev, x)
        for _ in range(self.steps - 1):
            g = problem.gradients(x)
            x, x_prev, g_prev = m @ (2 * x - x_prev - self.lr * g + self.lr * g_prev), x, g
            yield x


@register_result
class GradientTrackingExactConvergence(_ExactConvergence):
    """Gradient tracking (DIGing) converges to the exact minimizer at its iteration matrix's rate."""

    number = 16
    name = "gradient_tracking_exact_convergence"
    statement = (
        "f_i(x) = a_i ||x - b_i||^2/2, DIGing X_(t+1) = W X_t - alpha Y_t, Y_(t+1) = W Y_t + grad F(X_(t+1)) - "
        "grad F(X_t), Y_0 = grad F(X_0): converges linearly to 1 x* at the spectral radius of "
        "[[W, -alpha I], [A(W - I), W - alpha A]] (eigenvalue 1 excluded)"
    )
    reference = "Nedic, Olshevsky & Shi 2017, arXiv:1607.03218, eq. (3) and Thm. 3.14"
    criterion = D2ExactConvergence.criterion

    lr: float = positive(0.1)
    steps: int = integer(1500, low=10)

    def iteration_matrix(self, problem: HeterogeneousQuadratics) -> torch.Tensor:
        n = self.world_size
        eye = torch.eye(n, dtype=DTYPE)
        w, a = problem.w, torch.diag(problem.curvatures)
        top = torch.cat([w, -self.lr * eye], dim=1)
        return torch.cat([top, torch.cat([a @ (w - eye), w - self.lr * a], dim=1)])

    def iterates(self, problem: HeterogeneousQuadratics) -> Iterator[torch.Tensor]:
        w = problem.w
        x = torch.zeros_like(problem.targets)
        g = problem.gradients(x)
        y = g.clone()
        yield x
        for _ in range(self.steps):
            x = w @ x - self.lr * y
            g_new = problem.gradients(x)
            y, g = w @ y + g_new - g, g_new
            yield x


@register_result
class ChocoGossipConsensus(Result):
    """CHOCO-Gossip reaches consensus linearly at the rate its theorem gives for delta and the spectral gap."""

    number = 16
    name = "choco_gossip_consensus"
    statement = (
        "W symmetric doubly stochastic with spectral gap rho, beta = ||I - W||_2, compressor with "
        "E||C(x) - x||^2 <= (1 - delta)||x||^2: CHOCO-Gossip (xhat += C(x - xhat); x += gamma (W - I) xhat) with "
        "gamma = rho^2 delta / (16 rho + rho^2 + 4 beta^2 + 2 rho beta^2 - 8 rho delta) has "
        "e_t = sum_i ||x_i - xbar||^2 + ||x_i - xhat_i||^2 <= (1 - delta^2 rho / 82)^t e_0"
    )
    reference = "Koloskova, Stich & Jaggi 2019, arXiv:1902.00340, Alg. 1 and Thm. 2"
    criterion = (
        f"e_t below the bound at every round (slack {CHOCO_RTOL:g} relative), the average preserved, and the "
        "rate fitted on the last half of the rounds at most the theorem's rate"
    )

    world_size: int = integer(8, low=3)
    dim: int = integer(20)
    rounds: int = integer(1000, low=10)
    compressor: str = "topk"
    ratio: float = 0.25
    kind: str = "ring"
    consensus_lr: float | None = positive(None)

    def validate(self) -> None:
        make_compressor(self.compressor, self.ratio)
        if self.compressor not in ("topk", "sign"):
            raise ValueError("choco_gossip_consensus checks a deterministic compressor ('topk' or 'sign'), "
                             f"got {self.compressor!r}")
        topology = Topology(self.kind, self.world_size)
        w = topology.mixing_matrix(0)
        if topology.is_time_varying or not torch.equal(w, w.T):
            raise ValueError(f"{self.name} needs a static undirected topology, got {self.kind!r}")

    def problem(self, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixing matrix and the ranks' starting points ``(N, d)``."""
        start = torch.randn(self.world_size, self.dim, generator=generator(seed), dtype=DTYPE)
        return Topology(self.kind, self.world_size).mixing_matrix(0), start

    def constants(self, w: torch.Tensor) -> tuple[float, float, float, float]:
        """``(delta, rho, beta, gamma)``: compression quality, spectral gap, ``||I - W||_2``, the theorem's step."""
        delta = make_compressor(self.compressor, self.ratio).delta(self.dim)
        eigenvalues = torch.linalg.eigvalsh(w)
        rho = 1.0 - float(eigenvalues[:-1].abs().max())  # eigvalsh: ascending, the last is 1
        beta = float((1.0 - eigenvalues).abs().max())
        gamma = rho**2 * delta / (16 * rho + rho**2 + 4 * beta**2 + 2 * rho * beta**2 - 8 * rho * delta)
        return delta, rho, beta, gamma

    def predict(self, problem: tuple[torch.Tensor, torch.Tensor], k: int) -> float:
        """The theorem's per-round factor ``1 - delta^2 rho / 82``."""
        delta, rho, _, _ = self.constants(problem[0])
        return 1.0 - delta**2 * rho / 82.0

    def check(self, seed: int = 0) -> CheckOutcome:
        w, x = self.problem(seed)
        delta, rho, beta, gamma = self.constants(w)
        step = gamma if self.consensus_lr is None else self.consensus_lr
        rate = self.predict((w, x), 0)
        compressor = make_compressor(self.compressor, self.ratio)
        mean = x.mean(0)
        hat = torch.zeros_like(x)
        eye = torch.eye(self.world_size, dtype=DTYPE)

        def lyapunov(x: torch.Tensor, hat: torch.Tensor) -> float:
            return float((x - x.mean(0)).square().sum() + (x - hat).square().sum())

        errors = [lyapunov(x, hat)]
        for _ in range(self.rounds):
            hat = hat + torch.stack([compressor(row) for row in x - hat])
            x = x + step * (w - eye) @ hat
            errors.append(lyapunov(x, hat))
        bound = [errors[0] * rate**t for t in range(len(errors))]
        violations = bound_violations(errors, bound, CHOCO_RTOL)
        fitted = tail_rate(errors, len(errors) // 2)
        drift = float((x.mean(0) - mean).abs().max())
        holds = violations == 0 and drift <= 1e-10 * (1 + float(mean.abs().max())) and fitted <= rate
        return CheckOutcome(
            predicted=rate, measured=fitted, holds=holds, name=self.name,
            quantity="per-round contraction of e_t",
            details=(f"N={self.world_size} {self.kind}, d={self.dim}, {self.compressor} (delta={delta:.3g}), "
                     f"rho={rho:.4f}, beta={beta:.4f}, gamma={step:.3g}: {violations} rounds above the bound, "
                     f"fitted rate {fitted:.6f} vs the theorem's {rate:.6f}, average drift {drift:.1e}"),
            steps=list(range(len(errors))), predicted_curve=bound, measured_curve=errors, x_label="round",
            y_label="e_t",
        )
