r"""Asynchronous EASGD's stability on a quadratic (round-robin scheme), against synchronous EASGD's.

Zhang, Choromanska & LeCun (2015, Section 4) analyse asynchronous EASGD in the round-robin scheme on
the one-dimensional quadratic :math:`f(x) = \frac h2 x^2`: :math:`p` workers take turns, one exchange with
the master per time step, every worker taking a gradient step. With the exchange of their Algorithm 1
(:math:`e = \alpha(x_i - \tilde x)`, :math:`x_i \leftarrow x_i - e`, :math:`\tilde x \leftarrow \tilde x + e`,
then :math:`x_i \leftarrow x_i - \eta h x_i`), the method is stable whenever :math:`0 < \eta h < 2` and
:math:`0 < \alpha < 1`, for every :math:`p`; synchronous EASGD, in which all :math:`p` workers pull the
center at once, needs in addition :math:`(p+1)\alpha < 2` (and the Jury conditions of
:func:`~lightning_optsurvey.strategies.easgd.easgd_is_stable`), so the asynchronous scheme is stable
where the synchronous one diverges.

The check runs the exchange of the asynchronous strategies' center
(:meth:`~lightning_optsurvey.averaging.center.CenterState.exchange`, the code rank 0's server
runs) in the round-robin order, every grid value of :math:`\eta h` in one buffer, and compares the
per-step growth rate of :math:`\lVert(x_1, \dots, x_p, \tilde x)\rVert` with the spectral radius of the
exact period map (:func:`round_robin_easgd_matrix`), per step.
"""

from __future__ import annotations

import math

import torch

from lightning_optsurvey.averaging.center import CenterState
from lightning_optsurvey.averaging.elastic import easgd_is_stable
from lightning_optsurvey.theory.centralized import ElasticGrid
from lightning_optsurvey.theory.decisions import tail_rate
from lightning_optsurvey.theory.fields import integer, positive, positives
from lightning_optsurvey.theory.problems import DTYPE
from lightning_optsurvey.theory.result import CheckOutcome, Result, register_result

__all__ = ["AsyncEASGDStability", "round_robin_easgd_matrix", "round_robin_spectral_radius"]

#: Grid points whose predicted per-step radius is within this distance of 1 are not classified.
STABILITY_MARGIN = 0.02
#: Relative band on the fitted per-step growth rate against the predicted per-step radius.
RATE_RTOL = 0.05


def round_robin_easgd_matrix(eta_h: float, alpha: float, workers: int) -> torch.Tensor:
    r"""Map of one round (``workers`` time steps) of round-robin asynchronous EASGD on :math:`\frac h2 x^2`.

    State :math:`(x_1, \dots, x_p, \tilde x)`. At time step :math:`t` worker :math:`i = t \bmod p` exchanges
    with the center (Algorithm 1 of the paper), then every worker takes its gradient step.

    Raises:
        ValueError: If ``workers < 1``.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    n = workers
    gradient = torch.eye(n + 1, dtype=DTYPE)
    gradient[range(n), range(n)] = 1.0 - eta_h
    period = torch.eye(n + 1, dtype=DTYPE)
    for i in range(n):
        exchange = torch.eye(n + 1, dtype=DTYPE)
        exchange[i, i], exchange[i, n], exchange[n, n], exchange[n, i] = 1 - alpha, alpha, 1 - alpha, alpha
        period = gradient @ exchange @ period
    return period


def round_robin_spectral_radius(eta_h: float, alpha: float, workers: int) -> float:
    """Per-time-step spectral radius: ``rho(round map) ** (1 / workers)``."""
    radius = float(torch.linalg.eigvals(round_robin_easgd_matrix(eta_h, alpha, workers)).abs().max())
    return radius ** (1.0 / workers)


@register_result
class AsyncEASGDStability(ElasticGrid, Result):
    """Round-robin asynchronous EASGD is stable for 0 < eta h < 2 and 0 < alpha < 1, unlike synchronous EASGD."""

    number = 18
    name = "easgd_async_stability"
    statement = (
        "asynchronous EASGD in the round-robin scheme on f = h x^2/2 with p workers (one exchange "
        "e = alpha (x_i - c) per time step, x_i <- x_i - e, c <- c + e, then gradient steps) is stable for "
        "0 < eta h < 2 and 0 < alpha < 1, for every p, including where synchronous EASGD ((p + 1) alpha >= 2) "
        "diverges"
    )
    reference = (
        "Zhang, Choromanska & LeCun 2015, arXiv:1412.6651, Section 4 (stability of EASGD in the round-robin "
        "scheme, quadratic case)"
    )
    criterion = (
        "over a grid of (eta h, alpha), the per-step growth rate of ||(x_1..x_p, c)|| fitted on the last half of "
        "the rounds of the center server's exchange (CenterState.exchange) within "
        f"{RATE_RTOL:g} (relative) of the closed-form per-step spectral radius of the round map (points within "
        f"{STABILITY_MARGIN:g} of 1 not classified), and every grid point converging"
    )

    workers: int = integer(4)
    alphas: tuple[float, ...] = positives((0.1, 0.45, 0.9))
    eta_h_max: float = positive(1.95)
    grid: int = integer(20, low=2)
    rounds: int = integer(60, low=10)

    def spectral_radius(self, eta_h: float, alpha: float) -> float:
        """Per-step spectral radius of the round map (see :func:`round_robin_spectral_radius`)."""
        return round_robin_spectral_radius(eta_h, alpha, self.workers)

    def _simulate(self, start: torch.Tensor, alpha: float) -> torch.Tensor:
        """Norms of the state at the start of every round, ``(rounds + 1, grid)``."""
        eta_h = self._eta_h()
        p = self.workers
        workers = [start[i].clone() for i in range(p)]
        center = CenterState([start[p]], [[self.grid]], world_size=p)
        norms = []
        for _ in range(self.rounds):
            norms.append(torch.linalg.vector_norm(torch.stack([*workers, center.buffers[0]]), dim=0))
            for i in range(p):
                (move,), _, _ = center.exchange(i, [workers[i]], [alpha])
                workers[i] = workers[i] - move
                workers = [x - eta_h * x for x in workers]
        norms.append(torch.linalg.vector_norm(torch.stack([*workers, center.buffers[0]]), dim=0))
        return torch.stack(norms)

    def check(self, seed: int = 0) -> CheckOutcome:
        start = self.problem(seed)
        eta_h = self._eta_h().tolist()

        def sweep(alpha: float) -> tuple[list[float], list[float], bool, str]:
            history = self._simulate(start, alpha)
            rates, radii, mismatches, diverged, sync_unstable = [], [], 0, 0, 0
            for j, value in enumerate(eta_h):
                radius = self.spectral_radius(value, alpha)
                per_round = tail_rate(history[:, j].tolist(), self.rounds // 2)
                rate = per_round ** (1.0 / self.workers) if math.isfinite(per_round) else per_round
                rates.append(rate)
                radii.append(radius)
                classified = abs(radius - 1.0) > STABILITY_MARGIN
                if classified and not abs(rate - radius) <= RATE_RTOL * radius:
                    mismatches += 1
                if not rate < 1.0:
                    diverged += 1
                if not easgd_is_stable(value, alpha, self.workers):
                    sync_unstable += 1
            return rates, radii, mismatches == 0 and diverged == 0, (
                f"{mismatches} rate mismatches, {diverged} points not converging, "
                f"{sync_unstable} points where synchronous EASGD diverges"
            )

        return self.sweep_outcome(
            sweep, "largest per-step growth rate",
            f"p={self.workers}, {self.grid} values of eta h, {self.rounds} rounds",
            "per-step growth rate of ||(x_1..x_p, c)||",
        )
