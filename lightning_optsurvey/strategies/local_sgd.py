r"""Local SGD and post-local SGD: ``Trainer(strategy="local_sgd")``.

Every rank runs its optimizer on its own mini-batches, with no gradient all-reduce, and every
``sync_every`` (H) optimizer steps the ranks replace their parameters and floating-point buffers by
the average over ranks:

.. math::

    x_i \leftarrow x_i + \Delta_i \ \text{(local step)}, \qquad
    x_i \leftarrow \frac1N \sum_{j=1}^N x_j \quad \text{after steps } H, 2H, \dots

which is one all-reduce of the model per H steps instead of one of the gradient per step. With
``warmup_steps = T > 0`` the first T steps are ordinary synchronous mini-batch SGD (gradients
averaged before the optimizer step, BatchNorm statistics broadcast from rank 0 as
``DistributedDataParallel`` does; a parameter some ranks left unused is averaged with their zeros and one
no rank used keeps no gradient, as with ``find_unused_parameters=True``, whose used-map travels likewise as
one float per parameter in the same all-reduce), and local SGD starts afterwards: post-local SGD. With H = 1 and
plain SGD, local SGD is mini-batch SGD: averaging the updated models is averaging the gradients.

Uneven data (ranks with different numbers of batches in an epoch): a rank that has run out of batches
keeps taking part in the averaging rounds until every rank has finished the epoch; a round averages
the models of the ranks that took a step since the previous round (so a finished rank's last local
steps count once, and it is not counted again with a stale model), and every rank receives the
average. The checkpoint model is the plain average of every rank's current model. Post-local SGD's
warm-up averages gradients every step, which a rank without data cannot do: uneven batches during the
warm-up stop the run with a clear error.

Local SGD is the centralized baseline of the survey's distributed chapter: it trades communication
for the drift of the local models between averaging rounds (measured by
:class:`~lightning_optsurvey.callbacks.ConsensusDistance`). Checkpoints hold the average model and
each rank's own state for an exact resume (see :mod:`lightning_optsurvey.strategies._base`).

Why our own: Lightning's post-local SGD is a ``DistributedDataParallel`` communication hook plus
``torch.distributed``'s ``PeriodicModelAverager``, which needs the DDP wrapper, counts no bytes and
keeps no per-rank state in checkpoints, so a resumed run does not continue exactly.

References:
    Stich, "Local SGD Converges Fast and Communicates Little", ICLR 2019, arXiv:1805.09767.
    Lin, Stich, Patel & Jaggi, "Don't Use Large Mini-Batches, Use Local SGD", ICLR 2020,
    arXiv:1808.07217.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.optim import Optimizer
from typing_extensions import override

from lightning_optsurvey.strategies._base import PeriodicSyncStrategy
from lightning_optsurvey.strategies._comm import (
    FlatBuffers,
    all_reduce_flat_,
    all_reduce_mean_,
    broadcast_flat,
    is_distributed,
    world_size,
)
from lightning_optsurvey.validation import check_int

__all__ = ["LocalSGDStrategy"]


class LocalSGDStrategy(PeriodicSyncStrategy):
    r"""Local SGD: average the models every ``sync_every`` steps; optional synchronous warm-up.

    After the optimizer step of steps :math:`T + H, T + 2H, \dots` (``T = warmup_steps``,
    ``H = sync_every``) the parameters and floating-point buffers are replaced by their average over
    the ranks, :math:`x_i \leftarrow \frac1N \sum_j x_j`, in one all-reduce per dtype and device.
    During the first ``T`` steps the gradients are averaged before the optimizer step (after the
    closure's backward, before gradient clipping, as ``DistributedDataParallel`` does) and the float
    buffers are broadcast from rank 0 before the forward pass, so the warm-up is exactly mini-batch SGD
    (post-local SGD). Optimizer states (momentum) stay local.

    Args:
        sync_every: H, the number of optimizer steps between averaging rounds.
        warmup_steps: T, the number of initial steps with averaged gradients (0: local SGD throughout).
        **ddp_kwargs: ``accelerator``, ``parallel_devices``, ``cluster_environment``,
            ``checkpoint_io``, ``precision_plugin``, ``process_group_backend``, ``timeout``,
            ``start_method`` (see :class:`~lightning.pytorch.strategies.DDPStrategy`).

    Raises:
        ValueError: If ``sync_every < 1`` or ``warmup_steps < 0``, or for ``Trainer(sync_batchnorm=True)``.
        TypeError: If they are not integers, or for ``DistributedDataParallel`` keywords.

    Example:
        >>> import lightning_optsurvey  # registers "local_sgd"
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(accelerator="cpu", devices=4, strategy="local_sgd")  # doctest: +SKIP
        >>> trainer = Trainer(devices=4, strategy=LocalSGDStrategy(sync_every=16, warmup_steps=500))  # doctest: +SKIP

    References:
        Stich, "Local SGD Converges Fast and Communicates Little", ICLR 2019, arXiv:1805.09767.
        Lin, Stich, Patel & Jaggi, "Don't Use Large Mini-Batches, Use Local SGD", ICLR 2020,
        arXiv:1808.07217.
    """

    strategy_name = "local_sgd"
    registry_entries = {
        strategy_name: ("Local SGD: per-rank steps, parameters and float buffers averaged every sync_every steps", {}),
    }

    def __init__(self, sync_every: int = 8, warmup_steps: int = 0, **ddp_kwargs: Any) -> None:
        self.warmup_steps = check_int("warmup_steps", warmup_steps, low=0)
        super().__init__(sync_every=sync_every, **ddp_kwargs)
        self._buffer_flat: FlatBuffers | None = None

    @property
    def in_warmup(self) -> bool:
        """Whether the next optimizer step averages gradients (post-local SGD's warm-up phase)."""
        return self._steps < self.warmup_steps

    @override
    def _schedule_offset(self) -> int:
        return self.warmup_steps

    @override
    def _on_fit_setup(self) -> None:
        super()._on_fit_setup()
        self._buffer_flat = FlatBuffers.or_none(self._float_buffers())

    @override
    def _after_backward(self, optimizer: Optimizer) -> None:
        if self.in_warmup and is_distributed():
            # DistributedDataParallel's gradient all-reduce, after the backward and before clipping. Every
            # trainable parameter takes part on every rank, in the same order (a parameter this rank did not use
            # contributes zeros, as DDP's find_unused_parameters does), so the ranks' lists always line up; one
            # flag per parameter says whether any rank had a gradient for it (if none did, it keeps None).
            params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
            if not params:
                return
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            used = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
            all_reduce_mean_([*grads, used], counter=self.comm)
            for p, grad, anywhere in zip(params, grads, used.tolist(), strict=True):
                if p.grad is None and anywhere > 0:
                    p.grad = grad

    @override
    def _pre_optimizer_step(self, optimizer: Optimizer) -> None:
        flat = self._buffer_flat
        if self.in_warmup and flat is not None and is_distributed():
            # DistributedDataParallel(broadcast_buffers=True): rank 0's statistics before each forward.
            broadcast_flat(flat, 0, counter=self.comm)
            flat.unpack()

    @override
    def _synchronize(self, optimizer: Optimizer) -> None:
        assert self._flat is not None
        contrib = self._contrib
        if contrib is None or all(c == 1.0 for c in contrib):
            all_reduce_flat_(self._flat, counter=self.comm)
            return
        # Uneven data: the average of the ranks that stepped since the previous round; every rank,
        # including those out of data, receives it.
        own, total = contrib[self.global_rank], sum(contrib)
        buffers = self._flat.pack()
        for buffer in buffers:
            buffer.mul_(own)
            dist.all_reduce(buffer)
            buffer.div_(total)
        self.comm.add_all_reduce(self._flat.nbytes, world_size())
        self._flat.unpack()

    @override
    def _join_refusals(self) -> int:
        return super()._join_refusals() | (4 if self.in_warmup else 0)

    @override
    def _logged_params(self) -> dict[str, Any]:
        params = super()._logged_params()
        params["warmup_steps"] = self.warmup_steps
        return params
