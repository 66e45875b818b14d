r"""Stochastic trace and diagonal estimators: Hutchinson, Hutch++ and Hutchinson's diagonal.

Hutchinson's estimator averages quadratic forms with random probes :math:`z` of identity covariance
(Rademacher by default):

.. math::

    \operatorname{tr}(H) \approx \frac{1}{m}\sum_{i=1}^m z_i^\top H z_i, \qquad
    \operatorname{diag}(H) \approx \frac{1}{m}\sum_{i=1}^m z_i \odot H z_i .

Hutch++ (Meyer et al. 2021) spends a third of the budget on a sketch :math:`Q = \operatorname{qr}(HS)`
of the dominant range, takes :math:`\operatorname{tr}(Q^\top H Q)` exactly with another third, and
runs Hutchinson on the deflated :math:`(I - QQ^\top) H (I - QQ^\top)` with the last third:

.. math::

    \operatorname{tr}(H) \approx \operatorname{tr}(Q^\top H Q)
        + \frac{1}{m/3}\sum_i g_i^\top (I - QQ^\top) H (I - QQ^\top) g_i .

For a Hessian whose spectrum decays (a few large outliers, a bulk near zero), the deflated operator has
far less variance, so at an equal budget Hutch++'s error is a fraction of Hutchinson's. Both are
unbiased; ``stderr`` is the sample standard deviation of the random part divided by the square root of
its number of probes (for Hutch++ conditional on the sketch).

Products go through ``op @ V`` with blocks of probes, so operators with a batched product (vmapped
columns) use it. Probes are drawn as the rows of a block in the operator's dtype and handed over as a
transposed view; each product is overwritten in place by its elementwise product with the probe before
the float64 sums, and Hutch++ deflates its probes in place, so the probe block and its products are the
only full-size buffers (no transposed, stacked or float64 copies).

Why our own: PyHessian's ``trace()`` stops after two samples whenever the running mean turns negative
and has no variance-reduced estimator or standard error.

References:
    Hutchinson, "A stochastic estimator of the trace of the influence matrix for Laplacian smoothing
    splines", Comm. Statist. Simulation Comput. 1990.
    Meyer, Musco, Musco & Woodruff, "Hutch++: Optimal stochastic trace estimation", SOSA 2021,
    arXiv:2010.09649.
    Bekas, Kokiopoulou & Saad, "An estimator for the diagonal of a matrix", Appl. Numer. Math. 2007.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from lightning_optsurvey.curvature.linear import LinearOperator, operator_info
from lightning_optsurvey.validation import check_choice, check_int

__all__ = ["DiagonalResult", "TraceResult", "hutchinson_diagonal", "hutchinson_trace", "hutchpp_trace"]

DISTRIBUTIONS = ("rademacher", "normal")
DEFAULT_BLOCK = 16  # probes per batched product


class TraceResult(NamedTuple):
    r"""A trace estimate.

    Attributes:
        estimate: The estimate of :math:`\operatorname{tr}(H)`.
        stderr: Its standard error (``nan`` with a single random probe).
        num_matvecs: Products used.
    """

    estimate: float
    stderr: float
    num_matvecs: int


class DiagonalResult(NamedTuple):
    """A diagonal estimate: ``estimate`` and ``stderr`` are ``(numel,)`` float64 tensors."""

    estimate: Tensor
    stderr: Tensor
    num_matvecs: int


def _probes(
    n: int, count: int, distribution: str, generator: torch.Generator, device: torch.device,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """``count`` probes as the rows of a ``(count, n)`` block, drawn in place in ``dtype``."""
    if distribution == "rademacher":  # +-1 is exact in every float dtype
        z = torch.randint(0, 2, (count, n), generator=generator, dtype=dtype).mul_(2).sub_(1)
    else:
        z = torch.randn(count, n, generator=generator, dtype=dtype)
    return z.to(device)


def _op_dtype(op: LinearOperator) -> torch.dtype:
    """Vectors in the operator's dtype skip a conversion per product; sums are still taken in float64."""
    return getattr(op, "dtype", torch.float64)


def _blocks(total: int, block_size: int) -> list[int]:
    """Sizes of consecutive probe blocks; probes are drawn per block so memory stays numel x block_size."""
    return [min(block_size, total - start) for start in range(0, total, block_size)]


def _product(op: LinearOperator, rows: Tensor) -> Tensor:
    """``(op @ rows.T).T``: the products of a ``(count, n)`` block of row vectors, as rows.

    The block goes to the operator as the transposed view ``rows.T`` (no copy; the operator sees columns),
    and comes back as a view too, so no full-size copy is made on either side.
    """
    if rows.shape[0] == 1:
        out = (op @ rows[0]).unsqueeze(0)
    else:
        out = (op @ rows.T).T
    return out.to(device=rows.device)


def _apply_block(op: LinearOperator, rows: Tensor, block_size: int) -> Tensor:
    """The products of the rows of ``rows``, as rows, in ``block_size`` chunks (memory-bounded)."""
    if rows.shape[0] <= block_size:
        return _product(op, rows)
    return torch.cat([_product(op, chunk) for chunk in rows.split(block_size)])


def _quadratic_forms(op: LinearOperator, z: Tensor) -> Tensor:
    """``z_i^T H z_i`` for the rows of ``z``, in one batched product, summed in float64."""
    hz = _product(op, z)
    samples = hz.mul_(z.to(hz.dtype)) if _owned(hz, z) else z.to(hz.dtype) * hz
    return samples.sum(dim=1, dtype=torch.float64)


def _owned(out: Tensor, inp: Tensor) -> bool:
    """Whether ``out`` is a fresh tensor (not sharing storage with ``inp``), so it may be overwritten."""
    return out.untyped_storage().data_ptr() != inp.untyped_storage().data_ptr()


def _validate(
    op: LinearOperator, num_matvecs: int, distribution: str, block_size: int, minimum: int,
    generator: torch.Generator | None,
) -> tuple[int, torch.device, torch.Generator]:
    """Check the common arguments; return ``numel``, device and the generator (default: seeded with 0)."""
    n, device = operator_info(op)
    check_int("num_matvecs", num_matvecs, low=minimum)
    check_choice("distribution", distribution, DISTRIBUTIONS)
    check_int("block_size", block_size)
    return n, device, generator if generator is not None else torch.Generator().manual_seed(0)


def _hutchinson_samples(
    op: LinearOperator, num_matvecs: int, distribution: str, generator: torch.Generator | None, block_size: int,
) -> Iterator[Tensor]:
    """Blocks of ``z_i * (H z_i)`` (elementwise, one probe per row), ``block_size`` probes at a time.

    Each block of products is overwritten in place by its product with the probes: the probe block and
    its products are the only full-size buffers, and memory stays ``numel x block_size`` however many
    probes are asked for.
    """
    n, device, generator = _validate(op, num_matvecs, distribution, block_size, 1, generator)
    dtype = _op_dtype(op)
    for count in _blocks(num_matvecs, block_size):
        z = _probes(n, count, distribution, generator, device, dtype)
        hz = _product(op, z)
        yield hz.mul_(z.to(hz.dtype)) if _owned(hz, z) else z.to(hz.dtype) * hz


def _mean_and_stderr(samples: Tensor) -> tuple[float, float]:
    count = samples.shape[-1]
    mean = samples.mean(dim=-1)
    if count < 2:
        return float(mean), math.nan
    return float(mean), float(samples.std(dim=-1) / math.sqrt(count))


def hutchinson_trace(
    op: LinearOperator,
    num_matvecs: int,
    *,
    distribution: Literal["rademacher", "normal"] = "rademacher",
    generator: torch.Generator | None = None,
    block_size: int = DEFAULT_BLOCK,
) -> TraceResult:
    r"""Hutchinson's unbiased trace estimate from ``num_matvecs`` random probes.

    Args:
        op: A square operator with ``numel`` and ``op @ v`` / ``op @ V``.
        num_matvecs: Number of probes (= products).
        distribution: ``"rademacher"`` (minimum variance for a fixed matrix) or ``"normal"``.
        generator: Source of the probes (default: a fresh generator seeded with 0).
        block_size: Probes per batched product.

    Returns:
        A :class:`TraceResult`.

    Raises:
        TypeError: If ``num_matvecs`` or ``block_size`` is not an integer, or the distribution not a string.
        ValueError: If ``num_matvecs`` or ``block_size`` is not positive, or the distribution is unknown.
    """
    samples = torch.cat([block.sum(dim=1, dtype=torch.float64)
                         for block in _hutchinson_samples(op, num_matvecs, distribution, generator, block_size)])
    estimate, stderr = _mean_and_stderr(samples)
    return TraceResult(estimate, stderr, num_matvecs)


def hutchpp_trace(
    op: LinearOperator,
    num_matvecs: int,
    *,
    distribution: Literal["rademacher", "normal"] = "rademacher",
    generator: torch.Generator | None = None,
    block_size: int = DEFAULT_BLOCK,
) -> TraceResult:
    r"""Hutch++ trace estimate (Meyer et al. 2021) with ``num_matvecs`` products in all.

    ``s = num_matvecs // 3`` products sketch the range, ``s`` more project onto it, and the remaining
    ``num_matvecs - 2 s`` are Hutchinson probes of the deflated operator.

    Args:
        op: A square operator with ``numel`` and ``op @ v`` / ``op @ V``.
        num_matvecs: Total products, at least 3.
        distribution: Probe distribution of the sketch and of the Hutchinson part.
        generator: Source of the probes (default: a fresh generator seeded with 0).
        block_size: Probes per batched product.

    Returns:
        A :class:`TraceResult`; ``stderr`` is that of the Hutchinson part, given the sketch.

    Raises:
        TypeError: If ``num_matvecs`` or ``block_size`` is not an integer, or the distribution not a string.
        ValueError: If ``num_matvecs`` is below 3, ``block_size`` is not positive, or the distribution is
            unknown.
    """
    n, device, generator = _validate(op, num_matvecs, distribution, block_size, 3, generator)
    sketch = min(num_matvecs // 3, n)
    rest = num_matvecs - 2 * sketch
    dtype = _op_dtype(op)
    s = _probes(n, sketch, distribution, generator, device, dtype)
    # Orthonormal rows spanning H S (QR of the n x sketch block, in the operator's dtype; half-precision
    # operators factorize in float32, as torch has no half QR kernel).
    block = _apply_block(op, s, block_size).T
    half = block.dtype in (torch.float16, torch.bfloat16)
    q = torch.linalg.qr(block.float() if half else block)[0].T.to(block.dtype).contiguous()
    del s
    hq = _apply_block(op, q, block_size)
    exact = float(hq.mul_(q.to(hq.dtype)).sum(dtype=torch.float64)) if _owned(hq, q) else \
        float((q.to(hq.dtype) * hq).sum(dtype=torch.float64))
    del hq
    pieces = []
    for count in _blocks(rest, block_size):
        g = _probes(n, count, distribution, generator, device, dtype)
        g.sub_((g @ q.T) @ q)  # deflate in place: (I - Q Q^T) g, as rows
        pieces.append(_quadratic_forms(op, g))
    samples = torch.cat(pieces)
    mean, stderr = _mean_and_stderr(samples)
    return TraceResult(exact + mean, stderr, 2 * sketch + rest)


def hutchinson_diagonal(
    op: LinearOperator,
    num_matvecs: int,
    *,
    distribution: Literal["rademacher", "normal"] = "rademacher",
    generator: torch.Generator | None = None,
    block_size: int = DEFAULT_BLOCK,
) -> DiagonalResult:
    r"""Unbiased estimate of the diagonal, :math:`\frac1m\sum_i z_i \odot H z_i` (Bekas et al. 2007).

    With Rademacher probes the error of entry :math:`j` comes only from the off-diagonal entries of row
    :math:`j`, so a diagonally dominant Hessian is estimated well from few probes. The arguments, their
    checks and the probes are those of :func:`hutchinson_trace` (the same seed gives the same probes);
    the result is a :class:`DiagonalResult`, ``stderr`` per entry.
    """
    total = total_sq = None
    for samples in _hutchinson_samples(op, num_matvecs, distribution, generator, block_size):
        block_sum = samples.sum(dim=0, dtype=torch.float64)
        block_sq = samples.square_().sum(dim=0, dtype=torch.float64)
        total = block_sum if total is None else total.add_(block_sum)
        total_sq = block_sq if total_sq is None else total_sq.add_(block_sq)
    mean = total / num_matvecs
    if num_matvecs < 2:
        stderr = torch.full_like(mean, math.nan)
    else:
        var = (total_sq - num_matvecs * mean * mean).clamp_min(0) / (num_matvecs - 1)
        stderr = (var / num_matvecs).sqrt()
    return DiagonalResult(mean, stderr, num_matvecs)
