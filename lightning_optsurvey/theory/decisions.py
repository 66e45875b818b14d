"""How the checks decide: Monte-Carlo allowances, bound violations and fitted rates and exponents.

Shared by the group modules; each check states in its ``criterion`` which of these it applies, with its
tolerances as named constants of its own module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "MC_Z",
    "bound_violations",
    "loglog_slope",
    "mc_bound_violations",
    "mean_and_stderr",
    "tail_rate",
]

#: Standard errors allowed between a Monte-Carlo estimate (a mean over independent runs) and the bound or
#: exact value it is compared with.
MC_Z = 4.0


def mean_and_stderr(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error of the mean over the last axis (the independent runs)."""
    return values.mean(-1), values.std(-1) / math.sqrt(values.shape[-1])


def mc_bound_violations(
    mean: Sequence[float], stderr: Sequence[float], bound: Sequence[float], atol: float = 0.0
) -> int:
    """Number of ``k`` where a Monte-Carlo mean exceeds the bound by more than ``MC_Z`` standard errors (+ ``atol``)."""
    return sum(1 for m, e, b in zip(mean, stderr, bound, strict=True) if not m - MC_Z * e <= b + atol)


def bound_violations(measured: Sequence[float], bound: Sequence[float], rtol: float, atol: float = 0.0) -> int:
    """Number of ``k`` where ``measured[k] > bound[k] * (1 + rtol) + atol`` (or either is not finite)."""
    count = 0
    for m, b in zip(measured, bound, strict=True):
        if not (math.isfinite(m) and math.isfinite(b)) or m > b * (1.0 + rtol) + atol:
            count += 1
    return count


def tail_rate(values: Sequence[float], start: int, stop: int | None = None) -> float:
    """Per-step geometric rate ``r`` fitted by least squares to ``log values[k] = a + k log r`` on a window.

    Args:
        values: Positive values indexed by step.
        start: First step of the window.
        stop: One past the last step (default: the end).

    Returns:
        ``exp(slope)``; ``nan`` if the window holds fewer than two positive finite values.
    """
    stop = len(values) if stop is None else stop
    points = [(k, math.log(values[k])) for k in range(start, stop) if values[k] > 0 and math.isfinite(values[k])]
    return math.exp(_slope(points)) if len(points) >= 2 else math.nan


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x`` (the exponent of a power law)."""
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    return _slope(points) if len(points) >= 2 else math.nan


def _slope(points: Sequence[tuple[float, float]]) -> float:
    n = len(points)
    mean_x = sum(p[0] for p in points) / n
    mean_y = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mean_x) ** 2 for p in points)
    sxy = sum((p[0] - mean_x) * (p[1] - mean_y) for p in points)
    return sxy / sxx if sxx > 0 else math.nan

