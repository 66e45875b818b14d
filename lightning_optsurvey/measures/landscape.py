"""Loss along one or two weight-space directions: filter-normalized random directions (Li et al. 2018).

Why our own: the reference code (``loss-landscape``) writes the perturbed weights into the model and needs
MPI and h5py; here the grid is evaluated through :func:`torch.func.functional_call` on new tensors, so the
model is never changed, and the result is a tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_optsurvey.measures._functional import Batch, FlatObjective, LossFn, randn

__all__ = ["filter_normalized_direction", "loss_surface", "normalize_to_filters"]


def normalize_to_filters(
    direction: Mapping[str, Tensor], model: nn.Module, ignore_bias_bn: bool = True
) -> dict[str, Tensor]:
    r"""Rescale each filter of ``direction`` to the norm of the matching filter of the model's weights.

    .. math::
        d_{i,j} \leftarrow \frac{d_{i,j}}{\lVert d_{i,j} \rVert} \lVert w_{i,j} \rVert

    for filter ``j`` (a row of a linear layer's matrix, an output channel of a convolution) of layer ``i``.
    With ``ignore_bias_bn``, one-dimensional parameters (biases, normalization scales and shifts) get a
    zero direction, as Li et al. do; otherwise they are normalized as a whole.

    Args:
        direction: ``{name: tensor}`` for every trainable parameter.
        model: The network whose weights set the scale.
        ignore_bias_bn: Zero the direction on one-dimensional parameters.

    Returns:
        The normalized direction, ``{name: tensor}``.

    References:
        Li, Xu, Taylor, Studer, Goldstein. Visualizing the Loss Landscape of Neural Nets. NeurIPS 2018.
        https://arxiv.org/abs/1712.09913
    """
    out: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        d, w = direction[name].detach(), p.detach()
        if w.dim() <= 1:
            out[name] = torch.zeros_like(w) if ignore_bias_bn else d * (w.norm() / d.norm().clamp_min(1e-30))
            continue
        d_rows, w_rows = d.reshape(d.shape[0], -1), w.reshape(w.shape[0], -1)
        factor = w_rows.norm(dim=1, keepdim=True) / d_rows.norm(dim=1, keepdim=True).clamp_min(1e-30)
        out[name] = (d_rows * factor).reshape(w.shape)
    return out


def filter_normalized_direction(
    model: nn.Module, generator: torch.Generator | None = None, ignore_bias_bn: bool = True
) -> dict[str, Tensor]:
    """A Gaussian direction in weight space, filter-normalized (see :func:`normalize_to_filters`).

    Args:
        model: The network.
        generator: Source of the direction (global RNG if ``None``).
        ignore_bias_bn: Zero the direction on one-dimensional parameters.

    Returns:
        ``{name: tensor}`` for every trainable parameter.

    References:
        Li, Xu, Taylor, Studer, Goldstein. Visualizing the Loss Landscape of Neural Nets. NeurIPS 2018.
        https://arxiv.org/abs/1712.09913
    """
    raw = {
        n: randn(p.numel(), p.detach(), generator).view_as(p)
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    return normalize_to_filters(raw, model, ignore_bias_bn)


def loss_surface(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Batch],
    directions: Sequence[Mapping[str, Tensor]],
    alphas: Tensor,
    betas: Tensor | None = None,
) -> Tensor:
    r"""Losses on a 1-D or 2-D grid around the weights: :math:`L(w + \alpha d_1 [+ \beta d_2])`.

    Args:
        model: The network (not modified; evaluated in its current mode).
        loss_fn: ``loss_fn(outputs, targets)``, the mean loss of a batch.
        batches: Sequence of ``(inputs, targets)``; the loss is the mean over all their samples.
        directions: One direction (1-D) or two (2-D), each ``{name: tensor}`` over trainable parameters.
        alphas: Coefficients of the first direction.
        betas: Coefficients of the second direction (2-D only).

    Returns:
        Losses of shape ``(len(alphas),)`` or ``(len(alphas), len(betas))``.

    Raises:
        ValueError: If the number of directions does not match the grid.
    """
    if len(directions) not in (1, 2) or (len(directions) == 2) != (betas is not None):
        raise ValueError("pass one direction without betas (1-D) or two directions with betas (2-D), got "
                         f"{len(directions)} direction(s) and betas={'given' if betas is not None else None}")
    objective = FlatObjective(model, loss_fn, batches)
    flat = [objective.flatten(dict(d)).to(objective.w) for d in directions]
    if betas is None:
        return torch.stack([objective.loss(objective.w + float(a) * flat[0]) for a in alphas])
    rows = [
        torch.stack([objective.loss(objective.w + float(a) * flat[0] + float(b) * flat[1]) for b in betas])
        for a in alphas
    ]
    return torch.stack(rows)
