"""The gradient noise scale B_simple of McCandlish et al. (2018), from gradients at two batch sizes.

Why our own: the estimator is a few lines, but its inputs must be the *squared norms* of gradients at two
batch sizes, not a per-sample covariance; libraries that offer it do so inside their own training loops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lightning_optsurvey.measures._functional import Batch, FlatObjective, LossFn
from lightning_optsurvey.validation import check_float

__all__ = ["NoiseScale", "batch_gradients", "gradient_noise_scale"]


class NoiseScale(NamedTuple):
    """Result of :func:`gradient_noise_scale`.

    Attributes:
        b_simple: ``trace_sigma / grad_sq_norm`` (``nan`` when the norm estimate is not positive).
        trace_sigma: Unbiased estimate of the trace of the per-sample gradient covariance.
        grad_sq_norm: Unbiased estimate of the squared norm of the true gradient.
    """

    b_simple: float
    trace_sigma: float
    grad_sq_norm: float


def gradient_noise_scale(
    small_sq_norm: float | Tensor, small_batch_size: float, big_sq_norm: float | Tensor, big_batch_size: float
) -> NoiseScale:
    r"""B_simple from the squared norms of gradient estimates at a small and a big batch size.

    A mean gradient over ``B`` i.i.d. samples has :math:`\mathbb{E} \lVert G_B \rVert^2 =
    \lVert G \rVert^2 + \operatorname{tr}(\Sigma) / B`, so with :math:`B_s < B_b` the unbiased estimators are

    .. math::
        |G|^2 \approx \frac{B_b |G_{B_b}|^2 - B_s |G_{B_s}|^2}{B_b - B_s},
        \qquad
        \operatorname{tr}\Sigma \approx \frac{|G_{B_s}|^2 - |G_{B_b}|^2}{1/B_s - 1/B_b},

    and :math:`B_{\text{simple}} = \operatorname{tr}\Sigma / \lVert G \rVert^2` (McCandlish et al.,
    Appendix A). ``small_sq_norm`` may be an average of several small-batch squared norms (e.g. over ranks
    or over batches), which lowers its variance without bias.

    Args:
        small_sq_norm: :math:`\lVert G_{B_s} \rVert^2` (or a mean of such).
        small_batch_size: :math:`B_s`, > 0.
        big_sq_norm: :math:`\lVert G_{B_b} \rVert^2`.
        big_batch_size: :math:`B_b > B_s`.

    Returns:
        A :class:`NoiseScale`.

    Raises:
        ValueError: If the batch sizes are not ``0 < small < big``, or a squared norm is not finite.
        TypeError: If a batch size is not a real number.

    References:
        McCandlish, Kaplan, Amodei, OpenAI Dota Team. An Empirical Model of Large-Batch Training. 2018.
        https://arxiv.org/abs/1812.06162
    """
    b_s = check_float("small_batch_size", small_batch_size, low=0.0, low_open=True)
    b_b = check_float("big_batch_size", big_batch_size, low=0.0, low_open=True)
    if not b_s < b_b:
        raise ValueError(
            f"need 0 < small_batch_size < big_batch_size, got {small_batch_size!r}, {big_batch_size!r}"
        )
    small, big = (float(v) for v in (small_sq_norm, big_sq_norm))
    if not (math.isfinite(small) and math.isfinite(big)):
        raise ValueError(f"the squared gradient norms must be finite, got {small!r} and {big!r}")
    grad_sq_norm = (b_b * big - b_s * small) / (b_b - b_s)
    trace_sigma = (small - big) / (1.0 / b_s - 1.0 / b_b)
    b_simple = trace_sigma / grad_sq_norm if grad_sq_norm > 0 else float("nan")
    return NoiseScale(b_simple, trace_sigma, grad_sq_norm)


def batch_gradients(model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch]) -> tuple[Tensor, list[int]]:
    """The mean-loss gradient of each batch, as rows of a matrix, and the batch sizes.

    Args:
        model: The network (not modified: gradients come from :func:`torch.autograd.grad` on new tensors).
        loss_fn: ``loss_fn(outputs, targets)``, the mean loss of a batch.
        batches: Sequence of ``(inputs, targets)``.

    Returns:
        ``(G, sizes)`` with ``G[i]`` the flat gradient of batch ``i``.
    """
    objective = FlatObjective(model, loss_fn, batches)  # it validates the batches
    rows = [objective.loss_and_grad(batches=[i])[1] for i in range(len(objective.batches))]
    return torch.stack(rows), list(objective.sizes)
