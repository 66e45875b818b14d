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

The tridiagonal is diagonalized with ``torch.linalg.eigh`` (PyHessian's ``density()`` calls
``torch.eig``, removed from torch, and fails). The recurrence runs in float64 and every Lanczos vector is
reorthogonalized against all previous ones, stored in float64 for float64 operators (twice, to working
precision) and in float32 for float32 operators (once: products carry float32 roundoff anyway, and the
basis traffic dominates the cost on models with millions of parameters).

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

from lightning_optsurvey.curvature.lanczos import LinearOperator, _apply, _operator_info, _positive_int

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["SpectralDensity", "lanczos_tridiagonal", "spectral_density"]

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
            ValueError: If ``sigma`` is not positive.
        """
        sigma = self.default_sigma() if sigma is None else sigma
        if not isinstance(sigma, int | float) or not sigma > 0:
            raise ValueError(f"sigma must be a positive number, got {sigma!r}")
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


def lanczos_tridiagonal(
    op: LinearOperator, v: Tensor, num_steps: int, basis_dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor, int]:
    """Run ``num_steps`` Lanczos steps from ``v`` with full reorthogonalization.

    The recurrence is float64; the stored basis is ``basis_dtype`` (float32 halves the memory traffic of
    reorthogonalizing against it, which dominates on models with millions of parameters, and keeps
    orthogonality at float32 roundoff, enough for quadrature nodes and weights).

    Returns:
        ``(alpha, beta, steps)``: the diagonal (``steps``) and off-diagonal (``steps - 1``) of the
        tridiagonal on the host, and the number of steps (and products) actually taken; fewer than
        ``num_steps`` when the Krylov space is invariant.
    """
    n = v.shape[0]
    steps = min(num_steps, n)
    basis = torch.empty(steps, n, dtype=basis_dtype, device=v.device)
    q = v / v.norm()
    basis[0] = q
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    taken = 0
    for j in range(steps):
        w = _apply(op, q)
        taken += 1
        alpha = q @ w
        alphas.append(alpha)
        w = w - alpha * q - (betas[-1] * basis[j - 1].to(torch.float64) if betas else 0.0)
        active = basis[: j + 1]
        for _ in range(2 if basis_dtype == torch.float64 else 1):
            w = w - (active.T @ (active @ w.to(basis_dtype))).to(torch.float64)
        if j + 1 == steps:
            break
        beta = w.norm()
        scale = max(float(torch.stack(alphas).abs().max()), float(betas[-1]) if betas else 0.0, _EPS)
        if float(beta) <= 8 * _EPS * scale * math.sqrt(j + 1):
            break  # invariant subspace: the quadrature is exact with the nodes so far
        betas.append(beta)
        q = w / beta
        basis[j + 1] = q
    off_diagonal = torch.stack(betas).cpu() if betas else torch.zeros(0, dtype=torch.float64)
    return torch.stack(alphas).cpu(), off_diagonal, taken


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
        ValueError: If ``num_probes`` or ``num_steps`` is not a positive integer.
    """
    n, device = _operator_info(op)
    _positive_int("num_probes", num_probes)
    _positive_int("num_steps", num_steps)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    width = min(num_steps, n)
    op_dtype = getattr(op, "dtype", torch.float64)
    basis_dtype = torch.float32 if op_dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float64
    nodes = torch.zeros(num_probes, width, dtype=torch.float64)
    weights = torch.zeros(num_probes, width, dtype=torch.float64)
    total = 0
    for p in range(num_probes):
        v = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int8).to(torch.float64) * 2 - 1
        alpha, beta, steps = lanczos_tridiagonal(op, v.to(device) / math.sqrt(n), width, basis_dtype)
        total += steps
        tri = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
        theta, s = torch.linalg.eigh(tri)
        nodes[p, :steps] = theta
        weights[p, :steps] = s[0] ** 2
        if steps < width:
            nodes[p, steps:] = theta[-1]  # padding; weight 0
    return SpectralDensity(nodes, weights, total, n)
