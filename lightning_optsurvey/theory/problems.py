"""Synthetic problems whose constants are known exactly, for the theory checks.

Each problem is built in float64 from a seeded ``torch.Generator`` and carries the constants that the
theorems are stated in (``mu``, ``L``, the noise covariance, the margin, ...), computed in closed form
from how it was built rather than estimated. Functions accept a batch of points ``x`` of shape
``(..., d)`` so that many independent runs of a stochastic method can be simulated as the rows of one
parameter (the optimizers used are coordinate-wise, so rows do not interact).

Why our own: benchmark suites (e.g. ``pycutest``, ``libsvm`` data) give problems, not their exact
smoothness, strong convexity and noise constants, which the checks need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_optsurvey.validation import check_int

__all__ = [
    "DTYPE",
    "BoundedGradientFunction",
    "LeastSquaresSum",
    "LogisticRegression",
    "NoisyQuadratic",
    "PLFunction",
    "Quadratic",
    "ReddiOnline",
    "SeparableLogistic",
    "WavyFunction",
    "centred_shifts",
    "generator",
    "random_orthogonal",
]

DTYPE = torch.float64


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (checks never touch the global RNG)."""
    check_int("seed", seed, low=None)
    return torch.Generator().manual_seed(seed)


def centred_shifts(n: int, d: int, sigma2: float, gen: torch.Generator) -> Tensor:
    r"""``n`` centred Gaussian vectors in ``R^d`` rescaled so that :math:`\frac1n \sum_i \|z_i\|^2 = \sigma^2`."""
    z = torch.randn(n, d, generator=gen, dtype=DTYPE)
    z = z - z.mean(0)
    return z * math.sqrt(sigma2 / float((z * z).sum(1).mean()))


def random_orthogonal(d: int, gen: torch.Generator) -> Tensor:
    """A Haar-distributed ``d x d`` orthogonal matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DTYPE))
    return q * torch.sign(torch.diagonal(r))


@dataclass(frozen=True)
class Quadratic:
    r"""The strongly convex quadratic :math:`f(x) = \tfrac12 (x - x^*)^\top A (x - x^*)`, :math:`f^* = 0`.

    Args:
        eigenvalues: Spectrum of ``A`` (positive), shape ``(d,)``.
        basis: Orthogonal eigenvectors of ``A`` as columns, ``(d, d)``.
        minimizer: ``x*``, shape ``(d,)``.
    """

    eigenvalues: Tensor
    basis: Tensor
    minimizer: Tensor
    matrix: Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Built once, eagerly: a lazily cached tensor first computed under torch.func would escape it.
        object.__setattr__(self, "matrix", (self.basis * self.eigenvalues) @ self.basis.T)

    @classmethod
    def with_spectrum(cls, eigenvalues: Tensor, gen: torch.Generator) -> Quadratic:
        """A quadratic with the given spectrum, a random eigenbasis and a standard normal minimizer."""
        eigenvalues = torch.as_tensor(eigenvalues, dtype=DTYPE)
        if eigenvalues.ndim != 1 or bool((eigenvalues <= 0).any()):
            raise ValueError("eigenvalues must be a 1-D tensor of positive numbers")
        d = eigenvalues.numel()
        basis = random_orthogonal(d, gen)
        return cls(eigenvalues, basis, torch.randn(d, generator=gen, dtype=DTYPE))

    @property
    def dim(self) -> int:
        return self.eigenvalues.numel()

    @property
    def mu(self) -> float:
        """Strong convexity constant: the smallest eigenvalue."""
        return float(self.eigenvalues.min())

    @property
    def L(self) -> float:
        """Smoothness constant: the largest eigenvalue."""
        return float(self.eigenvalues.max())

    def value(self, x: Tensor) -> Tensor:
        """``f(x) - f*`` for a batch ``(..., d)``."""
        e = x - self.minimizer
        return 0.5 * ((e @ self.matrix) * e).sum(-1)

    def gradient(self, x: Tensor) -> Tensor:
        return (x - self.minimizer) @ self.matrix

    def distance(self, x: Tensor) -> Tensor:
        """``||x - x*||``."""
        return torch.linalg.vector_norm(x - self.minimizer, dim=-1)


@dataclass(frozen=True)
class NoisyQuadratic:
    r"""A finite sum with known gradient noise.

    :math:`f_i(x) = f(x) + z_i^\top (x - x^*)` with :math:`\sum_i z_i = 0`.

    The mean of the :math:`f_i` is the quadratic ``f``; a stochastic gradient with a uniformly drawn
    ``i`` is unbiased and its noise :math:`z_i` does not depend on ``x``: the covariance is exactly
    :math:`\Sigma = \frac1n \sum_i z_i z_i^\top` and the variance :math:`\sigma^2 = \operatorname{tr}\Sigma`
    (Bottou et al.'s constants are then ``M = sigma^2``, ``M_V = 0``, ``mu_G = mu_desc = 1``).

    Args:
        quadratic: The mean function.
        shifts: The ``z_i``, shape ``(n, d)``, centred.
    """

    quadratic: Quadratic
    shifts: Tensor
    covariance: Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "covariance", self.shifts.T @ self.shifts / self.shifts.shape[0])

    @classmethod
    def build(cls, quadratic: Quadratic, n: int, sigma2: float, gen: torch.Generator) -> NoisyQuadratic:
        """Draw ``n`` centred shifts and rescale them so that the variance is exactly ``sigma2``."""
        return cls(quadratic, centred_shifts(n, quadratic.dim, sigma2, gen))

    @property
    def sigma2(self) -> float:
        """``E||g - grad f||^2``."""
        return float((self.shifts * self.shifts).sum(1).mean())

    def stochastic_gradient(self, x: Tensor, gen: torch.Generator, batch: int = 1) -> Tensor:
        """Gradient of the mean of ``batch`` uniformly drawn ``f_i`` (with replacement), one draw per row of ``x``."""
        rows = x.shape[:-1]
        idx = torch.randint(self.shifts.shape[0], (*rows, batch), generator=gen)
        return self.quadratic.gradient(x) + self.shifts[idx].mean(-2)


@dataclass(frozen=True)
class LeastSquaresSum:
    r"""A regularized least-squares finite sum :math:`f(x) = \frac1n \sum_i f_i(x)`.

    :math:`f_i(x) = \tfrac12 (a_i^\top x - b_i)^2 + \tfrac{\lambda}{2}\|x\|^2`.

    ``L_max = max_i ||a_i||^2 + lambda`` bounds every :math:`f_i`'s smoothness; ``mu`` is the smallest
    eigenvalue of :math:`A^\top A / n + \lambda I`; the minimizer solves the normal equations.
    """

    features: Tensor
    targets: Tensor
    reg: float

    @classmethod
    def build(cls, n: int, d: int, reg: float, gen: torch.Generator) -> LeastSquaresSum:
        a = torch.randn(n, d, generator=gen, dtype=DTYPE) / math.sqrt(d)
        b = a @ torch.randn(d, generator=gen, dtype=DTYPE) + 0.5 * torch.randn(n, generator=gen, dtype=DTYPE)
        return cls(a, b, float(reg))

    @property
    def n(self) -> int:
        return self.features.shape[0]

    @property
    def hessian(self) -> Tensor:
        d = self.features.shape[1]
        return self.features.T @ self.features / self.n + self.reg * torch.eye(d, dtype=DTYPE)

    @property
    def mu(self) -> float:
        return float(torch.linalg.eigvalsh(self.hessian)[0])

    @property
    def L_max(self) -> float:
        return float((self.features * self.features).sum(1).max()) + self.reg

    @property
    def minimizer(self) -> Tensor:
        return torch.linalg.solve(self.hessian, self.features.T @ self.targets / self.n)

    def value(self, x: Tensor) -> Tensor:
        residual = x @ self.features.T - self.targets
        return 0.5 * (residual * residual).mean(-1) + 0.5 * self.reg * (x * x).sum(-1)

    def component_gradient(self, x: Tensor, i: Tensor) -> Tensor:
        a = self.features[i]
        return ((a * x).sum(-1) - self.targets[i]).unsqueeze(-1) * a + self.reg * x

    def gradient(self, x: Tensor) -> Tensor:
        return (x @ self.features.T - self.targets) @ self.features / self.n + self.reg * x


@dataclass(frozen=True)
class _CosineRipple:
    r"""A separable function plus a ripple :math:`a \cos(b x_j)` per coordinate, of curvature at most :math:`a b^2`.

    The smooth part's curvature is at most 1 in both subclasses, so ``L = 1 + a b^2``.
    """

    dim: int
    amplitude: float = 1.0
    frequency: float = 2.0

    @property
    def L(self) -> float:
        return 1.0 + self.amplitude * self.frequency**2


@dataclass(frozen=True)
class WavyFunction(_CosineRipple):
    r"""The smooth non-convex :math:`f(x) = \sum_j \tfrac12 x_j^2 + a \cos(b x_j)`.

    :math:`f''` per coordinate is :math:`1 - a b^2 \cos(b x_j) \in [1 - ab^2, 1 + ab^2]`, so
    ``L = 1 + a b^2`` exactly (attained at ``x_j = 0``) and ``f`` is non-convex when ``a b^2 > 1``. The
    infimum is ``d`` times the one-dimensional minimum, found by Newton's method from a fine grid.
    """

    def value(self, x: Tensor) -> Tensor:
        return (0.5 * x * x + self.amplitude * torch.cos(self.frequency * x)).sum(-1)

    def gradient(self, x: Tensor) -> Tensor:
        return x - self.amplitude * self.frequency * torch.sin(self.frequency * x)

    @property
    def infimum(self) -> float:
        a, b = self.amplitude, self.frequency
        t = torch.linspace(-4.0 - 2 * a, 4.0 + 2 * a, 20001, dtype=DTYPE)
        t = t[torch.argmin(0.5 * t * t + a * torch.cos(b * t))]
        for _ in range(50):
            t = t - (t - a * b * torch.sin(b * t)) / (1.0 - a * b * b * torch.cos(b * t))
        return self.dim * float(0.5 * t * t + a * torch.cos(b * t))


@dataclass(frozen=True)
class LogisticRegression:
    r"""L2-regularized logistic regression.

    :math:`f(w) = \frac1n\sum_i \log(1 + e^{-y_i a_i^\top w}) + \tfrac\lambda2\|w\|^2`.

    ``mu = lambda`` bounds the Hessian from below everywhere, and the Hessian is Lipschitz with
    :math:`M = \frac{1}{6\sqrt3}\,\frac1n \sum_i \|a_i\|^3` (:math:`|\sigma''| \le 1/(6\sqrt3)`).
    """

    features: Tensor
    labels: Tensor
    reg: float

    @classmethod
    def build(cls, n: int, d: int, reg: float, gen: torch.Generator) -> LogisticRegression:
        a = torch.randn(n, d, generator=gen, dtype=DTYPE)
        w = torch.randn(d, generator=gen, dtype=DTYPE)
        noise = torch.randn(n, generator=gen, dtype=DTYPE)
        labels = torch.sign(a @ w + noise)
        labels[labels == 0] = 1.0
        return cls(a, labels, float(reg))

    @property
    def mu(self) -> float:
        return self.reg

    @property
    def minimizer(self) -> Tensor:
        """``w*`` by Newton's method on the closed-form derivatives, to a zero gradient in float64."""
        w = torch.zeros(self.features.shape[1], dtype=DTYPE)
        for _ in range(100):
            step = torch.linalg.solve(self.hessian(w), self.gradient(w))
            w = w - step
            if float(torch.linalg.vector_norm(step)) < 1e-15:
                break
        return w

    def data_term_model(self, w: Tensor) -> tuple[torch.nn.Module, torch.nn.Module, list[tuple[Tensor, Tensor]]]:
        r"""The unregularized data term at ``w`` as ``(model, loss_fn, batches)`` for the curvature engine.

        A bias-free ``nn.Linear`` holding ``w`` and ``BCEWithLogitsLoss`` on the labels mapped to {0, 1}:
        its mean loss is :math:`\frac1n\sum_i \log(1 + e^{-y_i a_i^\top w})`, ``value(w)`` without the ridge.
        """
        model = torch.nn.Linear(w.numel(), 1, bias=False).to(DTYPE)
        with torch.no_grad():
            model.weight.copy_(w[None])
        targets = ((self.labels + 1.0) / 2.0)[:, None]
        return model, torch.nn.BCEWithLogitsLoss(), [(self.features, targets)]

    @property
    def hessian_lipschitz(self) -> float:
        norms = torch.linalg.vector_norm(self.features, dim=1)
        return float((norms**3).mean()) / (6.0 * math.sqrt(3.0))

    def value(self, w: Tensor) -> Tensor:
        margins = (w @ self.features.T) * self.labels
        return torch.nn.functional.softplus(-margins).mean(-1) + 0.5 * self.reg * (w * w).sum(-1)

    def gradient(self, w: Tensor) -> Tensor:
        margins = (w @ self.features.T) * self.labels
        weights = -torch.sigmoid(-margins) * self.labels / self.features.shape[0]
        return weights @ self.features + self.reg * w

    def hessian(self, w: Tensor) -> Tensor:
        margins = (self.features @ w) * self.labels
        s = torch.sigmoid(margins)
        curvature = s * (1.0 - s) / self.features.shape[0]
        d = self.features.shape[1]
        return (self.features.T * curvature) @ self.features + self.reg * torch.eye(d, dtype=DTYPE)


@dataclass(frozen=True)
class SeparableLogistic:
    r"""Linearly separable data in 2-D whose max-margin separator and GD's asymptotic offset are known.

    The signed points :math:`z_n = y_n x_n` are two support vectors :math:`(1, s)` and :math:`(1, -t)`
    (margin 1 on :math:`\hat w = (1, 0)`) and points with first coordinate greater than 1. The hard-margin
    SVM :math:`\min \|w\|^2` s.t. :math:`z_n^\top w \ge 1` is solved by :math:`\hat w = e_1` with duals
    :math:`\alpha = (t, s)/(s + t)` (KKT). For GD with step ``eta`` on the summed logistic loss,
    Soudry et al. (2018) show :math:`w(k) = \hat w \log k + \tilde w + o(1)`, where
    :math:`\eta\, e^{-z_n^\top \tilde w} = \alpha_n` on the support vectors: two linear equations.
    """

    points: Tensor
    support: tuple[float, float]

    @classmethod
    def build(cls, gen: torch.Generator, s: float = 1.0, t: float = 0.5, extra: int = 4) -> SeparableLogistic:
        support = torch.tensor([[1.0, s], [1.0, -t]], dtype=DTYPE)
        others = torch.stack(
            [
                1.5 + torch.rand(extra, generator=gen, dtype=DTYPE),
                torch.rand(extra, generator=gen, dtype=DTYPE) - 0.5,
            ],
            dim=1,
        )
        return cls(torch.cat([support, others]), (float(s), float(t)))

    @property
    def max_margin(self) -> Tensor:
        return torch.tensor([1.0, 0.0], dtype=DTYPE)

    @property
    def duals(self) -> tuple[float, float]:
        s, t = self.support
        return t / (s + t), s / (s + t)

    def offset(self, lr: float) -> Tensor:
        r""":math:`\tilde w` solving :math:`z_n^\top \tilde w = \log(\eta / \alpha_n)` on the support vectors."""
        rhs = torch.tensor([math.log(lr / a) for a in self.duals], dtype=DTYPE)
        return torch.linalg.solve(self.points[:2], rhs)

    def value(self, w: Tensor) -> Tensor:
        return torch.nn.functional.softplus(-(w @ self.points.T)).sum(-1)

    def gradient(self, w: Tensor) -> Tensor:
        return -torch.sigmoid(-(w @ self.points.T)) @ self.points

    @property
    def smoothness(self) -> float:
        """``||Z||_2^2 / 4``: the summed loss's smoothness constant."""
        return float(torch.linalg.matrix_norm(self.points, ord=2)) ** 2 / 4.0


@dataclass(frozen=True)
class ReddiOnline:
    r"""Reddi, Kale & Kumar's online problem on :math:`[-1, 1]`.

    :math:`f_t(x) = Cx` if :math:`t \bmod 3 = 1`, else :math:`-x`.

    With :math:`C > 2` the best fixed point is :math:`x = -1`; a method stuck at :math:`x = +1` has
    average regret :math:`2(C - 2)/3` per round.
    """

    C: float = 3.0

    def coefficient(self, t: int) -> float:
        """The slope of :math:`f_t` (rounds numbered from 1)."""
        return self.C if t % 3 == 1 else -1.0

    def best_fixed_loss(self, rounds: int) -> float:
        r""":math:`\min_{x \in [-1,1]} \sum_{t \le T} f_t(x)`."""
        total = sum(self.coefficient(t) for t in range(1, rounds + 1))
        return -abs(total)


def _refine_minimum(function, grid: Tensor, iterations: int = 100) -> float:
    """``min function`` over an interval: the best grid point, then golden-section search around it."""
    values = function(grid)
    i = int(torch.argmin(values))
    lo, hi = float(grid[max(i - 1, 0)]), float(grid[min(i + 1, grid.numel() - 1)])
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(iterations):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        fa, fb = function(torch.tensor([a, b], dtype=DTYPE)).tolist()
        lo, hi = (lo, b) if fa < fb else (a, hi)
    return min(float(values[i]), float(function(torch.tensor([0.5 * (lo + hi)], dtype=DTYPE))[0]))


@dataclass(frozen=True)
class PLFunction:
    r"""The non-convex Polyak-Lojasiewicz function :math:`f(x) = \sum_j x_j^2 + a \sin^2(x_j)`, :math:`f^* = 0`.

    Karimi, Nutini & Schmidt's example (with ``a = 3``): :math:`f'' = 2 + 2a\cos(2x) \in [2 - 2a, 2 + 2a]`,
    so ``L = 2 + 2a`` and ``f`` is non-convex for ``a > 1``; its only stationary point is the minimizer 0.
    The PL constant :math:`\mu = \inf_x f'(x)^2 / (2 f(x))` (coordinate-wise, so the same for any ``d``)
    is computed by minimizing that ratio in one dimension (grid, then golden section), as is
    ``slowest_point``, where the PL inequality is tightest; Karimi et al. give the lower bound 1/32 for
    ``a = 3``.
    """

    dim: int
    amplitude: float = 3.0
    mu: float = field(init=False, repr=False, compare=False)
    slowest_point: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # mu = inf f'^2/(2f) and where it is attained (x > 0; the ratio is even), computed once.
        a = self.amplitude

        def ratio(t: Tensor) -> Tensor:
            g = 2 * t + a * torch.sin(2 * t)
            return g * g / (2 * (t * t + a * torch.sin(t) ** 2))

        # The ratio tends to 2 (|x| -> inf) and to 2(1 + a) (x -> 0): its infimum is attained in between.
        grid = torch.linspace(1e-3, 20.0, 20001, dtype=DTYPE)
        object.__setattr__(self, "mu", min(_refine_minimum(ratio, grid), 2.0))
        object.__setattr__(self, "slowest_point", float(grid[torch.argmin(ratio(grid))]))

    @property
    def L(self) -> float:
        return 2.0 + 2.0 * self.amplitude

    def value(self, x: Tensor) -> Tensor:
        return (x * x + self.amplitude * torch.sin(x) ** 2).sum(-1)

    def gradient(self, x: Tensor) -> Tensor:
        return 2 * x + self.amplitude * torch.sin(2 * x)


@dataclass(frozen=True)
class BoundedGradientFunction(_CosineRipple):
    r"""A smooth non-convex function with bounded gradients: :math:`f(x) = \sum_j \sqrt{1 + x_j^2} + a\cos(b x_j)`.

    :math:`f'(x) = x/\sqrt{1+x^2} - ab\sin(bx)`, so :math:`\|\nabla f\|_\infty \le 1 + ab`;
    :math:`f'' = (1+x^2)^{-3/2} - ab^2\cos(bx) \le 1 + ab^2 = L` (and non-convex when :math:`ab^2 > 1`).
    The infimum is ``d`` times the one-dimensional minimum (grid, then golden section).
    """

    amplitude: float = 0.5

    @property
    def gradient_bound(self) -> float:
        """``sup ||grad f||_inf``."""
        return 1.0 + self.amplitude * self.frequency

    def value(self, x: Tensor) -> Tensor:
        return (torch.sqrt(1 + x * x) + self.amplitude * torch.cos(self.frequency * x)).sum(-1)

    def gradient(self, x: Tensor) -> Tensor:
        return x / torch.sqrt(1 + x * x) - self.amplitude * self.frequency * torch.sin(self.frequency * x)

    @property
    def infimum(self) -> float:
        a, b = self.amplitude, self.frequency
        grid = torch.linspace(-4.0, 4.0, 80001, dtype=DTYPE)
        return self.dim * _refine_minimum(lambda t: torch.sqrt(1 + t * t) + a * torch.cos(b * t), grid)
