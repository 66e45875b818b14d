"""Decentralized averaging and D-PSGD on known graphs: results 14-16 of the survey's list.

The graphs and their weights come from :class:`~lightning_optsurvey.strategies.Topology`, the object
``GossipStrategy`` mixes with: its rank ``i`` combines ``x_i <- sum_j W_ij x_j`` with row ``i`` of
``Topology.mixing_matrix(step)``, after its optimizer step (adapt then combine). The checks apply the
same matrices to all ranks at once, ``X <- W X``, on rows stacked in one tensor: the arithmetic of a
gossip round without the processes. Spectral quantities are recomputed here from the eigenvalues of
``W`` (``torch.linalg.eigvals``), independently of ``Topology.spectral_gap``, and the two are compared.
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch

from lightning_optsurvey.averaging import Topology
from lightning_optsurvey.theory._run import run_optimizer
from lightning_optsurvey.theory.decisions import MC_Z, bound_violations, loglog_slope, mean_and_stderr, tail_rate
from lightning_optsurvey.theory.fields import flag, integer, integers, positive, real
from lightning_optsurvey.theory.problems import DTYPE, WavyFunction, generator
from lightning_optsurvey.theory.result import CheckOutcome, Result, register_result

__all__ = [
    "DPSGDConsensus",
    "DPSGDLinearSpeedup",
    "GossipConsensus",
    "OnePeerExactAveraging",
    "second_eigenvalue_modulus",
]

#: Relative slack on the contraction bound (round-off of the matrix products).
BOUND_RTOL = 1e-9
#: Absolute slack on the contraction bound, as a fraction of ||X_0||_F: each product rounds the state,
#: mean included, at ~eps ||X||, and that error need not contract (seen up to 4e-17 where the bound is
#: an equality, e.g. on 4 nodes).
ROUNDOFF_ATOL = 1e-15
#: Each graph is run until its bound falls to this fraction of the initial error (round-off beyond).
CONTRACTION_FLOOR = 1e-12
#: Two-sided relative band on the fitted consensus contraction against |lambda_2|.
RATE_RTOL = 1e-2
#: Relative consensus error that counts as exact averaging (float64 round-off over a few rounds).
EXACT_TOL = 1e-13
#: Agreement required between Topology.spectral_gap and the gap recomputed from the eigenvalues.
GAP_ATOL = 1e-10
#: Allowed distance between the measured exponent in N of D-PSGD's average squared gradient and the bound's.
SPEEDUP_EXPONENT_ATOL = 0.15


def second_eigenvalue_modulus(matrix: torch.Tensor) -> float:
    """``|lambda_2|``: the second largest eigenvalue modulus (the largest is 1 for a stochastic matrix)."""
    moduli = torch.linalg.eigvals(matrix).abs().sort(descending=True).values
    return float(moduli[1]) if moduli.numel() > 1 else 0.0


def _static_topologies(kinds: tuple[str, ...], world_size: int, result: str) -> dict[str, Topology]:
    """The graphs named by ``kinds`` on ``world_size`` ranks, refusing time-varying ones (one ``W`` each).

    Raises:
        ValueError: If ``kinds`` is empty, a kind is unknown or impossible at this size (from
            :class:`Topology`), or time-varying.
    """
    if not kinds:
        raise ValueError(f"{result}: kinds must name at least one static topology")
    topologies = {kind: Topology(kind, world_size) for kind in kinds}
    for kind, topology in topologies.items():
        if topology.is_time_varying:
            raise ValueError(f"{result} needs static graphs; {kind!r} is time-varying")
    return topologies


def _consensus_error(x: torch.Tensor) -> torch.Tensor:
    """``||X - 1 xbar^T||_F`` over the rank axis (-2)."""
    return torch.linalg.vector_norm(x - x.mean(-2, keepdim=True), dim=(-2, -1))


@register_result
class GossipConsensus(Result):
    """Gossip averaging contracts the disagreement by |lambda_2(W)| per round."""

    number = 14
    name = "gossip_consensus"
    statement = (
        "W doubly stochastic and normal (symmetric, or circulant), x_(k+1) = W x_k: "
        "||x_k - 1 xbar|| <= |lambda_2(W)|^k ||x_0 - 1 xbar||, on the ring, torus and exponential graphs"
    )
    reference = (
        "Xiao & Boyd 2004, Fast linear iterations for distributed averaging, Sec. 2; "
        "Boyd, Ghosh, Prabhakar & Shah 2006, Randomized gossip algorithms"
    )
    criterion = (
        f"bound at every round for each graph (slack {BOUND_RTOL:g} relative, {ROUNDOFF_ATOL:g} ||X_0|| absolute) "
        f"until it reaches {CONTRACTION_FLOOR:g} "
        f"(round-off below), the consensus contraction fitted on the last half of those rounds within "
        f"{RATE_RTOL:g} (relative) of |lambda_2|; Topology.spectral_gap equal to "
        f"1 - |lambda_2| within {GAP_ATOL:g}"
    )

    world_size: int = integer(16, low=4)
    rounds: int = integer(150, low=10)
    dim: int = integer(3)
    kinds: tuple[str, ...] = ("ring", "torus", "exponential")

    def validate(self) -> None:
        for kind, topology in self.problem().items():
            if second_eigenvalue_modulus(topology.mixing_matrix(0)) <= CONTRACTION_FLOOR:
                raise ValueError(
                    f"gossip_consensus fits a contraction rate; {kind!r} on {self.world_size} ranks has "
                    "|lambda_2| = 0 (exact averaging in one round)"
                )

    def problem(self, seed: int = 0) -> dict[str, Topology]:
        return _static_topologies(self.kinds, self.world_size, self.name)

    def predict(self, problem: dict[str, Topology], k: int) -> float:
        """The bound's factor ``|lambda_2|^k`` of the slowest graph."""
        return max(second_eigenvalue_modulus(t.mixing_matrix(0)) for t in problem.values()) ** k

    def check(self, seed: int = 0) -> CheckOutcome:
        topologies = self.problem(seed)
        x0 = torch.randn(self.world_size, self.dim, generator=generator(seed), dtype=DTYPE)
        ks = list(range(self.rounds + 1))
        holds, lines, curves, first = True, [], {}, None
        for kind, topology in topologies.items():
            w = topology.mixing_matrix(0)
            lam2 = second_eigenvalue_modulus(w)
            rounds = min(self.rounds, math.ceil(math.log(CONTRACTION_FLOOR) / math.log(lam2)))
            x, errors = x0.clone(), [float(_consensus_error(x0))]
            for _ in range(self.rounds):
                x = w @ x
                errors.append(float(_consensus_error(x)))
            bound = [errors[0] * lam2**k for k in ks]
            violations = bound_violations(
                errors[: rounds + 1], bound[: rounds + 1], BOUND_RTOL, ROUNDOFF_ATOL * float(x0.norm())
            )
            rate = tail_rate(errors, rounds // 2, rounds + 1)
            gap_ok = abs(topology.spectral_gap() - (1.0 - lam2)) <= GAP_ATOL
            ok = violations == 0 and abs(rate - lam2) <= RATE_RTOL * lam2 and gap_ok
            holds = holds and ok
            lines.append(
                f"{kind}: |lambda_2|={lam2:.4f}, fitted {rate:.4f} over {rounds} rounds, violations {violations}"
            )
            curves[f"{kind} measured"] = errors
            if first is None:
                first = (lam2, rate, bound, errors, kind)
        lam2, rate, bound, errors, kind = first
        return CheckOutcome(
            predicted=lam2, measured=rate, holds=holds, name=self.name,
            quantity=f"consensus contraction per round on the {kind} (N={self.world_size})",
            details="; ".join(lines), steps=ks, predicted_curve=bound, measured_curve=errors,
            extra_curves={k: tuple(v) for k, v in curves.items() if not k.startswith(kind)},
            x_label="round", y_label="||x_k - 1 xbar||",
        )


@register_result
class OnePeerExactAveraging(Result):
    """The one-peer exponential graph averages exactly in log2(N) rounds."""

    number = 15
    name = "one_peer_exact_averaging"
    statement = (
        "N a power of 2, one-peer exponential graph (round t: i sends to i + 2^(t mod log2 N), weights 1/2): "
        "W^(log2 N - 1) ... W^(0) = 11^T/N, so gossip reaches the exact average after log2(N) rounds"
    )
    reference = "Ying, Yuan, Chen, Hu, Pan & Yin 2021, arXiv:2110.13363 (one-peer exponential graphs)"
    criterion = (
        f"relative consensus error after log2(N) rounds <= {EXACT_TOL:g} for N in 4..32, and > 1e-3 one round "
        "earlier (not exact before); the static exponential graph is shown for contrast"
    )

    sizes: tuple[int, ...] = integers((4, 8, 16, 32), low=2)
    dim: int = integer(3)

    def problem(self, seed: int = 0) -> dict[int, Topology]:
        return {n: Topology("one_peer_exponential", n) for n in self.sizes}

    def predict(self, problem: dict[int, Topology], k: int) -> float:
        """Rounds to exact averaging for world size ``k``: ``log2 k`` when ``k`` is a power of two, else inf."""
        return float(math.log2(k)) if k & (k - 1) == 0 else math.inf

    def check(self, seed: int = 0) -> CheckOutcome:
        gen = generator(seed)
        holds, lines, measured, predicted, static = True, [], [], [], []
        for n, topology in self.problem(seed).items():
            x0 = torch.randn(n, self.dim, generator=gen, dtype=DTYPE)
            start = float(_consensus_error(x0))
            rounds = topology.period  # ceil(log2 N): log2 N exactly when N is a power of two
            x, errors = x0.clone(), []
            for t in range(rounds):
                x = topology.mixing_matrix(t) @ x
                errors.append(float(_consensus_error(x)) / start)
            fixed = Topology("exponential", n).mixing_matrix(0)
            y = x0.clone()
            for _ in range(rounds):
                y = fixed @ y
            static_error = float(_consensus_error(y)) / start
            before = errors[-2] if len(errors) > 1 else 1.0
            ok = n & (n - 1) == 0 and errors[-1] <= EXACT_TOL and before > 1e-3
            holds = holds and ok
            measured.append(errors[-1])
            predicted.append(0.0)
            static.append(static_error)
            lines.append(f"N={n}: after {rounds} rounds {errors[-1]:.1e} (one earlier {before:.2g}; static "
                         f"exponential {static_error:.2g})")
        return CheckOutcome(
            predicted=0.0, measured=max(measured), holds=holds, name=self.name,
            quantity="largest relative consensus error after log2(N) rounds",
            details="; ".join(lines), steps=list(self.sizes), predicted_curve=predicted,
            measured_curve=measured, extra_curves={"static exponential graph": tuple(static)},
            x_label="N", y_label="relative consensus error after log2 N rounds", log_x=True, log_y=False,
        )


@register_result
class DPSGDConsensus(Result):
    """D-PSGD's consensus distance grows as the spectral gap shrinks."""

    number = 16
    name = "dpsgd_consensus_gap"
    statement = (
        "D-PSGD (local SGD step, then gossip with W) with step eta on f_i(x) = ||x - b_i||^2/2 + noise of "
        "variance sigma^2, heterogeneity zeta^2: stationary consensus distance "
        "(1/N) E||X - 1 xbar||^2 <= eta^2 sigma^2 / p + eta^2 zeta^2 / p^2, p = 1 - |lambda_2| the spectral gap"
    )
    reference = (
        "Lian et al. 2017, arXiv:1705.09056, Thm. 1 (1/(1 - rho) consensus term); Koloskova et al. 2020, "
        "arXiv:2003.10422 (consensus terms sigma^2/p and zeta^2/p^2)"
    )
    criterion = (
        f"for each graph, the measured consensus distance (mean over the last half and over runs) within "
        f"{MC_Z:g} standard errors of its exact stationary value on these quadratics, "
        "(a Stein equation for the noise and a linear solve for the heterogeneity), that value below the "
        "bound, and the distance decreasing as the gap grows"
    )

    world_size: int = integer(16, low=4)
    dim: int = integer(2)
    runs: int = integer(100, low=10)
    steps: int = integer(200, low=20)
    lr: float = real(0.1, low=0.0, high=1.0, low_open=True, high_open=True)  # 1 - lr: a contraction
    sigma2: float = real(1.0, low=0.0)
    kinds: tuple[str, ...] = ("ring", "torus", "exponential", "complete")

    def validate(self) -> None:
        _static_topologies(self.kinds, self.world_size, self.name)

    def problem(self, seed: int = 0) -> tuple[dict[str, Topology], torch.Tensor]:
        targets = torch.randn(self.world_size, self.dim, generator=generator(seed), dtype=DTYPE)
        return _static_topologies(self.kinds, self.world_size, self.name), targets

    def exact(self, w: torch.Tensor, targets: torch.Tensor) -> float:
        """Exact stationary consensus distance of D-PSGD (adapt then combine) on these quadratics.

        With ``P = I - 11^T/N`` (``W`` commutes with it), the disagreement ``E = P X`` follows
        ``E <- W((1 - eta) E + eta P B - eta P Xi)``: its mean converges to the solution of
        ``(I - (1 - eta) W) E = eta W P B`` and its per-coordinate covariance to the solution of the
        Stein equation ``C = (1 - eta)^2 W C W^T + eta^2 (sigma^2/d) W P W^T``, solved here as a linear
        system in ``vec(C)``. The distance is ``(d tr C + ||E||_F^2) / N``.
        """
        n, eta = self.world_size, self.lr
        eye = torch.eye(n, dtype=DTYPE)
        projector = eye - torch.full((n, n), 1.0 / n, dtype=DTYPE)
        mean = torch.linalg.solve(eye - (1.0 - eta) * w, eta * w @ projector @ targets)
        source = eta**2 * (self.sigma2 / self.dim) * w @ projector @ w.T
        system = torch.eye(n * n, dtype=DTYPE) - (1.0 - eta) ** 2 * torch.kron(w, w)
        covariance = torch.linalg.solve(system, source.reshape(-1)).reshape(n, n)
        return (self.dim * float(torch.trace(covariance)) + float(mean.square().sum())) / n

    def predict(self, problem: tuple[dict[str, Topology], torch.Tensor], k: int) -> float:
        """The bound for the graph of index ``k`` in ``kinds``."""
        topologies, targets = problem
        gap = 1.0 - second_eigenvalue_modulus(topologies[self.kinds[k]].mixing_matrix(0))
        zeta2 = float((targets - targets.mean(0)).square().sum(1).mean())
        return self.lr**2 * self.sigma2 / gap + self.lr**2 * zeta2 / gap**2

    def check(self, seed: int = 0) -> CheckOutcome:
        topologies, targets = self.problem(seed)
        gen = generator(seed + 1)
        noise_scale = math.sqrt(self.sigma2 / self.dim)
        rows = []
        for index, (kind, topology) in enumerate(topologies.items()):
            w = topology.mixing_matrix(0)
            gap = 1.0 - second_eigenvalue_modulus(w)

            def gradient(x: torch.Tensor, k: int) -> torch.Tensor:
                return x - targets + noise_scale * torch.randn(x.shape, generator=gen, dtype=DTYPE)

            def gossip(x: torch.Tensor, w: torch.Tensor = w) -> torch.Tensor:
                return torch.einsum("ij,rjd->rid", w, x)

            distances, _ = run_optimizer(
                "sgd", torch.zeros(self.runs, self.world_size, self.dim, dtype=DTYPE), gradient, self.steps,
                project=gossip, record=lambda x: _consensus_error(x).square() / self.world_size, lr=self.lr,
            )
            mean, err = map(float, mean_and_stderr(distances[self.steps // 2 :].mean(0)))
            exact = self.exact(w, targets)
            bound = self.predict((topologies, targets), index)
            ok = abs(mean - exact) <= MC_Z * err + 1e-12 and exact <= bound
            rows.append((gap, kind, mean, err, exact, bound, ok))
        rows.sort(key=lambda r: r[0])
        monotone = all(a[4] >= b[4] for a, b in pairwise(rows) if b[0] - a[0] > GAP_ATOL)
        holds = monotone and all(r[6] for r in rows)
        details = "; ".join(
            f"{kind}: gap {gap:.3f}, measured {mean:.4g} +- {err:.1g}, exact {exact:.4g}, bound {bound:.3g}"
            for gap, kind, mean, err, exact, bound, _ in rows
        )
        return CheckOutcome(
            predicted=rows[0][4], measured=rows[0][2], holds=holds, name=self.name,
            quantity=f"stationary consensus distance on the {rows[0][1]} (smallest gap)",
            details=f"eta={self.lr:g}, sigma^2={self.sigma2:g}, N={self.world_size}, {self.runs} runs; " + details,
            steps=[1.0 / r[0] for r in rows], predicted_curve=[r[4] for r in rows],
            measured_curve=[r[2] for r in rows], extra_curves={"bound": tuple(r[5] for r in rows)},
            x_label="1 / spectral gap", y_label="(1/N) E||X - 1 xbar||^2", log_x=True,
        )


@register_result
class DPSGDLinearSpeedup(Result):
    """D-PSGD's non-convex rate: O(1/sqrt(NK)), a linear speedup in the number of nodes N."""

    number = 31
    name = "dpsgd_linear_speedup"
    statement = (
        "f L-smooth (non-convex), every node sees unbiased gradients of variance sigma^2, W doubly stochastic and "
        "connected, step gamma = 1/(2L + sigma sqrt(K/N)): for K past a transient that depends on the spectral "
        "gap, (1/K) sum_k E||grad f(xbar_k)||^2 <= 8 (f(x_0) - f*) L / K + (8 (f(x_0) - f*) + 4L) sigma / "
        "sqrt(K N), so N nodes need N times fewer iterations"
    )
    reference = "Lian, Zhang, Zhang, Hsieh, Zhang & Liu 2017, arXiv:1705.09056, Thm. 1 and Cor. 2"
    criterion = (
        f"for N in the list (ring graphs from Topology), the Monte-Carlo mean below Cor. 2's bound ({MC_Z:g} standard "
        f"errors allowance), and its log-log slope against N within {SPEEDUP_EXPONENT_ATOL:g} of the bound's (about "
        "-1/2); f = sum_j x_j^2/2 + cos(2 x_j) (L = 5), nodes simulated as rows of one parameter stepping with the "
        "registry's 'sgd', then mixed by W (adapt then combine, as GossipStrategy)"
    )

    dim: int = integer(2)
    runs: int = integer(60, low=10)
    iterations: int = integer(600, low=10)
    sizes: tuple[int, ...] = integers((1, 2, 4, 8), min_length=2)
    sigma: float = positive(5.0)
    gossip: bool = flag(True)
    scaled: bool = flag(True)

    def problem(self, seed: int = 0) -> tuple[WavyFunction, torch.Tensor]:
        return WavyFunction(self.dim, 1.0, 2.0), 3.0 * torch.randn(self.dim, generator=generator(seed), dtype=DTYPE)

    def mixing(self, n: int) -> torch.Tensor:
        """The ring's ``W`` (a single node keeps its value); the identity when ``gossip`` is off."""
        if n == 1 or not self.gossip:
            return torch.eye(n, dtype=DTYPE)
        return Topology("ring", n).mixing_matrix(0)

    def predict(self, problem: tuple[WavyFunction, torch.Tensor], k: int) -> float:
        """Cor. 2's bound for ``N = k`` nodes after ``iterations`` steps."""
        f, start = problem
        gap = float(f.value(start)) - f.infimum
        total = self.iterations
        return 8 * gap * f.L / total + (8 * gap + 4 * f.L) * self.sigma / math.sqrt(total * k)

    def check(self, seed: int = 0) -> CheckOutcome:
        problem = self.problem(seed)
        f, start = problem
        gen = generator(seed + 1)
        noise = self.sigma / math.sqrt(self.dim)
        measured, bounds, lines, ok = [], [], [], True
        for n in self.sizes:
            w = self.mixing(n)
            lr = 1.0 / (2 * f.L + self.sigma * math.sqrt(self.iterations / (n if self.scaled else 1)))

            def gradient(x: torch.Tensor, k: int) -> torch.Tensor:
                return f.gradient(x) + noise * torch.randn(x.shape, generator=gen, dtype=DTYPE)

            def gossip(x: torch.Tensor, w: torch.Tensor = w) -> torch.Tensor:
                return torch.einsum("ij,rjd->rid", w, x)

            norms, _ = run_optimizer(
                "sgd", start.expand(self.runs, n, self.dim), gradient, self.iterations, project=gossip,
                record=lambda x: f.gradient(x.mean(-2)).square().sum(-1), lr=lr,
            )
            mean, err = map(float, mean_and_stderr(norms[:-1].mean(0)))
            bound = self.predict(problem, n)
            ok = ok and mean - MC_Z * err <= bound
            gap = 1.0 - second_eigenvalue_modulus(w) if n > 1 else 1.0
            measured.append(mean)
            bounds.append(bound)
            lines.append(f"N={n} (gap {gap:.3f}, gamma {lr:.4f}): {mean:.4g} +- {err:.1g} <= {bound:.4g}")
        slope = loglog_slope(list(self.sizes), measured)
        predicted_slope = loglog_slope(list(self.sizes), bounds)
        holds = ok and abs(slope - predicted_slope) <= SPEEDUP_EXPONENT_ATOL
        return CheckOutcome(
            predicted=predicted_slope, measured=slope, holds=holds, name=self.name,
            quantity=f"log-log slope of (1/K) sum_k E||grad f(xbar_k)||^2 against N (K={self.iterations})",
            details=f"L={f.L:g}, sigma={self.sigma:g}, {self.runs} runs{'' if self.gossip else ', no gossip (W = I)'}; "
            + "; ".join(lines),
            steps=list(self.sizes), predicted_curve=bounds, measured_curve=measured, x_label="N (nodes)",
            y_label="(1/K) sum_k E||grad f(xbar_k)||^2", log_x=True,
        )
