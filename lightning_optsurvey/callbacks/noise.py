"""Gradient noise scale callback: logs ``noise/b_simple`` (McCandlish et al. 2018) during training.

A thin wrapper over :func:`lightning_optsurvey.measures.gradient_noise_scale`. On one process the small
batches are the batches of the fixed subset and the big batch is their union; under a multi-process
strategy the small batch is each rank's whole shard and the big one the all-reduced gradient, the pairing
the paper uses for data-parallel training.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from lightning_optsurvey.callbacks._measure import MeasuringCallback, check_loss_fn, resolve_loss_fn
from lightning_optsurvey.measures.noise import NoiseScale, batch_gradients, gradient_noise_scale
from lightning_optsurvey.validation import check_int

__all__ = ["GradientNoiseScale", "noise_scale_across_ranks"]


def noise_scale_across_ranks(
    local_gradient: Tensor, local_count: int, world_size: int, all_reduce_mean: Callable[[Tensor], Tensor]
) -> NoiseScale:
    r"""B_simple from each rank's gradient (the small batch) against their mean (the big batch).

    With :math:`W` ranks of :math:`B` samples each, :math:`\lVert G_{B} \rVert^2` is the mean over ranks
    of each rank's squared gradient norm and :math:`G_{WB}` the all-reduced mean gradient.

    Args:
        local_gradient: This rank's mean gradient over its ``local_count`` samples (flat).
        local_count: Samples per rank (the same on every rank).
        world_size: Number of ranks, >= 2.
        all_reduce_mean: Averages a tensor over ranks (e.g. ``trainer.strategy.reduce``).

    Returns:
        The same :class:`~lightning_optsurvey.measures.NoiseScale` on every rank.
    """
    g = local_gradient.detach().double()
    small_sq = all_reduce_mean(g.pow(2).sum().reshape(1)).reshape(())
    big = all_reduce_mean(g.clone())
    return gradient_noise_scale(small_sq, local_count, big.pow(2).sum(), local_count * world_size)


class GradientNoiseScale(MeasuringCallback):
    r"""Log the simple gradient noise scale :math:`B_{\text{simple}} = \operatorname{tr}\Sigma / \lVert G \rVert^2`.

    Logs ``noise/b_simple`` and its two unbiased parts ``noise/trace_sigma`` and ``noise/grad_sq_norm``.
    Gradients are those of the module in its current (training) mode, on the fixed subset, through
    :func:`torch.autograd.grad` on new tensors (the optimizer's ``.grad`` is untouched). B_simple is the
    batch size at which the gradient's noise and signal are comparable; McCandlish et al. find the
    critical batch size near it.

    Args:
        every_n_epochs: Measure after every n-th epoch (``None``: never at epoch ends).
        num_batches: Batches in the fixed subset per rank; at least 2 on one process (the small batches).
        loss_fn: ``loss_fn(outputs, targets)`` or a ``BatchLoss``; default: the module's ``compute_loss(batch)``
            if it defines one (any batch structure), else its ``loss_fn`` or cross-entropy (``resolve_loss_fn``).
        every_n_steps: Measure after every n-th optimizer step (``None``: never).
        seed: Seed of the subset.

    Raises:
        ValueError: For a cadence that is not a positive integer (or ``None``), or ``num_batches < 2``.

    References:
        McCandlish, Kaplan, Amodei, OpenAI Dota Team. An Empirical Model of Large-Batch Training. 2018.
        https://arxiv.org/abs/1812.06162
    """

    def __init__(
        self,
        every_n_epochs: int | None = 1,
        num_batches: int = 8,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        every_n_steps: int | None = None,
        seed: int = 0,
    ) -> None:
        check_int("num_batches", num_batches, low=2)  # small batches and their union
        super().__init__(every_n_epochs=every_n_epochs, every_n_steps=every_n_steps, num_batches=num_batches,
                         seed=seed)
        self.loss_fn = check_loss_fn(loss_fn)

    @override
    def measure(self, trainer: Trainer, pl_module: LightningModule, batches: list[Any]) -> dict[str, float]:
        loss_fn = resolve_loss_fn(pl_module, self.loss_fn)
        grads, sizes = batch_gradients(pl_module, loss_fn, batches)
        weights = torch.tensor(sizes, dtype=grads.dtype, device=grads.device) / sum(sizes)
        mean_grad = weights @ grads
        if trainer.world_size > 1:
            count = sum(sizes)
            est = noise_scale_across_ranks(mean_grad, count, trainer.world_size,
                                           lambda t: trainer.strategy.reduce(t, reduce_op="mean"))
        else:
            if len(set(sizes)) != 1:  # the last batch of a small dataset: drop it, the estimator needs one B
                keep = [i for i, s in enumerate(sizes) if s == sizes[0]]
                grads, sizes = grads[keep], [sizes[i] for i in keep]
                mean_grad = grads.mean(dim=0)
            if len(sizes) < 2:
                raise RuntimeError("GradientNoiseScale needs at least two equal-size batches on one process")
            small_sq = grads.double().pow(2).sum(dim=1).mean()
            est = gradient_noise_scale(small_sq, sizes[0], mean_grad.double().pow(2).sum(), sum(sizes))
        return {
            "noise/b_simple": est.b_simple,
            "noise/trace_sigma": est.trace_sigma,
            "noise/grad_sq_norm": est.grad_sq_norm,
        }
