"""Drive a registered optimizer on an explicit gradient, recording the iterates.

The gradient is written into ``param.grad`` from the problem's closed form, so the only thing the
check exercises is the optimizer's update rule, which comes from the registry
(:func:`lightning_optsurvey.optim.create_optimizer`), not from a reimplementation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_optsurvey.optim import create_optimizer


def run_optimizer(
    name: str,
    x0: Tensor,
    gradient: Callable[[Tensor, int], Tensor],
    steps: int,
    *,
    before_step: Callable[[torch.optim.Optimizer, int], None] | None = None,
    project: Callable[[Tensor], Tensor] | None = None,
    record: Callable[[Tensor], Tensor] | None = None,
    **hparams: Any,
) -> tuple[Tensor, Tensor]:
    """Run ``steps`` steps of the optimizer ``name`` from ``x0``.

    Args:
        name: Registry name.
        x0: Starting point (any shape; rows may be independent runs of a coordinate-wise method).
        gradient: ``gradient(x, k)`` at the current iterate and step index ``k`` (0-based).
        steps: Number of steps.
        before_step: Called as ``before_step(optimizer, k)`` before each step (step-size schedules).
        project: Applied to the parameter after each step (projection onto a feasible set).
        record: What to keep of each iterate (default: a copy of it); keeping a per-run value rather
            than the iterate saves memory when the rows are many independent runs.
        **hparams: Optimizer hyperparameters.

    Returns:
        ``(iterates, gradients)``: ``record(x_k)`` for ``k = 0..steps`` stacked on a new first axis,
        and the gradients ``g_0..g_{steps-1}`` that were applied (empty when ``record`` is given).
    """
    keep = record is None
    record = record if record is not None else torch.clone
    param = torch.nn.Parameter(x0.detach().clone())
    optimizer = create_optimizer(name, [param], **hparams)
    iterates = [record(param.detach())]
    gradients = []
    for k in range(steps):
        with torch.no_grad():
            g = gradient(param.detach(), k)
        param.grad = g.clone() if keep else g
        if keep:
            gradients.append(g)
        if before_step is not None:
            before_step(optimizer, k)
        optimizer.step()
        if project is not None:
            with torch.no_grad():
                param.copy_(project(param))
        with torch.no_grad():
            iterates.append(record(param.detach()))
    return torch.stack(iterates), torch.stack(gradients) if gradients else torch.empty(0)
