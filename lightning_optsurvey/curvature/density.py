r"""Spectral density of the Hessian by stochastic Lanczos quadrature (SLQ).

For a unit probe :math:`v`, ``num_steps`` Lanczos steps give a tridiagonal :math:`T` with eigenpairs
:math:`(\theta_i, s_i)`; Gauss quadrature with nodes :math:`\theta_i` and weights
:math:`\tau_i = (e_1^\top s_i)^2` integrates :math:`v^\top f(H) v` exactly for polynomials of degree
below :math:`2 \cdot \mathrm{num\_steps}`. Averaging over probes with
:math:`\mathbb{E}[vv^\top] = I/n` estimates the spectral density

.. math::

    \phi_\sigma(t) = \frac1n \sum_{j=1}^n g_\sigma(t - \lambda_j)
        \approx \frac{1}{P}\sum_{p=1}^{P}\sum_i \tau_{p,i}\, g_\sigma(t - \theta_{p,i}),

with a Gaussian kernel :math:`g_\sigma`. In particular :math:`\sum_i \tau_i \theta_i^k = v^\top H^k v`
(exactly, for ``k < 2 num_steps``), so the density's moments estimate :math:`\operatorname{tr}(H^k)/n`
without bias.

The steps are :func:`~lightning_optsurvey.curvature.lanczos.lanczos_step`, the three-term step of
:func:`~lightning_optsurvey.curvature.lanczos` itself: vectors in the operator's working dtype (float32
for float32 operators, float64 for float64 ones), updated in place, each reorthogonalized against all
previous ones to working precision, with only the small projected matrix :math:`T = Q^\top H Q` in
float64 on the host. A float64 recurrence on float32 products buys no accuracy: the nodes and weights are
limited by the products' roundoff (about 1e-7 relatively), far below what a density smoothed over 1 % of
the spectrum resolves. :math:`T` is diagonalized with ``torch.linalg.eigh`` (PyHessian's ``density()``
calls ``torch.eig``, removed from torch, and fails).

Why our own: PyHessian's implementation no longer runs on current torch and keeps no record of nodes
and weights that could be saved and re-plotted.

References:
    Ghorbani, Krishnan & Xiao, "An investigation into neural net optimization via Hessian eigenvalue
    density", ICML 2019, arXiv:1901.10159.
    Lin, Saad & Yang, "Approximating spectral densities of large matrices", SIAM Review 2016,
    arXiv:1308.5467.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_optsurvey.curvature.lanczos import lanczos_step
from lightning_optsurvey.curvature.linear import LinearOperator, apply, operator_info, working_dtype
from lightning_optsurvey.validation import check_float, check_int

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["SpectralDensity", "lanczos_projection", "spectral_density"]

_EPS = torch.finfo(torch.float64).eps


@dataclass(frozen=True)
class SpectralDensity:
    """Quadrature nodes and weights of a stochastic Lanczos quadrature, one row per probe.

    Attributes:
        nodes: ``(num_probes, num_steps)`` float64 Ritz values (rows shorter than ``num_steps`` after an
            early breakdown are padded with weight 0).
        weights: ``(num_probes, num_steps)`` float64 quadrature weights; each row sums to 1.
        num_matvecs: Products used.
        numel: Dimension of the operator.
    """

    nodes: Tensor
    weights: Tensor
    num_matvecs: int
    numel: int

    def moment(self, k: int) -> float:
        r"""Estimate of :math:`\operatorname{tr}(H^k)/n`: the mean over probes of :math:`\sum_i \tau_i\theta_i^k`."""
        return float((self.weights * self.nodes.pow(k)).sum(dim=1).mean())

    def default_sigma(self) -> float:
        """Kernel width: 1% of the spread of the nodes (at least a tiny positive number)."""
        live = self.nodes[self.weights > 0]
        spread = float(live.max() - live.min()) if live.numel() else 0.0
        return max(0.01 * spread, 1e-12)

    def density(self, grid: Tensor, sigma: float | None = None) -> Tensor:
        r"""The smoothed density :math:`\phi_\sigma` on ``grid`` (integrates to 1 over the real line).

        Args:
            grid: Points at which to evaluate, any shape.
            sigma: Width of the Gaussian kernel (default :meth:`default_sigma`).

        Raises:
            TypeError: If ``sigma`` is not a real number.
            ValueError: If it is not positive and finite.
        """
        sigma = self.default_sigma() if sigma is None else check_float("sigma", sigma, low=0.0, low_open=True)
        t = torch.as_tensor(grid, dtype=torch.float64)
        diff = t.reshape(-1, 1) - self.nodes.reshape(1, -1)
        kernel = torch.exp(-0.5 * (diff / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        values = kernel @ self.weights.reshape(-1) / self.nodes.shape[0]
        return values.reshape(t.shape)

    def grid(self, num_points: int = 1000, sigma: float | None = None) -> Tensor:
        """An evenly spaced grid covering every node with a margin of a few kernel widths."""
        sigma = self.default_sigma() if sigma is None else sigma
        live = self.nodes[self.weights > 0]
        low, high = float(live.min()) - 5 * sigma, float(live.max()) + 5 * sigma
        return torch.linspace(low, high, num_points, dtype=torch.float64)

    def plot(self, sigma: float | None = None, num_points: int = 1000, title: str | None = None) -> Figure:
        """A log-scale plot of the density; returns a ``matplotlib.figure.Figure`` (no pyplot state)."""
        from matplotlib.figure import Figure

        grid = self.grid(num_points, sigma)
        values = self.density(grid, sigma)
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot(1, 1, 1)
        floor = max(float(values.max()) * 1e-12, 1e-300)
        ax.semilogy(grid.numpy(), values.clamp_min(floor).numpy())
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        ax.set_title(title or f"Hessian spectral density (SLQ, {self.nodes.shape[0]} probes)")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        return fig

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable contents (``from_dict`` inverts it)."""
        return {
            "nodes": self.nodes.tolist(),
            "weights": self.weights.tolist(),
            "num_matvecs": self.num_matvecs,
            "numel": self.numel,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpectralDensity:
        """Rebuild from :meth:`to_dict`'s output."""
        return cls(
            torch.tensor(data["nodes"], dtype=torch.float64),
            torch.tensor(data["weights"], dtype=torch.float64),
            int(data["num_matvecs"]),
            int(data["numel"]),
        )


def lanczos_projection(op: LinearOperator, v: Tensor, num_steps: int) -> tuple[Tensor, int]:
    r"""Run up to ``num_steps`` Lanczos steps from ``v`` (full reorthogonalization, :func:`lanczos_step`).

    Returns:
        ``(T, steps)``: the projected matrix :math:`T = Q^\top H Q` (``steps x steps``, float64, on the host;
        tridiagonal up to roundoff) and the number of steps (and products) actually taken, fewer than
        ``num_steps`` when the Krylov space is invariant.
    """
    n = v.shape[0]
    steps = min(num_steps, n)
    basis = torch.empty(steps, n, dtype=v.dtype, device=v.device)
    torch.div(v, v.norm(), out=basis[0])
    proj = torch.zeros(steps, steps, dtype=torch.float64)
    known = torch.zeros(0, dtype=torch.float64)
    for j in range(steps):
        w = apply(op, basis[j])
        column, beta = lanczos_step(basis, j, known, w)
        proj[: j + 1, j] = column
        proj[j, : j + 1] = column
        if j + 1 == steps:
            break
        scale = max(float(proj[: j + 1, : j + 1].abs().max()), _EPS)
        if beta <= 8 * _EPS * scale * math.sqrt(j + 1):
            return proj[: j + 1, : j + 1], j + 1  # invariant subspace: the quadrature is exact already
        torch.div(w, beta, out=basis[j + 1])
        known = torch.zeros(j + 1, dtype=torch.float64)
        known[j] = beta
    return proj, steps


def spectral_density(
    op: LinearOperator,
    num_probes: int = 10,
    num_steps: int = 80,
    generator: torch.Generator | None = None,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature of the spectrum of a symmetric operator.

    Args:
        op: A symmetric operator with ``numel`` and ``op @ v``.
        num_probes: Number of random (Rademacher, normalized) start vectors.
        num_steps: Lanczos steps per probe (at most ``numel``); the quadrature is exact for polynomials
            of degree below ``2 num_steps``.
        generator: Source of the probes (default: a fresh generator seeded with 0).

    Returns:
        A :class:`SpectralDensity` with ``num_probes * num_steps`` products (fewer on breakdown).

    Raises:
        TypeError: If ``num_probes`` or ``num_steps`` is not an integer.
        ValueError: If either is not positive.
    """
    n, device = operator_info(op)
    check_int("num_probes", num_probes)
    check_int("num_steps", num_steps)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    width = min(num_steps, n)
    dtype = working_dtype(op)
    nodes = torch.zeros(num_probes, width, dtype=torch.float64)
    weights = torch.zeros(num_probes, width, dtype=torch.float64)
    total = 0
    for p in range(num_probes):
        v = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int8).to(dtype).mul_(2).sub_(1)
        tri, steps = lanczos_projection(op, v.to(device), width)
        total += steps
        theta, s = torch.linalg.eigh(tri)
        nodes[p, :steps] = theta
        weights[p, :steps] = s[0] ** 2
        if steps < width:
            nodes[p, steps:] = theta[-1]  # padding; weight 0
    return SpectralDensity(nodes, weights, total, n)
