r"""Elastic averaging SGD's update rule and its analysis on a quadratic, as pure functions.

The synchronous EASGD step of all workers at once (:func:`easgd_step`), its iteration matrix on
:math:`f(x) = \frac h2 x^2` (:func:`easgd_quadratic_matrix`), the closed-form stability condition
(:func:`easgd_is_stable`) and the fixed point on heterogeneous quadratics (:func:`easgd_fixed_point`).
:class:`~lightning_optsurvey.strategies.EASGDStrategy` runs the same update per rank; the theory checks
use these without Lightning (this module imports only ``torch``).

References:
    Zhang, Choromanska & LeCun, "Deep learning with Elastic Averaging SGD", NeurIPS 2015,
    arXiv:1412.6651.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_optsurvey.validation import check_int

__all__ = ["easgd_fixed_point", "easgd_is_stable", "easgd_quadratic_matrix", "easgd_step"]


def easgd_step(
    workers: Sequence[Tensor],
    center: Tensor,
    alpha: float,
    grads: Sequence[Tensor] | None = None,
    lr: float = 0.0,
) -> tuple[list[Tensor], Tensor]:
    r"""One synchronous EASGD step for all workers at once.

    .. math::

        x_i' = x_i - \eta\, g_i - \alpha (x_i - \tilde x), \qquad
        \tilde x' = \tilde x + \alpha \sum_i (x_i - \tilde x).

    Args:
        workers: The workers' parameters :math:`x_i` (same shape as ``center``).
        center: The center variable :math:`\tilde x`.
        alpha: The moving rate :math:`\alpha = \eta\rho`.
        grads: The workers' gradients :math:`g_i` at :math:`x_i` (``None``: the elastic part only).
        lr: The learning rate :math:`\eta` of the gradient part.

    Returns:
        The new workers and the new center (new tensors; the inputs are not modified).

    Raises:
        ValueError: If ``workers`` is empty or ``grads`` has a different length.

    References:
        Zhang, Choromanska & LeCun, "Deep learning with Elastic Averaging SGD", NeurIPS 2015,
        arXiv:1412.6651, Eq. (5)-(6).
    """
    if len(workers) == 0:
        raise ValueError("easgd_step needs at least one worker")
    if grads is not None and len(grads) != len(workers):
        raise ValueError(f"got {len(grads)} gradients for {len(workers)} workers")
    diffs = [x - center for x in workers]
    # The gradient step first, then the elastic one: the order in which the strategy applies them.
    stepped = list(workers) if grads is None else [x - lr * g for x, g in zip(workers, grads)]
    new_workers = [x - alpha * d for x, d in zip(stepped, diffs)]
    return new_workers, center + alpha * torch.stack(diffs).sum(0)


def easgd_quadratic_matrix(eta_h: float, alpha: float, num_workers: int) -> Tensor:
    r"""Iteration matrix of synchronous EASGD on :math:`f(x) = \frac h2 x^2`, one coordinate.

    The state is :math:`(x_1, \dots, x_N, \tilde x)` and one step (gradient plus elastic update, as in
    :func:`easgd_step` with :math:`g_i = h x_i`) maps it to ``matrix @ state``:

    .. math::

        x_i' = (1 - \eta h - \alpha) x_i + \alpha \tilde x, \qquad
        \tilde x' = \alpha \sum_i x_i + (1 - N\alpha) \tilde x.

    Args:
        eta_h: Learning rate times curvature, :math:`\eta h`.
        alpha: Moving rate :math:`\alpha`.
        num_workers: :math:`N \ge 1`.

    Returns:
        The :math:`(N+1) \times (N+1)` matrix in float64.

    Raises:
        TypeError: If ``num_workers`` is not an integer.
        ValueError: If ``num_workers < 1``.
    """
    check_int("num_workers", num_workers, low=1)
    n = num_workers
    matrix = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    matrix[:n, :n] = torch.eye(n, dtype=torch.float64) * (1.0 - eta_h - alpha)
    matrix[:n, n] = alpha
    matrix[n, :n] = alpha
    matrix[n, n] = 1.0 - n * alpha
    return matrix


def easgd_is_stable(eta_h: float, alpha: float, num_workers: int) -> bool:
    r"""Whether synchronous EASGD on a quadratic with curvature :math:`h` converges (closed form).

    With :math:`\beta = N\alpha`, all eigenvalues of :func:`easgd_quadratic_matrix` lie strictly inside
    the unit circle iff

    .. math::

        |1 - \alpha - \eta h| < 1 \ (N \ge 2), \quad \beta\eta h > 0, \quad
        4 - 2\alpha - 2\beta - 2\eta h + \beta\eta h > 0, \quad |(1-\beta)(1-\eta h) - \alpha| < 1.

    The first is the contraction of each worker's deviation from the workers' mean; the others are the
    Jury conditions for the mean-and-center block.

    Args:
        eta_h: :math:`\eta h` (learning rate times curvature along one eigen-direction).
        alpha: Moving rate :math:`\alpha`.
        num_workers: :math:`N \ge 1`.

    Returns:
        ``True`` if the iteration converges to the minimizer from every start.

    Raises:
        TypeError: If ``num_workers`` is not an integer.
        ValueError: If ``num_workers < 1``.

    References:
        Zhang, Choromanska & LeCun, "Deep learning with Elastic Averaging SGD", NeurIPS 2015,
        arXiv:1412.6651 (stability of synchronous EASGD in the quadratic case).
    """
    check_int("num_workers", num_workers, low=1)
    beta = num_workers * alpha
    deviations = num_workers == 1 or abs(1.0 - alpha - eta_h) < 1.0
    return (
        deviations
        and beta * eta_h > 0.0
        and 4.0 - 2.0 * alpha - 2.0 * beta - 2.0 * eta_h + beta * eta_h > 0.0
        and abs((1.0 - beta) * (1.0 - eta_h) - alpha) < 1.0
    )


def easgd_fixed_point(minimizers: Tensor, eta_h: float, alpha: float) -> tuple[Tensor, Tensor]:
    r"""Fixed point of synchronous EASGD when worker :math:`i` minimizes :math:`\frac h2 \lVert x - m_i\rVert^2`.

    Setting :math:`x_i' = x_i` and :math:`\tilde x' = \tilde x` in :func:`easgd_step` with
    :math:`g_i = h (x_i - m_i)` gives :math:`\tilde x = \bar m` (the minimizer of the sum) and

    .. math::

        x_i = \frac{\eta h\, m_i + \alpha \bar m}{\eta h + \alpha}.

    Args:
        minimizers: The workers' minimizers :math:`m_i`, shape ``(N, ...)``.
        eta_h: :math:`\eta h > 0`.
        alpha: :math:`\alpha > 0`.

    Returns:
        The workers' fixed points (shape of ``minimizers``) and the center (shape ``minimizers[0]``).

    Raises:
        ValueError: If ``eta_h + alpha`` is not positive.
    """
    if not eta_h + alpha > 0:
        raise ValueError(f"eta_h + alpha must be positive, got {eta_h} + {alpha}")
    center = minimizers.mean(0)
    return (eta_h * minimizers + alpha * center) / (eta_h + alpha), center
